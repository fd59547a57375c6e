"""The explorer: its widget logic on a tiny recording, and the notebook (built from notebooks/explorer.py) served
by Voila in headless Chromium.

The browser test needs Debian's `chromium` (or DCVLA_CHROMIUM=/path/to/chromium), `voila` and `playwright`
(the Python package only: it drives the system Chromium, no browser download). Missing ones FAIL the test.
Every wait is bounded; Voila (and the kernels it started) are always stopped in a `finally`.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import nbformat
import numpy as np
import pytest
import xarray as xr

import browser
from browser import runs_dir  # noqa: F401  (the fixture: two tiny recordings)
from dcvla.explorer import ATTENTION, IMAGE, OVERLAY, Explorer, NoDatasetsError
from dcvla.notebooks import build_notebook

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "notebooks" / "explorer.py"  # jupytext source; the .ipynb Voila serves is built from it


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
    synced = fig.get_state()["_widget_data"][OVERLAY]["z"]  # what a view opened now (Voila, a reload) starts from
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
def family_runs(tmp_path_factory, pi0) -> Path:
    """Four frames of a shipped episode recorded with drift by OpenVLA-OFT (two images) and pi0 (every 5th frame, as
    the stability cliff study records), next to a file that is not netCDF and a results table (no frames)."""
    import xarray as xr

    from dcvla.io import write_dataset
    from dcvla.libero.episodes import list_episodes, load_episode
    from dcvla.openvla import CacheConfig
    from dcvla.openvla.oft import OFTCachedPolicy
    from dcvla.pi0 import ReuseConfig
    from dcvla.recording import record_episode
    from dcvla.studies.common import episode_inputs
    from dcvla.studies.stability_cliff import pi0_episode_inputs

    ep = load_episode(list_episodes(suite="libero_spatial")[0])
    runs = tmp_path_factory.mktemp("family_runs")
    labels = {"suite": ep.suite, "task": ep.task_id, "episode": ep.name}
    oft = OFTCachedPolicy.from_preset("oft-tiny", seed=0, config=CacheConfig("dual_cache"))
    images, states = episode_inputs(oft, ep, 4)
    record_episode(oft, images, ep.instruction, runs / "oft" / "dual_cache.nc", states, drift=True, labels=labels)
    images, states = pi0_episode_inputs(ep, 4, 5)
    record_episode(pi0.with_config(ReuseConfig(mode="vision_only", threshold=0.8)), images, ep.instruction,
                   runs / "stability_cliff" / "vision_only.nc", states=states, drift=True,
                   labels=labels | {"frame_stride": 5, "center_crop": 0})
    (runs / "broken.nc").write_bytes(b"half a file")
    write_dataset(xr.Dataset({"success": (("trial",), np.array([1, 0]))}), runs / "results" / "vanilla.nc")
    return runs


def test_explorer_lists_what_it_cannot_show_and_loads_the_rest(family_runs, tmp_path):
    ex = Explorer(family_runs)
    assert [p.relative_to(family_runs).as_posix() for p in ex.paths] == ["oft/dual_cache.nc", "stability_cliff/vision_only.nc"]
    why = {p.relative_to(family_runs).as_posix(): reason for p, reason in ex.skipped.items()}
    assert set(why) == {"broken.nc", "results/vanilla.nc"}
    assert why["broken.nc"].startswith("unreadable (OSError") and why["results/vanilla.nc"].startswith("not a recording")
    assert "broken.nc" in ex.skipped_note.value and "2 file(s) not shown" in ex.skipped_note.value
    (tmp_path / "a.nc").write_bytes(b"x")
    with pytest.raises(NoDatasetsError, match=r"no readable recording under .*a\.nc: unreadable"):
        Explorer(tmp_path)


def test_explorer_shows_both_oft_images(family_runs):
    ex = Explorer(family_runs)
    ex.load(family_runs / "stability_cliff" / "vision_only.nc")
    ex.load(family_runs / "oft" / "dual_cache.nc")  # after a flow recording: the patch panels and menus come back
    fig, ds = ex.figure, ex.ds
    assert fig.data[ATTENTION].x is None and fig.layout.yaxis2.scaleanchor == "x2"
    assert ex.camera.options == (("third-person", 0), ("wrist", 1)) and not ex.camera.disabled
    assert all(w.layout.display != "none" for w in (ex.overlay, ex.camera, ex.layer, ex.head, ex.metric))
    assert ex.curves.layout.display == "none"
    ex.set_frame(2)
    agent_image, agent_t2v = fig.data[IMAGE].source, fig.data[ATTENTION].z
    ex.camera.value = 1  # the wrist image: its own frame and its own 256 patches (p + 256)
    wrist = ds.reuse.isel(frame=2).values[256:].reshape(16, 16)
    assert wrist.any() and wrist.tolist() != ds.reuse.isel(frame=2).values[:256].reshape(16, 16).tolist()
    assert [[v is not None for v in row] for row in fig.data[OVERLAY].z] == wrist.tolist()
    assert fig.data[IMAGE].source != agent_image and fig.data[ATTENTION].z != agent_t2v
    chunk = [fig.data[t].y for t, var, _ in ex._chunk_traces if var == "action"]  # the chunk at the current frame
    np.testing.assert_allclose(np.array(chunk).T, ds.action.isel(frame=2).values)
    assert [shape.x0 for shape in fig.layout.shapes] == [2]  # the frame line on the drift panel only
    assert "reused" in ex.info.value and "chunk_l1" in ex.info.value


def test_explorer_shows_a_flow_recording(family_runs):
    from dcvla.libero import protocol
    from dcvla.libero.episodes import list_episodes, load_episode
    from dcvla.explorer_panels import png_uri

    ex = Explorer(family_runs)
    ex.load(family_runs / "stability_cliff" / "vision_only.nc")
    fig, ds = ex.figure, ex.ds
    shown = {w.description or "overlay": w.layout.display != "none" for w in (ex.overlay, ex.camera, ex.layer, ex.metric, ex.curves)}
    assert shown == {"overlay": False, "camera": True, "LLM layer": False, "drift": False, "curves": True}
    ex.set_frame(3)
    np.testing.assert_array_equal(np.array(fig.data[ATTENTION].z), ds.span_reuse.isel(frame=3).values.astype(float))
    assert list(fig.data[ATTENTION].y) == ["vision", "text", "state"]
    ep = load_episode(list_episodes(suite="libero_spatial")[0])  # inference 3 saw episode frame 15, uncropped
    assert fig.data[IMAGE].source == png_uri(protocol.policy_input(ep.frames[15], crop=False))
    title = fig.layout.annotations[0].text
    assert title.startswith("frame 3: gate open" if bool(ds.gate[3]) else "frame 3: gate closed")
    chunk = np.array([fig.data[t].y for t, var, _ in ex._chunk_traces if var == "action_ref"]).T
    np.testing.assert_allclose(chunk, ds.action_ref.isel(frame=3).values)  # the shadow's chunk, dashed
    threshold = [s for s in fig.layout.shapes if s.yref == "y3"]
    assert len(threshold) == 1 and threshold[0].y0 == 0.8  # the gate's threshold across the similarity curves
    names = {t.name for t in fig.data[4:] if t.xaxis == "x3"}
    assert names == {"vision similarity", "state similarity", "gate open"}
    ex.curves.value = "staleness"
    staleness = {t.name: list(t.y) for t in fig.data[4:] if t.xaxis == "x3"}
    assert staleness == {span: ds.staleness.sel(span=span).values.astype(float).tolist() for span in ("vision", "text", "state")}
    ex.curves.value = "drift"
    drift = next(t for t in fig.data if t.name == "action drift")
    np.testing.assert_allclose(drift.y, ds.action_drift.values)
    ex.camera.value = 1
    assert fig.data[IMAGE].source == png_uri(protocol.policy_input(ep.wrist_frames[15], crop=False))


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
def test_explorer_in_voila_moves_with_the_slider(runs_dir, notebook, tmp_path):
    chromium = browser.require("voila")
    masks = browser.reuse_masks(runs_dir / "tiny" / "dual_cache.nc")  # the default dataset: the first in sorted order
    assert masks[2] != masks[0]
    port = browser.free_port()
    env = dict(os.environ, DCVLA_RUNS_DIR=str(runs_dir), JUPYTER_RUNTIME_DIR=str(tmp_path / "runtime"),
               JUPYTER_PLATFORM_DIRS="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "voila", str(notebook), "--no-browser", f"--port={port}", "--Voila.ip=127.0.0.1",
           "--VoilaConfiguration.show_tracebacks=True",
           # lab extensions of other tools in the env (jupytext, the lab preview) only add console errors here
           "--VoilaConfiguration.extension_denylist=jupyterlab-jupytext",
           "--VoilaConfiguration.extension_denylist=@voila-dashboards/jupyterlab-preview"]
    with browser.served_page(cmd, port=port, env=env, log=tmp_path / "voila.log", chromium=chromium,
                             viewport={"width": 1200, "height": 1250}) as page:
        page.goto(f"http://127.0.0.1:{port}/", timeout=60_000)  # Voila runs the notebook before the page completes
        browser.wait_for_figure(page, timeout=45_000)
        before = page.evaluate(browser.OVERLAY_Z)
        assert page.evaluate(browser.OVERLAY_MASK) == masks[0], "the page starts at frame 0"
        browser.slide_to(page, 2, masks[2])
        assert page.evaluate(browser.OVERLAY_Z) != before
        assert page.evaluate(browser.FRAME_LINES) == [2, 2], "the frame line on the drift and action panels follows"
        browser.screenshot(page, tmp_path, "explorer.png")


def test_patch_panels_take_the_recordings_grid():
    """An 8 x 8 grid (oft-micro's 28 px patches) is drawn as 8 x 8 cells of 28 px, the reused marks at their
    centres; a count that is no square grid is refused by name."""
    from dcvla.explorer import REUSED
    from dcvla.explorer_panels import centers, draw_patches, grid, make_figure

    assert centers(64) == [14.0 + 28 * i for i in range(8)] and centers(256)[:2] == [7.0, 21.0]
    fig, reuse = make_figure(), np.zeros(64, bool)
    reuse[10] = True  # row 1, column 2
    draw_patches(fig, xr.Dataset({"staleness": ("patch", np.ones(64))}), reuse, np.ones(64), "both")
    assert len(fig.data[OVERLAY].z) == 8 and list(fig.data[OVERLAY].x) == centers(64)
    assert (list(fig.data[REUSED].x), list(fig.data[REUSED].y)) == ([70.0], [42.0])
    with pytest.raises(ValueError, match="60 patch values do not make a square grid"):
        grid(np.zeros(60))
