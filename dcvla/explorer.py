"""The interactive explorer: browse recorded datasets frame by frame (ipywidgets + plotly, Jupyter or Voila).

`Explorer(runs_dir).widget` is the whole UI: pick a dataset (`*.nc` under `runs_dir`, recursively), move the
frame slider, and see the episode frame that was recorded with the reuse mask and/or the staleness overlaid
per patch (16x16 grid of 14 px patches, row-major), the LLM's text-to-vision attention of one layer and head,
the Q/K/V drift per tower over frames and the action against the full recompute's (`action_ref`), each with a
line at the current frame. It only reads datasets; it never runs a model.

The image is the recorded episode's frame (label `episode`, e.g. "libero_spatial/task00/init00", looked up in
`data/episodes`), passed through `protocol.policy_input` as the policy saw it: center crop unless the run has
a `center_crop` label set to 0; frame `f` of the run is episode frame `f + start_frame` (label, default 0).

All four panels are subplots of ONE plotly FigureWidget: plotly's widget is an anywidget that ships its 5 MB
JS bundle with every instance, and anywidget gives each instance 2 s to load it or leaves it frozen; one
figure loads it once. Stable CSS classes for browser tests: dcvla-explorer, dcvla-dataset, dcvla-frame-slider,
dcvla-overlay, dcvla-frame-image (the figure; trace 1 is the overlay heat map), dcvla-info.
"""

from __future__ import annotations

import base64
import copy
import io
import re
from pathlib import Path

import ipywidgets as widgets
import numpy as np
import plotly.graph_objects as go
import xarray as xr
from PIL import Image
from plotly.subplots import make_subplots

from . import accessor  # noqa: F401  (registers ds.dcvla)
from .io import open_recording
from .libero import protocol
from .libero.episodes import DEFAULT_DIR as EPISODES_DIR
from .libero.episodes import episode_path, load_episode

GRID, PATCH_PX, SIZE = 16, 14, 224  # 256 patches of 14x14 px on the 224x224 policy image
CENTERS = [PATCH_PX * i + PATCH_PX / 2 for i in range(GRID)]
OVERLAYS = ("reuse", "staleness", "both", "none")
IMAGE, OVERLAY, REUSED, ATTENTION = range(4)  # fixed traces; drift and action curves follow
DRIFTS = ("q_drift", "k_drift", "v_drift")
DASH = {"dino": "dot", "siglip": "dash", "llm": "solid"}
COLOR = {"q_drift": "#636efa", "k_drift": "#ef553b", "v_drift": "#00cc96"}
ACTION_COLORS = ["#636efa", "#ef553b", "#00cc96", "#ab63fa", "#ffa15a", "#19d3f3", "#ff6692"]
REPO_ROOT = Path(__file__).resolve().parents[1]


class NoDatasetsError(FileNotFoundError):
    """The runs directory is missing or holds no recorded dataset."""


PI0_STUDIES = ("stability_cliff",)  # pi0 / pi0.5 recordings: another schema, plotted by their own notebook


def find_datasets(runs_dir: str | Path) -> list[Path]:
    """Recorded OpenVLA datasets (`*.nc`, recursively, skipping hidden/temporary files and the Pi0 studies'
    folders) under `runs_dir`, sorted."""
    runs_dir = Path(runs_dir)
    hint = ("record one with dcvla.recording.record_episode(policy, frames, instruction, path, drift=True, "
            "labels={'suite': ..., 'task': ..., 'episode': ep.name})")
    if not runs_dir.is_dir():
        raise NoDatasetsError(f"runs directory {runs_dir} does not exist; {hint}")
    found = sorted(p for p in runs_dir.rglob("*.nc")
                   if not any(part.startswith(".") or part in PI0_STUDIES for part in p.relative_to(runs_dir).parts))
    if not found:
        raise NoDatasetsError(f"no recorded datasets (*.nc) under {runs_dir}; {hint}")
    return found


def png_uri(image: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(np.asarray(image, np.uint8)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _grid(values: np.ndarray) -> list[list]:
    """[256] -> 16x16 nested lists, NaN as None (transparent in plotly, valid JSON)."""
    z = np.asarray(values, float).reshape(GRID, GRID)
    return [[None if np.isnan(v) else float(v) for v in row] for row in z]


def _sync(fig: go.FigureWidget) -> None:
    """Make the figure's synced widget state match its current data and layout.

    FigureWidget sends edits as one-shot messages to the views that exist, and refreshes the synced state (what a
    view created later starts from: Voila's page, a reload) only when the figure itself is displayed; nested in a
    container it never is. The JS model ignores these state changes (no redraw), so this only costs the transfer.
    """
    fig._widget_data = copy.deepcopy(fig._data)
    fig._widget_layout = copy.deepcopy(fig._layout_obj._props)


class Explorer:
    """Widgets over the recorded datasets under `runs_dir`; `widget` is the UI, `set_frame(i)` moves the slider."""

    def __init__(self, runs_dir: str | Path = "data/runs", episodes_dir: str | Path = EPISODES_DIR) -> None:
        runs_dir = Path(runs_dir)
        if not runs_dir.is_absolute() and not runs_dir.exists() and (REPO_ROOT / runs_dir).exists():
            runs_dir = REPO_ROOT / runs_dir  # e.g. "data/runs" from a kernel started in notebooks/
        self.runs_dir, self.episodes_dir = runs_dir, Path(episodes_dir)
        self.paths = find_datasets(runs_dir)
        self._images: dict[tuple[str, int], str] = {}
        self._episodes: dict[str, object] = {}
        self.ds: xr.Dataset | None = None
        self.path: Path | None = None
        self._ready = False

        self.dataset = widgets.Dropdown(options=[(str(p.relative_to(runs_dir)), p) for p in self.paths],
                                        description="dataset", layout=widgets.Layout(width="460px"))
        self.slider = widgets.IntSlider(0, 0, 0, description="frame", continuous_update=False,
                                        layout=widgets.Layout(width="640px"))
        self.play = widgets.Play(interval=500, description="play")
        widgets.jslink((self.play, "value"), (self.slider, "value"))
        self.overlay = widgets.ToggleButtons(options=OVERLAYS, value="reuse", style={"button_width": "80px"},
                                             tooltips=["reused patches", "frames since computed fresh",
                                                       "staleness + reused outlines", "no overlay"])
        small = widgets.Layout(width="170px")
        self.layer = widgets.Dropdown(description="LLM layer", layout=small)
        self.head = widgets.Dropdown(description="head", layout=small)
        self.metric = widgets.Dropdown(options=["cosine", "rel_l2"], description="drift", layout=small)
        self.info = widgets.HTML()
        self.figure = self._make_figure()

        for w, cls in [(self.dataset, "dcvla-dataset"), (self.slider, "dcvla-frame-slider"), (self.overlay, "dcvla-overlay"),
                       (self.figure, "dcvla-frame-image"), (self.info, "dcvla-info")]:
            w.add_class(cls)
        self.widget = widgets.VBox([
            widgets.HBox([self.dataset, self.overlay]), widgets.HBox([self.play, self.slider]),
            widgets.HBox([self.layer, self.head, self.metric]), self.info, self.figure])
        self.widget.add_class("dcvla-explorer")

        self.dataset.observe(lambda change: change.new != self.path and self.load(change.new), "value")
        self.slider.observe(lambda _: self._update_frame(), "value")
        self.overlay.observe(lambda _: self._update_frame(), "value")
        self.layer.observe(lambda _: self._update_frame(), "value")
        self.head.observe(lambda _: self._update_frame(), "value")
        self.metric.observe(lambda _: self._draw_curves(), "value")
        self.load(self.paths[0])

    @staticmethod
    def _make_figure() -> go.FigureWidget:
        fig = make_subplots(rows=2, cols=2, row_heights=[0.58, 0.42], horizontal_spacing=0.12, vertical_spacing=0.1,
                            subplot_titles=["frame", "text-to-vision attention", "Q/K/V drift (mean over layers, patches)",
                                            "action (solid) vs full recompute (dashed)"])
        empty = _grid(np.full(GRID * GRID, np.nan))
        fig.add_trace(go.Image(source=png_uri(np.zeros((SIZE, SIZE, 3))), x0=0, y0=0, dx=1, dy=1, hoverinfo="skip"), 1, 1)
        fig.add_trace(go.Heatmap(x=CENTERS, y=CENTERS, z=empty, opacity=0.5, name="overlay", colorbar=dict(x=0.44, y=0.79, len=0.5),
                                 hovertemplate="x %{x} y %{y}: %{z}<extra></extra>"), 1, 1)
        fig.add_trace(go.Scatter(x=[], y=[], mode="markers", name="reused", showlegend=False, hoverinfo="skip",
                                 marker=dict(symbol="square-open", size=9, color="white", line=dict(width=1))), 1, 1)
        fig.add_trace(go.Heatmap(z=empty, colorscale="Viridis", colorbar=dict(x=1.0, y=0.79, len=0.5),
                                 hovertemplate="row %{y} col %{x}: %{z:.3g}<extra></extra>"), 1, 2)
        fig.update_xaxes(visible=False, range=[0, SIZE], row=1, col=1)
        fig.update_yaxes(visible=False, range=[SIZE, 0], scaleanchor="x", row=1, col=1)
        fig.update_xaxes(visible=False, constrain="domain", row=1, col=2)
        fig.update_yaxes(visible=False, autorange="reversed", scaleanchor="x2", constrain="domain", row=1, col=2)
        fig.update_xaxes(title_text="frame", row=2)
        legend = dict(y=0.37, yanchor="top", xanchor="left", font=dict(size=10))  # beside the bottom panels
        fig.update_layout(width=1100, height=900, margin=dict(l=40, r=80, t=40, b=40), template="plotly_white",
                          legend=dict(legend, x=0.45), legend2=dict(legend, x=1.01))
        return go.FigureWidget(fig)

    # ------------------------------------------------------------------------------------------------ datasets
    @property
    def frame(self) -> int:
        return int(self.slider.value)

    def load(self, path: str | Path) -> None:
        """Show the dataset at `path` (one of `self.paths`) from its first frame."""
        self.path, self.ds = Path(path), open_recording(path)
        self._ready = False  # one redraw at the end, not one per widget change
        self.slider.value, self.slider.max = 0, max(self.ds.sizes["frame"] - 1, 0)
        self.play.max = self.slider.max
        # LLM layers with attention (the layer dim is padded to the deepest tower with NaN)
        layers = self.ds.layer.values[self.ds.text_to_vision.isel(frame=0).notnull().any(("head", "patch")).values] \
            if "text_to_vision" in self.ds else []
        if len(layers):
            self.layer.options, self.head.options = [int(v) for v in layers], ["mean", *range(self.ds.sizes["head"])]
            self.layer.value, self.head.value = int(layers[-1]), "mean"
        else:
            self.layer.options, self.head.options = [], []
        if self.dataset.value != self.path:
            self.dataset.value = self.path
        self._ready = True
        self._draw_curves()

    def _episode_frame(self, index: int) -> tuple[str | None, str]:
        """(PNG data URI of what the policy saw at run frame `index`, or None; a note when unavailable)."""
        name = str(self.ds.attrs.get("episode", ""))
        if not name:
            return None, "no `episode` label: image unavailable"
        m = re.fullmatch(r"(?P<suite>[^/]+)/task(?P<task>\d+)/init(?P<init>\d+)", name)
        path = episode_path(self.episodes_dir, m["suite"], int(m["task"]), int(m["init"])) if m else None
        if path is None or not path.exists():
            return None, f"episode {name} not in {self.episodes_dir}"
        crop = bool(int(self.ds.attrs.get("center_crop", 1)))
        frame = int(self.ds.frame.values[index]) + int(self.ds.attrs.get("start_frame", 0))
        key = (f"{path}:{crop}", frame)
        if key not in self._images:
            ep = self._episodes.get(str(path)) or self._episodes.setdefault(str(path), load_episode(path))
            if not 0 <= frame < len(ep):
                return None, f"episode {name} has no frame {frame}"
            self._images[key] = png_uri(protocol.policy_input(protocol.decode_frame(ep.jpegs[frame]), crop=crop))
        return self._images[key], ""

    # ------------------------------------------------------------------------------------------------ drawing
    def set_frame(self, i: int) -> None:
        """Move to frame index `i` (0 .. number of frames - 1) and redraw."""
        if not 0 <= int(i) <= self.slider.max:
            raise IndexError(f"frame {i} out of range: {self.path.name} has frames 0..{self.slider.max}")
        self.slider.value = int(i)

    def _update_frame(self) -> None:
        """Redraw what depends on the frame: image, overlay, attention, frame lines, info line."""
        if self.ds is None or not self._ready:
            return
        ds, i, mode, fig = self.ds, self.frame, self.overlay.value, self.figure
        at = ds.isel(frame=i)
        x = int(ds.frame.values[i])
        source, note = self._episode_frame(i)
        reuse = at.reuse.values.astype(bool) if "reuse" in ds else np.zeros(GRID * GRID, bool)
        stale = at.staleness.values.astype(float) if "staleness" in ds else np.full(GRID * GRID, np.nan)
        with fig.batch_update():
            fig.data[IMAGE].source = source or png_uri(np.full((SIZE, SIZE, 3), 128))
            heat = fig.data[OVERLAY]
            if mode == "reuse":
                heat.update(z=_grid(np.where(reuse, 1.0, np.nan)), zmin=0, zmax=1, showscale=False,
                            colorscale=[[0, "#1f77b4"], [1, "#1f77b4"]])
            elif mode in ("staleness", "both"):
                smax = float(np.nanmax(ds.staleness.values)) if "staleness" in ds else 1.0
                heat.update(z=_grid(np.where(stale > 0, stale, np.nan)), zmin=0, zmax=max(smax, 1.0), showscale=True,
                            colorscale="YlOrRd")
            else:
                heat.update(z=_grid(np.full(GRID * GRID, np.nan)), showscale=False)
            rows, cols = np.divmod(np.flatnonzero(reuse if mode == "both" else np.zeros_like(reuse)), GRID)
            fig.data[REUSED].update(x=[CENTERS[c] for c in cols], y=[CENTERS[r] for r in rows])
            fig.layout.annotations[0].text = f"frame {x}: {mode}" + (f" ({note})" if note else "")
            attention = fig.data[ATTENTION]
            if "text_to_vision" in ds and self.layer.value is not None:
                t2v = at.text_to_vision.sel(layer=self.layer.value).astype(float)
                z = t2v.mean("head") if self.head.value in ("mean", None) else t2v.isel(head=int(self.head.value))
                attention.z = _grid(z.values)
                fig.layout.annotations[1].text = f"text-to-vision attention, LLM layer {self.layer.value}, head {self.head.value}"
            else:
                attention.z = _grid(np.full(GRID * GRID, np.nan))
                fig.layout.annotations[1].text = "text-to-vision attention not recorded"
            fig.layout.shapes = [dict(type="line", xref=ax, yref=f"{ax.replace('x', 'y')} domain", x0=x, x1=x, y0=0, y1=1,
                                      line=dict(color="black", width=1, dash="dot")) for ax in ("x3", "x4")]
        _sync(fig)
        bits = [f"<b>{ds.attrs.get('method', '?')}</b> ({ds.attrs.get('preset', '?')})",
                *(f"{k}={ds.attrs[k]}" for k in ("suite", "task", "episode") if k in ds.attrs),
                f"frame {x} ({i + 1} of {ds.sizes['frame']})"]
        if "keyframe" in ds:
            bits.append("keyframe" if bool(at.keyframe) else "cached frame")
        bits.append(f"reused {int(reuse.sum())}/{reuse.size} patches")
        if "staleness" in ds:
            bits.append(f"max staleness {int(np.nanmax(stale))}")
        if "logit_kl" in ds:
            bits.append(f"logit KL {float(at.logit_kl):.3g}")
        self.info.value = " &middot; ".join(bits)

    def _draw_curves(self) -> None:
        """Drift and action curves over all frames (on dataset or metric change), then the frame's panels."""
        if self.ds is None or not self._ready:
            return
        ds, fig, frames = self.ds, self.figure, self.ds.frame.values
        present = [v for v in DRIFTS if v in ds]
        with fig.batch_update():
            fig.data = fig.data[: ATTENTION + 1]
            mask = ds.dcvla.layer_mask() if present else None
            for var in present:
                for tower in ds.tower.values:
                    d = ds[var].sel(tower=tower, metric=self.metric.value).astype(float).where(mask.sel(tower=tower))
                    fig.add_scatter(x=frames, y=d.mean(("layer", "patch")).values, mode="lines+markers", name=f"{var[0]} {tower}",
                                    line=dict(color=COLOR[var], dash=DASH.get(str(tower))), legend="legend", row=2, col=1)
            for k in range(ds.sizes["action_dim"] if "action" in ds else 0):
                line = dict(color=ACTION_COLORS[k % len(ACTION_COLORS)])
                fig.add_scatter(x=frames, y=ds.action.values[:, k], mode="lines", name=f"a{k}", legendgroup=f"a{k}",
                                line=line, legend="legend2", row=2, col=2)
                if "action_ref" in ds:
                    fig.add_scatter(x=frames, y=ds.action_ref.values[:, k], mode="lines", name=f"a{k} ref", legendgroup=f"a{k}",
                                    showlegend=False, line=dict(line, dash="dash"), legend="legend2", row=2, col=2)
            fig.layout.annotations[2].text = (f"Q/K/V drift, {self.metric.value} (mean over layers, patches)" if present
                                              else "drift not recorded (record with drift=True)")
        self._update_frame()

    def _ipython_display_(self) -> None:  # `Explorer(...)` as a cell's last line shows the UI
        from IPython.display import display

        display(self.widget)
