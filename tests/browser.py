"""What the browser tests share (the explorer in Voila, tests/test_explorer.py; in JupyterLab, tests/test_lab.py):
a tiny pair of recordings, a server on a free port with a headless Debian Chromium on it (Playwright's Python
package drives /usr/bin/chromium, no browser download), and the explorer's figure as the page draws it.

Every wait is bounded; the server and the kernels it started are always stopped. A failure names the server's log
tail and the page's errors. Screenshots go to the test's temporary folder, and to DCVLA_SCREENSHOTS (a folder under
the repository, `make screenshots` sets figures/) only when that is set, so `make test` rewrites no tracked file.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

from dcvla.explorer import OVERLAY
from dcvla.io import open_recording

ROOT = Path(__file__).resolve().parents[1]
SCREENSHOTS = os.environ.get("DCVLA_SCREENSHOTS", "")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
IMAGE_PLOT = ".dcvla-frame-image.js-plotly-plot"  # plotly's graph div is the figure widget's own element
OVERLAY_Z = f"() => JSON.stringify(document.querySelector('{IMAGE_PLOT}').data[{OVERLAY}].z)"
# the reuse overlay as the page draws it: which of the 16x16 patches are painted (null = transparent)
OVERLAY_MASK = (f"() => JSON.stringify(Array.from(document.querySelector('{IMAGE_PLOT}').data[{OVERLAY}].z,"
                " r => Array.from(r, v => v !== null)))")
CURVES = f"() => JSON.stringify(document.querySelector('{IMAGE_PLOT}').data.map(t => t.y))"  # a dataset's own
FRAME_LINES = f"() => document.querySelector('{IMAGE_PLOT}').layout.shapes.map(s => s.x0)"
READOUT = ".dcvla-frame-slider .widget-readout"
RECORDINGS = ("dual_cache", "vla_cache")  # runs_dir/tiny/<method>.nc; their reuse masks differ from frame 1 on


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory, make_policy) -> Path:
    """Two tiny recordings (with drift) of the first 4 frames of a shipped episode, as the policy saw them:
    dual_cache and vla_cache, so a page can switch between two datasets (dual_cache sorts first, the default)."""
    from dcvla.libero import protocol
    from dcvla.libero.episodes import list_episodes, load_episode
    from dcvla.recording import record_episode

    ep = load_episode(list_episodes(suite="libero_spatial")[0])
    frames = np.stack([protocol.policy_input(protocol.decode_frame(j)) for j in ep.jpegs[:4]])  # = ep.frames[:4], cropped
    runs = tmp_path_factory.mktemp("runs")
    for method in RECORDINGS:
        record_episode(make_policy(method=method), frames, ep.instruction, runs / "tiny" / f"{method}.nc", drift=True,
                       labels={"suite": ep.suite, "task": ep.task_id, "episode": ep.name})
    return runs


def reuse_masks(path: Path) -> list[str]:
    """Each frame's reuse mask as OVERLAY_MASK reads it off the page (16x16, row-major, JSON)."""
    ds = open_recording(path)
    return [json.dumps(ds.reuse.isel(frame=i).values.reshape(16, 16).tolist(), separators=(",", ":"))
            for i in range(ds.sizes["frame"])]


def require(*modules: str) -> str:
    """The Chromium to drive; FAILS the test (saying how to install) when it or one of `modules` is missing."""
    chromium = os.environ.get("DCVLA_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
    missing = []
    if not os.access(chromium, os.X_OK):
        missing.append(f"Chromium ({chromium}): apt-get install -y chromium, or set DCVLA_CHROMIUM")
    for module in (*modules, "playwright", "psutil"):
        if importlib.util.find_spec(module) is None:
            missing.append(f"the Python package {module}: pip install {module}")
    if missing:
        pytest.fail("the browser test needs " + "; ".join(missing), pytrace=False)
    return chromium


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with code {proc.returncode} before listening")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"the server did not listen on port {port} within {timeout:.0f} s")


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM the server (it shuts its kernels down), then SIGKILL whatever of it and its children is left, by pid."""
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


@contextmanager
def served_page(cmd: list[str], *, port: int, env: dict, log: Path, chromium: str, viewport: dict,
                start_timeout: float = 60) -> Iterator[object]:
    """Start the server `cmd` (listening on `port`, output to `log`) and yield a headless Chromium page on it; at the
    end, no widget's JS may have failed to load. Any failure comes out as an AssertionError with the log tail and the
    page's errors."""
    from playwright.sync_api import sync_playwright

    host = f"http://127.0.0.1:{port}/"
    errors: list[str] = []
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        wait_for_port(port, proc, timeout=start_timeout)
        with sync_playwright() as pw:
            context = pw.chromium.launch_persistent_context(
                str(log.parent / "chromium-profile"), executable_path=chromium, args=CHROMIUM_ARGS, headless=True,
                timeout=30_000, viewport=viewport)
            try:
                page = context.new_page()
                page.set_default_timeout(30_000)
                page.on("pageerror", lambda e: errors.append(str(e)))
                # closed network: answer off-host requests (fonts, news) at once instead of waiting on DNS
                page.route("**/*", lambda r: r.continue_() if r.request.url.startswith(host) else r.abort())
                yield page
                frozen = [e for e in errors if "anywidget" in e]
                assert not frozen, f"a widget's JS failed to load in time, it will not follow the kernel: {frozen}"
            finally:
                context.close()
    except Exception as e:
        tail = log.read_text(errors="replace")[-4000:]
        raise AssertionError(f"{type(e).__name__}: {e}\npage errors: {errors}\n--- {log.name} (tail) ---\n{tail}") from e
    finally:
        stop(proc)


def wait_for_figure(page, timeout: float) -> None:
    page.wait_for_function(f"() => {{ const g = document.querySelector('{IMAGE_PLOT}');"
                           " return g && g.data && g.data.length > 4 }", timeout=timeout)


def slide_to(page, frame: int, mask: str) -> None:
    """Move the frame slider to `frame` with the keyboard on its noUi handle, as a user does, and wait until the page
    shows that frame's reuse `mask` (the kernel redraws every frame on the way: wait for this one, not any change)."""
    handle = page.locator(".dcvla-frame-slider .noUi-handle")
    handle.focus()
    start = int(page.locator(READOUT).inner_text())
    for _ in range(abs(frame - start)):
        handle.press("ArrowRight" if frame > start else "ArrowLeft")
    page.wait_for_function(f"(f) => document.querySelector('{READOUT}').innerText.trim() === f", arg=str(frame),
                           timeout=10_000)
    page.wait_for_function(f"(want) => ({OVERLAY_MASK})() === want", arg=mask, timeout=20_000)


def screenshot(page, tmp_path: Path, name: str) -> Path:
    """The page as a PNG in `tmp_path`, copied to DCVLA_SCREENSHOTS/<name> when that is set (`make screenshots`)."""
    page.wait_for_timeout(300)  # let plotly finish painting
    path = tmp_path / name
    page.screenshot(path=str(path), full_page=True, timeout=15_000)
    if SCREENSHOTS:
        (ROOT / SCREENSHOTS).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, ROOT / SCREENSHOTS / name)
    return path
