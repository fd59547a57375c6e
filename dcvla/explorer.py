"""The interactive explorer: browse recorded datasets frame by frame (ipywidgets + plotly; JupyterLab or Voila).

`Explorer(runs_dir).widget` is the whole UI: pick a dataset (`*.nc` under `runs_dir`, recursively), move the frame
slider, and see the episode frame the policy saw at that step with what the recording says about it. Two kinds of
recordings, told apart by their variables:

- OpenVLA and OpenVLA-OFT (`dcvla.openvla.record`): per patch. The reuse mask and/or staleness over the image
  (16x16 grid of 14 px patches, row-major; OFT records two images, the camera menu picks one and its patches), the
  LLM's text-to-vision attention of one layer and head, Q/K/V drift per tower over frames, and the action against
  the full recompute's (`action_ref`): over frames, or OFT's chunk at the current frame.
- pi0, pi0.5 and SmolVLA (`dcvla.flow_record`): per span. Which spans' K/V were reused at which prefix layer, the
  gate's decisions and similarities, each span's staleness or the drift over inferences (the curves menu), and the
  action chunk against the no-reuse shadow pass's at the current inference.

The image is the recorded episode's (label `episode`, e.g. "libero_spatial/task00/init00", looked up in
`episodes_dir`), passed through `protocol.policy_input` as the policy saw it: center crop unless the run has a
`center_crop` label set to 0; frame `f` of the run is episode frame `f * frame_stride + start_frame` (labels,
default 1 and 0). It only reads datasets; it never runs a model. A file it cannot read, or one that is not a
recording (a results table), is listed under the menu with the reason, and the others load.

All four panels are subplots of ONE plotly FigureWidget (`dcvla.explorer_panels` draws them): plotly's widget is
an anywidget that ships its 5 MB JS bundle with every instance, and anywidget gives each instance 2 s to load it or
leaves it frozen; one figure loads it once. Stable CSS classes for browser tests: dcvla-explorer, dcvla-dataset, dcvla-frame-slider, dcvla-overlay,
dcvla-camera, dcvla-frame-image (the figure; trace 1 is the overlay heat map, trace 3 the top-right heat map),
dcvla-info, dcvla-skipped.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import ipywidgets as widgets
import numpy as np
import plotly.graph_objects as go
import xarray as xr

from .explorer_panels import (EMPTY, FLOW_CURVES, GRID, HEAT, IMAGE, OVERLAY, REUSED, SIZE, action_traces, configure_axes,
                              draw_flow_frame, draw_patches, drift_curves, flow_curves, frame_lines, grid, is_flow,
                              make_figure, png_uri)
from .io import CorruptFileError, open_recording
from .libero import protocol
from .libero.episodes import DEFAULT_DIR as EPISODES_DIR
from .libero.episodes import episode_path, load_episode

__all__ = ["Explorer", "NoDatasetsError", "find_datasets", "probe", "IMAGE", "OVERLAY", "REUSED", "HEAT", "ATTENTION"]
ATTENTION = HEAT  # OpenVLA: the top-right heat map is text-to-vision attention (flow: span reuse per layer)
OVERLAYS = ("reuse", "staleness", "both", "none")
FLOW_CAMERAS = ("agent view", "wrist")  # pi0's and SmolVLA's image order (`stability_cliff.pi0_episode_inputs`)
REPO_ROOT = Path(__file__).resolve().parents[1]


class NoDatasetsError(FileNotFoundError):
    """The runs directory is missing or holds no readable recording."""


def find_datasets(runs_dir: str | Path) -> list[Path]:
    """Every `*.nc` under `runs_dir` (recursively, skipping hidden and temporary files), sorted."""
    runs_dir = Path(runs_dir)
    hint = ("record one with dcvla.recording.record_episode(policy, frames, instruction, path, drift=True, "
            "labels={'suite': ..., 'task': ..., 'episode': ep.name})")
    if not runs_dir.is_dir():
        raise NoDatasetsError(f"runs directory {runs_dir} does not exist; {hint}")
    found = sorted(p for p in runs_dir.rglob("*.nc") if not any(part.startswith(".") for part in p.relative_to(runs_dir).parts))
    if not found:
        raise NoDatasetsError(f"no recorded datasets (*.nc) under {runs_dir}; {hint}")
    return found


def probe(path: Path) -> str | None:
    """Why the explorer cannot show the file at `path` (unreadable, or not a recording), or None. Reads the header."""
    try:
        with xr.open_dataset(path, engine="h5netcdf") as ds:
            if "frame" not in ds.dims or not ({"reuse", "span_reuse", "action"} & set(ds.data_vars)):
                return "not a recording (no per-frame reuse or action: a results table?)"
    except (OSError, ValueError, KeyError, TypeError) as err:
        return f"unreadable ({type(err).__name__}: {err})"
    return None


def _publish(fig: go.FigureWidget) -> None:
    """Make the figure's synced widget state (what a view opened later starts from: Voila's page, a reload, a second
    view in JupyterLab) match its data and layout.

    FigureWidget sends edits as one-shot messages to the views that exist, and refreshes its synced state only when
    it is displayed itself, through IPython's display protocol (`_repr_mimebundle_`); nested in a container it never
    is. Plotly has no other public way to refresh it, so the explorer calls that protocol method: the contract IPython
    relies on, rather than the private traits it writes (their names change between plotly releases). The views
    ignore the state change (no redraw); it costs the transfer.
    """
    fig._repr_mimebundle_()


class Explorer:
    """Widgets over the recorded datasets under `runs_dir`; `widget` is the UI, `set_frame(i)` moves the slider.
    `skipped` maps each file not shown to the reason."""

    def __init__(self, runs_dir: str | Path = "data/runs", episodes_dir: str | Path = EPISODES_DIR) -> None:
        runs_dir = Path(runs_dir)
        if not runs_dir.is_absolute() and not runs_dir.exists() and (REPO_ROOT / runs_dir).exists():
            runs_dir = REPO_ROOT / runs_dir  # e.g. "data/runs" from a kernel started in notebooks/
        self.runs_dir, self.episodes_dir = runs_dir, Path(episodes_dir)
        found = find_datasets(runs_dir)
        self.skipped = {p: why for p in found if (why := probe(p))}
        self.paths = [p for p in found if p not in self.skipped]
        if not self.paths:
            raise NoDatasetsError(f"no readable recording under {runs_dir}: " + self._skipped_text(html=False))
        self._images: dict[tuple, str] = {}
        self._episodes: dict[str, object] = {}
        self.ds: xr.Dataset | None = None
        self.path: Path | None = None
        self._ready = False
        self._chunk_traces: list[tuple[int, str, int]] = []  # (trace, variable, action dim) redrawn per frame
        self._make_widgets()
        self.load(self.paths[0])

    def _make_widgets(self) -> None:
        self.dataset = widgets.Dropdown(options=[(str(p.relative_to(self.runs_dir)), p) for p in self.paths],
                                        description="dataset", layout=widgets.Layout(width="460px"))
        self.slider = widgets.IntSlider(0, 0, 0, description="frame", continuous_update=False,
                                        layout=widgets.Layout(width="640px"))
        self.play = widgets.Play(interval=500, description="play")
        widgets.jslink((self.play, "value"), (self.slider, "value"))
        self.overlay = widgets.ToggleButtons(options=OVERLAYS, value="reuse", style={"button_width": "80px"},
                                             tooltips=["reused patches", "frames since computed fresh",
                                                       "staleness + reused outlines", "no overlay"])
        def small() -> widgets.Layout:  # one each: `load` hides some of them
            return widgets.Layout(width="190px")

        self.camera = widgets.Dropdown(description="camera", layout=small())
        self.layer = widgets.Dropdown(description="LLM layer", layout=small())
        self.head = widgets.Dropdown(description="head", layout=small())
        self.metric = widgets.Dropdown(options=["cosine", "rel_l2"], description="drift", layout=small())
        self.curves = widgets.Dropdown(options=FLOW_CURVES, description="curves", layout=small())
        self.info, self.skipped_note = widgets.HTML(), widgets.HTML(self._skipped_text())
        self.figure = make_figure()
        for w, cls in [(self.dataset, "dcvla-dataset"), (self.slider, "dcvla-frame-slider"), (self.overlay, "dcvla-overlay"),
                       (self.camera, "dcvla-camera"), (self.figure, "dcvla-frame-image"), (self.info, "dcvla-info"),
                       (self.skipped_note, "dcvla-skipped")]:
            w.add_class(cls)
        self.widget = widgets.VBox([
            widgets.HBox([self.dataset, self.overlay]), self.skipped_note, widgets.HBox([self.play, self.slider]),
            widgets.HBox([self.camera, self.layer, self.head, self.metric, self.curves]), self.info, self.figure])
        self.widget.add_class("dcvla-explorer")
        self.dataset.observe(lambda change: change.new != self.path and self.load(change.new), "value")
        for w in (self.slider, self.overlay, self.camera, self.layer, self.head):
            w.observe(lambda _: self._update_frame(), "value")
        for w in (self.metric, self.curves):
            w.observe(lambda _: self._draw_curves(), "value")

    def _skipped_text(self, html: bool = True) -> str:
        lines = [f"{p.relative_to(self.runs_dir)}: {why}" for p, why in self.skipped.items()]
        if not html or not lines:
            return "; ".join(lines)
        items = "".join(f"<li>{line}</li>" for line in lines)
        return f"<details><summary>{len(lines)} file(s) not shown</summary><ul>{items}</ul></details>"

    # ------------------------------------------------------------------------------------------------ datasets
    @property
    def frame(self) -> int:
        return int(self.slider.value)

    def load(self, path: str | Path) -> None:
        """Show the dataset at `path` (one of `self.paths`) from its first frame."""
        try:
            ds = open_recording(path)
        except (CorruptFileError, OSError) as err:  # changed on disk since the probe: list it, keep the current one
            self.skipped[Path(path)] = f"unreadable ({err})"
            self.skipped_note.value = self._skipped_text()
            if self.path is None:
                raise
            self.dataset.value = self.path
            return
        self.path, self.ds, flow = Path(path), ds, is_flow(ds)
        self._ready = False  # one redraw at the end, not one per widget change
        self.slider.value, self.slider.max = 0, max(ds.sizes["frame"] - 1, 0)
        self.play.max = self.slider.max
        cameras = list(FLOW_CAMERAS) if flow else json.loads(ds.attrs.get("images", '["image"]'))
        self.camera.options, self.camera.value = [(name, i) for i, name in enumerate(cameras)], 0
        self.camera.disabled = len(cameras) == 1
        # LLM layers with attention (the layer dim is padded to the deepest tower with NaN)
        layers = ds.layer.values[ds.text_to_vision.isel(frame=0).notnull().any(("head", "patch")).values] \
            if "text_to_vision" in ds else []
        if len(layers):
            self.layer.options, self.head.options = [int(v) for v in layers], ["mean", *range(ds.sizes["head"])]
            self.layer.value, self.head.value = int(layers[-1]), "mean"
        else:
            self.layer.options, self.head.options = [], []
        for w, shown in [(self.overlay, not flow), (self.layer, len(layers) > 0), (self.head, len(layers) > 0),
                         (self.metric, not flow), (self.curves, flow)]:
            w.layout.display = None if shown else "none"
        with self.figure.batch_update():
            configure_axes(self.figure, ds)
        if self.dataset.value != self.path:
            self.dataset.value = self.path
        self._ready = True
        self._draw_curves()

    def _episode_frame(self, index: int) -> tuple[str | None, str]:
        """(PNG data URI of what the policy saw at run frame `index` from the chosen camera, or None; a note when
        unavailable)."""
        ds, camera = self.ds, int(self.camera.value or 0)
        name = str(ds.attrs.get("episode", ""))
        if not name:
            return None, "no `episode` label: image unavailable"
        m = re.fullmatch(r"(?P<suite>[^/]+)/task(?P<task>\d+)/init(?P<init>\d+)", name)
        path = episode_path(self.episodes_dir, m["suite"], int(m["task"]), int(m["init"])) if m else None
        if path is None or not path.exists():
            return None, f"episode {name} not in {self.episodes_dir}"
        crop = bool(int(ds.attrs.get("center_crop", 1)))
        frame = int(ds.frame.values[index]) * int(ds.attrs.get("frame_stride", 1)) + int(ds.attrs.get("start_frame", 0))
        key = (str(path), crop, camera, frame)
        if key not in self._images:
            ep = self._episodes.get(str(path)) or self._episodes.setdefault(str(path), load_episode(path))
            jpegs = ep.jpegs if camera == 0 else ep.wrist_jpegs
            if jpegs is None:
                return None, f"episode {name} has no wrist view"
            if not 0 <= frame < len(jpegs):
                return None, f"episode {name} has no frame {frame}"
            self._images[key] = png_uri(protocol.policy_input(protocol.decode_frame(jpegs[frame]), crop=crop))
        return self._images[key], ""

    # ------------------------------------------------------------------------------------------------ drawing
    def set_frame(self, i: int) -> None:
        """Move to frame index `i` (0 .. number of frames - 1) and redraw."""
        if not 0 <= int(i) <= self.slider.max:
            raise IndexError(f"frame {i} out of range: {self.path.name} has frames 0..{self.slider.max}")
        self.slider.value = int(i)

    def _update_frame(self) -> None:
        """Redraw what depends on the frame: image, overlay, the top-right map, chunk actions, frame lines, info."""
        if self.ds is None or not self._ready:
            return
        ds, i, fig = self.ds, self.frame, self.figure
        at, x = ds.isel(frame=i), int(ds.frame.values[i])
        source, note = self._episode_frame(i)
        with fig.batch_update():
            fig.data[IMAGE].source = source or png_uri(np.full((SIZE, SIZE, 3), 128))
            title, bits = draw_flow_frame(fig, ds, at) if is_flow(ds) else self._draw_patch_frame(at)
            fig.layout.annotations[0].text = f"frame {x}: {title}" + (f" ({note})" if note else "")
            for trace, var, k in self._chunk_traces:
                fig.data[trace].y = at[var].values[:, k]
            fig.layout.shapes = frame_lines(ds, x, not self._chunk_traces, self.curves.value)
        _publish(fig)
        head = [f"<b>{ds.attrs.get('method', '?')}</b> ({ds.attrs.get('preset', '?')}, {ds.attrs.get('family', 'openvla')})",
                *(f"{k}={ds.attrs[k]}" for k in ("suite", "task", "episode") if k in ds.attrs),
                f"frame {x} ({i + 1} of {ds.sizes['frame']})"]
        self.info.value = " &middot; ".join(head + bits)

    def _patches(self, values: np.ndarray) -> np.ndarray:
        """The chosen camera's patches of a per-patch array (OFT: patch p of image i at p + i * patches_per_image)."""
        n, camera = self._patches_per_image(), int(self.camera.value or 0)
        return values[..., camera * n:(camera + 1) * n]

    def _patches_per_image(self) -> int:
        """The recording's patches per image (OpenVLA: 256; oft-micro's 8 x 8 grid: 64)."""
        return int(self.ds.attrs.get("patches_per_image", GRID * GRID))

    def _draw_patch_frame(self, at: xr.Dataset) -> tuple[str, list[str]]:
        """OpenVLA / OFT at one frame: the chosen camera's reuse or staleness, text-to-vision attention of the chosen
        layer and head. Returns the image panel's title and the info line's facts."""
        ds, fig = self.ds, self.figure
        n = self._patches_per_image()
        reuse = self._patches(at.reuse.values).astype(bool) if "reuse" in ds else np.zeros(n, bool)
        stale = self._patches(at.staleness.values).astype(float) if "staleness" in ds else np.full(n, np.nan)
        draw_patches(fig, ds, reuse, stale, self.overlay.value)
        if "text_to_vision" in ds and self.layer.value is not None:
            t2v = at.text_to_vision.sel(layer=self.layer.value).astype(float)
            z = t2v.mean("head") if self.head.value in ("mean", None) else t2v.isel(head=int(self.head.value))
            fig.data[HEAT].z = grid(self._patches(z.values))
            fig.layout.annotations[1].text = f"text-to-vision attention, LLM layer {self.layer.value}, head {self.head.value}"
        else:
            fig.data[HEAT].z = EMPTY
            fig.layout.annotations[1].text = "text-to-vision attention not recorded"
        bits = ["keyframe" if bool(at.keyframe) else "cached frame"] if "keyframe" in ds else []
        bits.append(f"reused {int(reuse.sum())}/{reuse.size} patches of {self.camera.label}")
        if "staleness" in ds:
            bits.append(f"max staleness {int(np.nanmax(stale))}")
        return self.overlay.value, bits + [f"{v} {float(at[v]):.3g}" for v in ("logit_kl", "chunk_l1") if v in ds]

    def _draw_curves(self) -> None:
        """Curves over all frames and the action traces (on dataset or menu change), then the frame's panels."""
        if self.ds is None or not self._ready:
            return
        ds, fig = self.ds, self.figure
        with fig.batch_update():
            fig.data = fig.data[: HEAT + 1]
            fig.layout.annotations[2].text = (flow_curves(fig, ds, self.curves.value) if is_flow(ds)
                                              else drift_curves(fig, ds, self.metric.value))
            fig.layout.annotations[3].text, self._chunk_traces = action_traces(fig, ds)
        self._update_frame()

    def _ipython_display_(self) -> None:  # `Explorer(...)` as a cell's last line shows the UI
        from IPython.display import display

        display(self.widget)
