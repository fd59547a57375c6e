"""The explorer's figure (`dcvla.explorer`): one plotly FigureWidget of four panels, and what each kind of recording
draws in them. Functions here only draw; the widgets and datasets live in `dcvla.explorer`.

Panels: top left the frame the policy saw (trace IMAGE) with a per-patch overlay (OVERLAY, outlines REUSED); top
right a heat map (HEAT: OpenVLA's text-to-vision attention over the patch grid, or a flow recording's K/V reuse per
span and prefix layer); bottom left curves over frames; bottom right the actions.
"""

from __future__ import annotations

import base64
import io
import math

import numpy as np
import plotly.graph_objects as go
import xarray as xr
from PIL import Image
from plotly.subplots import make_subplots

from . import accessor  # noqa: F401  (registers ds.dcvla)

GRID, SIZE = 16, 224  # OpenVLA: 256 patches of 14x14 px on the 224x224 policy image (oft-micro: 8 x 8 of 28 px)
IMAGE, OVERLAY, REUSED, HEAT = range(4)  # fixed traces; curves and actions follow
DRIFTS = ("q_drift", "k_drift", "v_drift")
DASH = {"dino": "dot", "siglip": "dash", "llm": "solid"}
COLOR = {"q_drift": "#636efa", "k_drift": "#ef553b", "v_drift": "#00cc96"}
COLORS = ["#636efa", "#ef553b", "#00cc96", "#ab63fa", "#ffa15a", "#19d3f3", "#ff6692"]
FLOW_CURVES = ("gate", "staleness", "drift")  # what the bottom-left panel of a flow recording shows
LINE = dict(color="black", width=1, dash="dot")
NO_DRIFT = "drift not recorded (record with drift=True)"


def png_uri(image: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(np.asarray(image, np.uint8)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def grid(values: np.ndarray) -> list[list]:
    """[256] -> 16x16 nested lists (any square count: its grid), NaN as None (transparent in plotly, valid JSON)."""
    z = np.asarray(values, float)
    side = math.isqrt(z.size)
    if side * side != z.size:
        raise ValueError(f"{z.size} patch values do not make a square grid")
    return [[None if np.isnan(v) else float(v) for v in row] for row in z.reshape(side, side)]


def centers(n: int) -> list[float]:
    """Pixel centres of the rows (columns) of a grid of `n` patches on the SIZE x SIZE image."""
    side = math.isqrt(n)
    return [SIZE / side * (i + 0.5) for i in range(side)]


EMPTY = grid(np.full(GRID * GRID, np.nan))


def is_flow(ds: xr.Dataset) -> bool:
    """A pi0 / pi0.5 / SmolVLA recording (`dcvla.flow_record`: reuse per span), not OpenVLA's per patch."""
    return "span_reuse" in ds


def make_figure() -> go.FigureWidget:
    fig = make_subplots(rows=2, cols=2, row_heights=[0.58, 0.42], horizontal_spacing=0.12, vertical_spacing=0.1,
                        subplot_titles=["frame", "map", "curves", "action"])  # each retitled per dataset
    fig.add_trace(go.Image(source=png_uri(np.zeros((SIZE, SIZE, 3))), x0=0, y0=0, dx=1, dy=1, hoverinfo="skip"), 1, 1)
    fig.add_trace(go.Heatmap(x=centers(GRID * GRID), y=centers(GRID * GRID), z=EMPTY, opacity=0.5, name="overlay", colorbar=dict(x=0.44, y=0.79, len=0.5),
                             hovertemplate="x %{x} y %{y}: %{z}<extra></extra>"), 1, 1)
    fig.add_trace(go.Scatter(x=[], y=[], mode="markers", name="reused", showlegend=False, hoverinfo="skip",
                             marker=dict(symbol="square-open", size=9, color="white", line=dict(width=1))), 1, 1)
    fig.add_trace(go.Heatmap(z=EMPTY, colorscale="Viridis", colorbar=dict(x=1.0, y=0.79, len=0.5),
                             hovertemplate="%{y} %{x}: %{z:.3g}<extra></extra>"), 1, 2)
    fig.update_xaxes(visible=False, range=[0, SIZE], row=1, col=1)
    fig.update_yaxes(visible=False, range=[SIZE, 0], scaleanchor="x", row=1, col=1)
    fig.update_yaxes(autorange="reversed", constrain="domain", row=1, col=2)
    fig.update_xaxes(title_text="frame", row=2, col=1)
    legend = dict(y=0.37, yanchor="top", xanchor="left", font=dict(size=10))  # beside the bottom panels
    fig.update_layout(width=1100, height=900, margin=dict(l=40, r=80, t=40, b=40), template="plotly_white",
                      legend=dict(legend, x=0.45), legend2=dict(legend, x=1.01))
    return go.FigureWidget(fig)


def configure_axes(fig: go.FigureWidget, ds: xr.Dataset) -> None:
    """The top-right panel: OpenVLA's attention over the patch grid, or a flow recording's span x layer map."""
    heat = fig.data[HEAT]
    if is_flow(ds):
        heat.update(x=list(range(ds.sizes["layer"])), y=[str(s) for s in ds.span.values], zmin=0, zmax=1,
                    colorscale=[[0, "#eeeeee"], [1, "#1f77b4"]], showscale=False)
        fig.update_xaxes(visible=True, title_text="prefix layer", dtick=1, row=1, col=2)
        fig.update_yaxes(visible=True, scaleanchor=None, row=1, col=2)
    else:
        heat.update(x=None, y=None, zmin=None, zmax=None, colorscale="Viridis", showscale=True)
        fig.update_xaxes(visible=False, title_text=None, dtick=None, constrain="domain", row=1, col=2)
        fig.update_yaxes(visible=False, scaleanchor="x2", row=1, col=2)


def draw_patches(fig: go.FigureWidget, ds: xr.Dataset, reuse: np.ndarray, stale: np.ndarray, mode: str) -> None:
    """OpenVLA / OFT: one image's reuse mask ([256] bool) or staleness ([256]) over its patches, as `mode` says
    (reuse, staleness, both: staleness with the reused patches outlined, none)."""
    heat, at = fig.data[OVERLAY], centers(reuse.size)
    heat.update(x=at, y=at)
    if mode == "reuse":
        heat.update(z=grid(np.where(reuse, 1.0, np.nan)), zmin=0, zmax=1, showscale=False,
                    colorscale=[[0, "#1f77b4"], [1, "#1f77b4"]])
    elif mode in ("staleness", "both"):
        smax = float(np.nanmax(ds.staleness.values)) if "staleness" in ds else 1.0
        heat.update(z=grid(np.where(stale > 0, stale, np.nan)), zmin=0, zmax=max(smax, 1.0), showscale=True,
                    colorscale="YlOrRd")
    else:
        heat.update(z=EMPTY, showscale=False)
    rows, cols = np.divmod(np.flatnonzero(reuse if mode == "both" else np.zeros_like(reuse)), len(at))
    fig.data[REUSED].update(x=[at[c] for c in cols], y=[at[r] for r in rows])


def draw_flow_frame(fig: go.FigureWidget, ds: xr.Dataset, at: xr.Dataset) -> tuple[str, list[str]]:
    """pi0 / pi0.5 / SmolVLA at one inference: which spans' K/V were reused per layer. Returns the image panel's title
    (the gate's decision) and the info line's facts (similarities, staleness, drift)."""
    fig.data[OVERLAY].update(z=EMPTY, showscale=False)
    fig.data[REUSED].update(x=[], y=[])
    fig.data[HEAT].z = at.span_reuse.values.astype(float).tolist()
    fig.layout.annotations[1].text = f"K/V reused per span and prefix layer ({float(at.reuse_fraction):.0%} of the prefix)"
    gate = "gate open: reused" if bool(at.gate) else "gate closed: computed fresh"
    bits = [f"vision similarity {float(at.vision_similarity):.4f}", f"state similarity {float(at.state_similarity):.4f}",
            f"pixel change {float(at.pixel_change):.3f}"]
    bits += [f"staleness {span} {int(v)}" for span, v in zip(ds.span.values, at.staleness.values)] if "staleness" in ds else []
    bits += [f"action drift {float(at.action_drift):.3g}"] if "action_drift" in ds else []
    return gate, bits


def frame_lines(ds: xr.Dataset, x: float, over_frames: bool, curves: str) -> list[dict]:
    """Dotted lines at frame `x` on the bottom-left panel (and the bottom-right one when it plots over frames), and a
    flow recording's gate threshold across its similarity curves."""
    axes = ("x3", "x4") if over_frames else ("x3",)
    shapes = [dict(type="line", xref=ax, yref=f"{ax.replace('x', 'y')} domain", x0=x, x1=x, y0=0, y1=1, line=LINE)
              for ax in axes]
    if is_flow(ds) and curves == "gate" and "threshold" in ds.attrs:
        y = float(ds.attrs["threshold"])
        shapes.append(dict(type="line", xref="x3 domain", yref="y3", x0=0, x1=1, y0=y, y1=y, line=dict(LINE, color="gray")))
    return shapes


def drift_curves(fig: go.FigureWidget, ds: xr.Dataset, metric: str) -> str:
    """OpenVLA: Q/K/V drift per tower over frames (mean over the tower's layers and the patches). Returns the title."""
    present = [v for v in DRIFTS if v in ds]
    mask = ds.dcvla.layer_mask() if present else None
    for var in present:
        for tower in ds.tower.values:
            d = ds[var].sel(tower=tower, metric=metric).astype(float).where(mask.sel(tower=tower))
            fig.add_scatter(x=ds.frame.values, y=d.mean(("layer", "patch")).values, mode="lines+markers",
                            name=f"{var[0]} {tower}", line=dict(color=COLOR[var], dash=DASH.get(str(tower))),
                            legend="legend", row=2, col=1)
    return f"Q/K/V drift, {metric} (mean over layers, patches)" if present else NO_DRIFT


def flow_curves(fig: go.FigureWidget, ds: xr.Dataset, what: str) -> str:
    """pi0 / pi0.5 / SmolVLA over inferences: the gate ("gate": similarities, where it opened), each span's staleness,
    or the drift to the no-reuse shadow ("drift"). Returns the title."""
    def add(y, name, **kw):
        fig.add_scatter(x=ds.frame.values, y=np.asarray(y, float), name=name, legend="legend", row=2, col=1, **kw)

    if what == "gate":
        add(ds.vision_similarity, "vision similarity", mode="lines", line=dict(color=COLORS[0]))
        add(ds.state_similarity, "state similarity", mode="lines", line=dict(color=COLORS[1]))
        add(np.where(ds.gate.values.astype(bool), ds.vision_similarity, np.nan), "gate open", mode="markers",
            marker=dict(color=COLORS[2], size=9, symbol="circle-open"))
        return f"gate ({ds.attrs.get('gate', '?')}, threshold {ds.attrs.get('threshold', '?')}) and similarities"
    if what == "staleness":
        for k, span in enumerate(ds.span.values):
            add(ds.staleness.sel(span=span), str(span), mode="lines+markers", line=dict(color=COLORS[k]))
        return "staleness per span (inferences since its K/V were computed)"
    if "action_drift" not in ds:
        return NO_DRIFT
    add(ds.action_drift, "action drift", mode="lines+markers", line=dict(color="black"))
    for k, span in enumerate(ds.span.values):
        for var, dash in (("k_drift", "solid"), ("v_drift", "dash")):
            add(ds[var].sel(span=span, metric="rel_l2").mean("layer"), f"{var[0]} {span}", mode="lines",
                line=dict(color=COLORS[k], dash=dash))
    return "drift to no reuse: action L2, K/V rel. L2 (layer mean)"


def action_traces(fig: go.FigureWidget, ds: xr.Dataset) -> tuple[str, list[tuple[int, str, int]]]:
    """The actions, solid, against the reference's, dashed: over frames (OpenVLA), or the chunk at the current frame
    (OFT, flow). Returns the title and, for a chunk, (trace, variable, action dim) of each trace to redraw per frame."""
    if "action" not in ds:
        return "action not recorded", []
    chunked, per_frame = ds.action.ndim == 3, []
    x = np.arange(ds.action.shape[1]) if chunked else ds.frame.values
    for k in range(ds.sizes["action_dim"]):
        for var, dash in (("action", None), ("action_ref", "dash")):
            if var not in ds:
                continue
            y = ds[var].values[0, :, k] if chunked else ds[var].values[:, k]
            fig.add_scatter(x=x, y=y, mode="lines", name=f"a{k}" + (" ref" if dash else ""), legendgroup=f"a{k}",
                            showlegend=not dash, line=dict(color=COLORS[k % len(COLORS)], dash=dash), legend="legend2",
                            row=2, col=2)
            if chunked:
                per_frame.append((len(fig.data) - 1, var, k))
    fig.update_xaxes(title_text="chunk step" if chunked else "frame", row=2, col=2)
    ref = "no-reuse shadow" if is_flow(ds) else "full recompute"
    return f"action {'chunk at this frame ' if chunked else ''}(solid) vs {ref} (dashed)", per_frame
