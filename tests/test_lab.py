"""JupyterLab, the workbench's home (`make lab`): it starts from the project's environment, serves the study
notebooks' jupytext sources as notebooks, the project's kernel registers under its own name, and the explorer
notebook runs in it: in headless Chromium, all cells run, the frame slider and the dataset dropdown redraw the plot.

The browser test needs what tests/browser.py says (Debian's chromium, playwright's Python package); missing ones FAIL
it. JupyterLab's settings, workspaces and runtime files live in the test's temporary folder: no user state leaks in,
nothing tracked is written.
"""

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import nbformat
import pytest

import browser
from browser import runs_dir  # noqa: F401  (the fixture: two tiny recordings)
from dcvla.notebooks import read_notebook

NOTEBOOKS = Path(__file__).parents[1] / "notebooks"
KERNEL = {"name": "dcvla", "display_name": "dcvla (.venv)", "language": "python"}
# no toasts: no news or update prompt (nor a request for them) over the notebook
QUIET = {"fetchNews": "false", "checkForUpdates": False, "doNotDisturbMode": True}


def get(url: str):
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


@pytest.fixture(scope="module")
def jupyter_path(tmp_path_factory) -> Path:
    """A JUPYTER_PATH entry with the project's kernel, registered as `make lab` does, but in a temporary prefix."""
    prefix = tmp_path_factory.mktemp("prefix")
    subprocess.run([sys.executable, "-m", "ipykernel", "install", "--prefix", str(prefix), "--name", KERNEL["name"],
                    "--display-name", KERNEL["display_name"]], check=True, capture_output=True)
    return prefix / "share" / "jupyter"


def lab(root: Path, port: int, tmp_path: Path) -> list[str]:
    """`jupyter lab` on `root` and `port`, without a token; its settings and workspaces in `tmp_path`."""
    return [sys.executable, "-m", "jupyter", "lab", f"--ServerApp.root_dir={root}", "--no-browser", f"--port={port}",
            "--ServerApp.ip=127.0.0.1", "--IdentityProvider.token=", "--allow-root",
            f"--LabApp.user_settings_dir={tmp_path / 'settings'}", f"--LabApp.workspaces_dir={tmp_path / 'workspaces'}"]


def lab_env(jupyter_path: Path, tmp_path: Path, **extra: str) -> dict:
    """The environment with only the project's kernels and config: user config, data and runtime dirs in tmp_path."""
    return {**os.environ, "JUPYTER_PATH": str(jupyter_path), "JUPYTER_CONFIG_DIR": str(tmp_path / "config"),
            "JUPYTER_DATA_DIR": str(tmp_path / "data"), "JUPYTER_RUNTIME_DIR": str(tmp_path / "runtime"),
            "IPYTHONDIR": str(tmp_path / "ipython"), "JUPYTER_PLATFORM_DIRS": "1", "PYTHONUNBUFFERED": "1", **extra}


def dismiss_popups(page) -> None:
    """Whenever JupyterLab puts a kernel choice or a toast over the page, before the next click or key: pick the
    project's kernel, close the toast. (Neither is expected: the notebook names the kernel, QUIET mutes toasts.)"""
    dialog = page.locator(".jp-Dialog").filter(has=page.locator(".jp-Dialog-content select"))

    def pick_kernel(dialog):
        dialog.locator("select").select_option(label=KERNEL["display_name"])
        dialog.locator(".jp-mod-accept").click()

    page.add_locator_handler(dialog, pick_kernel)
    page.add_locator_handler(page.locator(".Toastify__toast"),
                             lambda toast: toast.locator(".jp-Notification-Toast-Close").click())


def test_jupyterlab_serves_the_notebooks_with_the_projects_kernel(jupyter_path, tmp_path):
    port = browser.free_port()
    server = subprocess.Popen(lab(NOTEBOOKS, port, tmp_path), env=lab_env(jupyter_path, tmp_path),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 90
        while True:
            try:
                specs = get(f"{base}/api/kernelspecs")
                break
            except OSError:
                assert time.monotonic() < deadline and server.poll() is None, "JupyterLab did not start"
                time.sleep(0.5)
        assert specs["kernelspecs"]["dcvla"]["spec"]["display_name"] == "dcvla (.venv)"
        with urllib.request.urlopen(f"{base}/lab", timeout=10) as response:
            assert response.status == 200
        quickstart = get(f"{base}/api/contents/quickstart.py?type=notebook")  # jupytext: the .py is a notebook
        assert quickstart["type"] == "notebook" and quickstart["content"]["cells"][0]["cell_type"] == "markdown"
        assert "parameters" in quickstart["content"]["cells"][1]["metadata"]["tags"]
    finally:
        browser.stop(server)


def test_explorer_in_jupyterlab_runs_and_follows_the_widgets(runs_dir, jupyter_path, tmp_path):
    chromium = browser.require("jupyterlab")
    from playwright.sync_api import expect

    a, b = (browser.reuse_masks(runs_dir / "tiny" / f"{m}.nc") for m in browser.RECORDINGS)
    assert a[2] != a[0] and b[2] != a[2], "the recordings' masks tell frames and datasets apart"
    root = tmp_path / "notebooks"
    root.mkdir()
    nb = read_notebook("explorer")  # the built notebook, with the project's kernel: JupyterLab starts it, no dialog
    nb.metadata["kernelspec"] = KERNEL
    nbformat.write(nb, root / "explorer.ipynb")
    quiet = tmp_path / "settings" / "@jupyterlab" / "apputils-extension" / "notification.jupyterlab-settings"
    quiet.parent.mkdir(parents=True)
    quiet.write_text(json.dumps(QUIET))
    port = browser.free_port()
    env = lab_env(jupyter_path, tmp_path, DCVLA_RUNS_DIR=str(runs_dir))
    with browser.served_page(lab(root, port, tmp_path), port=port, env=env, log=tmp_path / "jupyterlab.log",
                             chromium=chromium, viewport={"width": 1500, "height": 1650}) as page:
        dismiss_popups(page)
        page.goto(f"http://127.0.0.1:{port}/lab/tree/explorer.ipynb?reset", timeout=60_000)
        expect(page.locator(".jp-NotebookPanel .jp-Toolbar-kernelName")).to_have_text(KERNEL["display_name"],
                                                                                        timeout=45_000)
        page.get_by_role("menuitem", name="Run", exact=True).click()
        page.get_by_role("menuitem", name="Run All Cells", exact=True).click()
        browser.wait_for_figure(page, timeout=45_000)
        assert page.evaluate(browser.OVERLAY_MASK) == a[0], "the page starts at frame 0"
        browser.slide_to(page, 2, a[2])
        assert page.evaluate(browser.FRAME_LINES) == [2, 2], "the frame line on the drift and action panels follows"
        curves = page.evaluate(browser.CURVES)
        page.locator(".dcvla-dataset select").select_option(label="tiny/vla_cache.nc")
        page.wait_for_function(f"() => document.querySelector('{browser.READOUT}').innerText.trim() === '0'")
        page.wait_for_function(f"(before) => ({browser.CURVES})() !== before", arg=curves, timeout=20_000)
        browser.slide_to(page, 2, b[2])
        browser.screenshot(page, tmp_path, "jupyterlab.png")
