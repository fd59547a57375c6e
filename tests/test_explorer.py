"""The explorer: its widget logic on a tiny recording, and the notebook (built from notebooks/explorer.py) served
by Voila in headless Chromium.

The browser test needs Debian's `chromium` (or DCVLA_CHROMIUM=/path/to/chromium), `voila` and `playwright`
(the Python package only: it drives the system Chromium, no browser download). Missing ones FAIL the test.
Every wait is bounded; Voila (and the kernels it started) are always stopped in a `finally`.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import numpy as np
import pytest

from dcvla.explorer import ATTENTION, IMAGE, OVERLAY, Explorer, NoDatasetsError
from dcvla.io import open_recording
from dcvla.notebooks import build_notebook

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "notebooks" / "explorer.py"  # jupytext source; the .ipynb Voila serves is built from it
# the README's screenshot: refreshed by `make screenshots` (DCVLA_SCREENSHOTS=figures); a plain test run writes its
# screenshot to a temporary folder and leaves the tracked figure alone
SCREENSHOTS = os.environ.get("DCVLA_SCREENSHOTS", "")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
IMAGE_PLOT = ".dcvla-frame-image.js-plotly-plot"  # plotly's graph div is the figure widget's own element
OVERLAY_Z = f"() => JSON.stringify(document.querySelector('{IMAGE_PLOT}').data[{OVERLAY}].z)"
# the reuse overlay as the page draws it: which of the 16x16 patches are painted (null = transparent)
OVERLAY_MASK = (f"() => JSON.stringify(Array.from(document.querySelector('{IMAGE_PLOT}').data[{OVERLAY}].z,"
                " r => Array.from(r, v => v !== null)))")


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory, make_policy) -> Path:
    """A tiny dual-cache recording (with drift) of the first 4 frames of a shipped episode, as the policy saw them."""
    from dcvla.libero import protocol
    from dcvla.libero.episodes import list_episodes, load_episode
    from dcvla.recording import record_episode

    ep = load_episode(list_episodes(suite="libero_spatial")[0])
    frames = np.stack([protocol.policy_input(protocol.decode_frame(j)) for j in ep.jpegs[:4]])  # = ep.frames[:4], cropped
    runs = tmp_path_factory.mktemp("runs")
    record_episode(make_policy(method="dual_cache"), frames, ep.instruction, runs / "tiny" / "dual_cache.nc", drift=True,
                   labels={"suite": ep.suite, "task": ep.task_id, "episode": ep.name})
    return runs


def test_explorer_follows_the_frame(runs_dir):
    ex = Explorer(runs_dir)
    fig = ex.figure
    assert ex.slider.description == "frame" and (ex.slider.min, ex.slider.max) == (0, 3)
    assert "dcvla-frame-slider" in ex.slider._dom_classes and "dcvla-frame-image" in fig._dom_classes
    assert "dcvla-explorer" in ex.widget._dom_classes
    image0, overlay0, attn0 = fig.data[IMAGE].source, fig.data[OVERLAY].z, fig.data[ATTENTION].z
    assert image0.startswith("data:image/png;base64,")

    ex.set_frame(2)
    assert ex.slider.value == 2
    overlay2 = fig.data[OVERLAY].z
    assert overlay2 != overlay0 and fig.data[ATTENTION].z != attn0 and fig.data[IMAGE].source != image0
    reused = ex.ds.reuse.isel(frame=2).values.reshape(16, 16)  # the overlay is the reuse mask, row-major
    assert reused.any() and [[v is not None for v in row] for row in overlay2] == reused.tolist()
    assert not any(v is not None for row in overlay0 for v in row)  # frame 0 is a keyframe: nothing reused
    assert [shape.x0 for shape in fig.layout.shapes] == [2, 2]  # the frame line on the drift and action panels
    assert len(fig.data) == 4 + 9 + 14  # image panels; q/k/v x 3 towers; 7 action dims x (action, action_ref)
    synced = fig._widget_data[OVERLAY]["z"]  # what a view opened now (Voila, a reload) starts from
    assert [list(row) for row in synced] == [list(row) for row in overlay2]

    ex.overlay.value = "staleness"
    stale = ex.ds.staleness.isel(frame=2).values.reshape(16, 16)
    assert [[v or 0 for v in row] for row in fig.data[OVERLAY].z] == stale.tolist()
    ex.layer.value, ex.head.value = 3, 1
    t2v = ex.ds.text_to_vision.isel(frame=2, layer=3, head=1).values.astype(float).reshape(16, 16)
    np.testing.assert_allclose(np.array(fig.data[ATTENTION].z, float), t2v)
    with pytest.raises(IndexError, match="out of range"):
        ex.set_frame(4)


def test_no_datasets_is_a_clear_error(tmp_path):
    with pytest.raises(NoDatasetsError, match=r"no recorded datasets \(\*\.nc\) under"):
        Explorer(tmp_path)
    with pytest.raises(NoDatasetsError, match="does not exist"):
        Explorer(tmp_path / "missing")


@pytest.fixture(scope="module")
def notebook() -> Path:
    """notebooks/explorer.ipynb, built from its source (as `make explorer` does)."""
    return build_notebook("explorer")


def test_notebook_is_parameterised_and_stripped(notebook):
    assert notebook == SOURCE.with_suffix(".ipynb")
    nb = nbformat.read(notebook, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert "parameters" in code[0].metadata.get("tags", []) and "runs_dir" in code[0].source
    assert all(not c.outputs and c.execution_count is None for c in code), "the built notebook has no outputs"


# ------------------------------------------------------------------------------------------------ browser test
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_port(port: int, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"voila exited with code {proc.returncode} before listening")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"voila did not listen on port {port} within {timeout:.0f} s")


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM Voila (it shuts its kernels down), then SIGKILL whatever of it and its children is left, by pid."""
    import psutil

    try:
        children = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        children = []
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
    _, alive = psutil.wait_procs(children, timeout=5)
    for child in alive:
        child.kill()


def _requirements() -> tuple[str, list[str]]:
    chromium = os.environ.get("DCVLA_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
    missing = []
    if not os.access(chromium, os.X_OK):
        missing.append(f"Chromium ({chromium}): apt-get install -y chromium, or set DCVLA_CHROMIUM")
    for module, pip in (("voila", "voila"), ("playwright", "playwright"), ("psutil", "psutil")):
        if importlib.util.find_spec(module) is None:
            missing.append(f"the Python package {module}: pip install {pip}")
    return chromium, missing


def test_explorer_in_voila_moves_with_the_slider(runs_dir, notebook, tmp_path):
    chromium, missing = _requirements()
    if missing:
        pytest.fail("the browser test needs " + "; ".join(missing), pytrace=False)
    from playwright.sync_api import sync_playwright

    ds = open_recording(next(runs_dir.rglob("*.nc")))
    masks = [json.dumps(ds.reuse.isel(frame=i).values.reshape(16, 16).tolist(), separators=(",", ":"))
             for i in range(ds.sizes["frame"])]
    assert masks[2] != masks[0]
    port = _free_port()
    url = f"http://127.0.0.1:{port}/"
    env = dict(os.environ, DCVLA_RUNS_DIR=str(runs_dir), JUPYTER_RUNTIME_DIR=str(tmp_path / "runtime"),
               JUPYTER_PLATFORM_DIRS="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "voila", str(notebook), "--no-browser", f"--port={port}", "--Voila.ip=127.0.0.1",
           "--VoilaConfiguration.show_tracebacks=True",
           # lab extensions of other tools in the env (jupytext, the lab preview) only add console errors here
           "--VoilaConfiguration.extension_denylist=jupyterlab-jupytext",
           "--VoilaConfiguration.extension_denylist=@voila-dashboards/jupyterlab-preview"]
    log_path = tmp_path / "voila.log"
    page_errors: list[str] = []
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        _wait_for_port(port, proc, timeout=30)
        with sync_playwright() as pw:
            context = pw.chromium.launch_persistent_context(
                str(tmp_path / "chromium-profile"), executable_path=chromium, args=CHROMIUM_ARGS, headless=True,
                timeout=30_000, viewport={"width": 1200, "height": 1250})
            try:
                page = context.new_page()
                page.set_default_timeout(30_000)
                page.on("pageerror", lambda e: page_errors.append(str(e)))
                # closed network: answer off-host requests (the template's font CDN) at once instead of waiting on DNS
                page.route("**/*", lambda r: r.continue_() if r.request.url.startswith(url) else r.abort())
                page.goto(url, timeout=60_000)  # Voila runs the notebook before the page completes
                page.wait_for_function(f"() => {{ const g = document.querySelector('{IMAGE_PLOT}');"
                                       " return g && g.data && g.data.length > 4 }", timeout=45_000)
                before = page.evaluate(OVERLAY_Z)
                assert page.evaluate(OVERLAY_MASK) == masks[0], "the page starts at frame 0"
                handle = page.locator(".dcvla-frame-slider .noUi-handle")
                handle.focus()
                handle.press("ArrowRight")
                handle.press("ArrowRight")
                page.wait_for_function("() => document.querySelector('.dcvla-frame-slider .widget-readout')"
                                       ".innerText.trim() === '2'", timeout=10_000)
                # the kernel redraws frame 1, then frame 2: wait for frame 2's mask, not just any change
                page.wait_for_function(f"(want) => ({OVERLAY_MASK})() === want", arg=masks[2], timeout=20_000)
                assert page.evaluate(OVERLAY_Z) != before
                lines = page.evaluate(f"() => document.querySelector('{IMAGE_PLOT}').layout.shapes.map(s => s.x0)")
                assert lines == [2, 2], "the frame line on the drift and action panels follows the slider"
                frozen = [e for e in page_errors if "anywidget" in e]
                assert not frozen, f"a widget's JS failed to load in time, it will not follow the kernel: {frozen}"
                page.wait_for_timeout(300)  # let plotly finish painting before the screenshot
                page.screenshot(path=str(tmp_path / "explorer.png"), full_page=True, timeout=15_000)
                if SCREENSHOTS:
                    (ROOT / SCREENSHOTS).mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(tmp_path / "explorer.png", ROOT / SCREENSHOTS / "explorer.png")
            finally:
                context.close()
    except Exception as e:
        tail = log_path.read_text(errors="replace")[-4000:]
        raise AssertionError(f"{type(e).__name__}: {e}\npage errors: {page_errors}\n--- voila log (tail) ---\n{tail}") from e
    finally:
        _stop(proc)
