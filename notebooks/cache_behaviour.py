# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Cache behaviour
#
# How much each method reuses, where and when: reuse rate per suite, task, frame and layer, the reuse mask over
# the image, staleness distributions, and the FLOPs and measured latency saved per tower. Every method streams the
# same shipped LIBERO frames; the vanilla run on those frames is the reference.
#
# **How speed is measured.** Each (method, episode) is recorded on its own, one after another, so the recordings'
# `latency_ms` carry whatever load the machine had at that moment: their ratios are not a speedup. The speed
# columns come from a separate timing unit per episode that steps every method on the same frames in one process,
# interleaved frame by frame in a rotating order (`dcvla.timing`, no recorder attached, after a short warm-up):
# `speedup (interleaved, median)` is the median over frames of the paired latency ratio vanilla / method,
# `speedup (interleaved, total)` the ratio of total times over the same frames (comparable to the FLOPs ratio, the
# ideal). The line printed under the table says how many frames, on which device and dtype.

# %% tags=["parameters"]
preset = "oft-micro-goal"  # a shipped micro policy (trained: OpenVLA-OFT's architecture on libero_goal task 8), or
                           # a preset with random weights: openvla-micro, small, tiny; OpenVLA-OFT: oft-micro, oft-small
checkpoint = ""           # OpenVLA or OpenVLA-OFT checkpoint dir or hub id, e.g. openvla/openvla-7b-finetuned-libero-spatial
unnorm_key = ""           # dataset statistics of the checkpoint (empty: its only one)
seed = 0                  # weights seed of the random preset
device = "cpu"            # "cuda" on a GPU machine
dtype = "float32"         # "bfloat16" for openvla-7b on a GPU
runs_dir = "data/runs"    # recorded datasets (one netCDF per method and episode); tables go to its parent
figures_dir = "figures"
methods = ["vanilla", "vla_cache", "ttf", "ttf_vla_cache", "dual_cache"]
suites = ["libero_spatial", "libero_object", "libero_goal", "libero_10"]
episodes_per_suite = 0    # 0: every shipped episode of each suite
episodes_dir = ""         # a folder of recorded episodes (scripts/record_episodes.py); empty: the shipped ones
frames = 5                # frames per episode from its start (0: whole episode)
drift = False             # shadow recompute for Q/K/V drift (doubles the cost)

# %%
import math
import numpy as np, pandas as pd, plotly.express as px, plotly.graph_objects as go
from dcvla.studies import cache_behaviour, common, speed
config = common.StudyConfig.from_parameters(globals())
base = common.base_policy(config)
figures = []

# %%
runs = common.load_runs(common.record_runs("cache_behaviour", config, base=base))
timings = cache_behaviour.time_runs(config, base=base)
table = cache_behaviour.summary(runs, timings)
common.write_table(table, "cache_behaviour", config)
print(table.attrs["speed"])
table.round(3)

# %% [markdown]
# ## Reuse per suite, task and frame

# %%
per_run = pd.DataFrame([{"method": ds.attrs["method"], "suite": str(ds.suite.item()), "task": int(ds.task.item()),
                         "mask reuse": float(ds.reuse.mean()), "LLM reuse": ds.dcvla.llm_reuse_rate()}
                        for ds in runs])
fig = px.bar(per_run.groupby(["suite", "method"], as_index=False).mean(numeric_only=True), x="suite", y="LLM reuse",
             color="method", barmode="group", title="Share of vision tokens whose LLM K/V came from the cache")
figures.append(common.save_figure(fig, "cache_behaviour_reuse_by_suite", config.figures_dir)); fig

# %%
per_frame = pd.DataFrame([{"method": ds.attrs["method"], "episode": str(ds.episode.item()), "frame": int(f),
                           "reuse": float(ds.reuse.sel(frame=f).mean())} for ds in runs for f in ds.frame.values])
px.line(per_frame, x="frame", y="reuse", color="method", line_dash="episode", title="Reuse mask share per frame")

# %%
by_layer = pd.concat([ds.dcvla.reuse_rate_by_layer().to_dataframe("reuse").reset_index().assign(method=ds.attrs["method"])
                      for ds in runs]).groupby(["method", "tower", "layer"], as_index=False)["reuse"].mean()
fig = px.line(by_layer.dropna(), x="layer", y="reuse", color="method", facet_col="tower", title="Reuse by layer")
figures.append(common.save_figure(fig, "cache_behaviour_reuse_by_layer", config.figures_dir)); fig

# %% [markdown]
# ## The mask over the image

# %%
chosen = next(ds for ds in runs if ds.attrs["method"] == "dual_cache") if "dual_cache" in config.methods else runs[-1]
frame = int(chosen.frame[~chosen.keyframe.values][0]) if (~chosen.keyframe).any() else 0
episode = next(e for e in common.episodes(config) if e.name == str(chosen.episode.item()))
images = common.episode_inputs(base, episode, frame + 1)[0][frame]  # OpenVLA-OFT: [agent view, wrist view]
images = images if images.ndim == 4 else images[None]
image = np.concatenate(list(images), axis=1)  # the images side by side; a square grid of patches each
grid = math.isqrt(int(chosen.attrs["patches_per_image"]))  # 16 x 16 of 14 px (OpenVLA), 8 x 8 of 28 px (oft-micro)
cell = images.shape[1] / grid
mask = np.concatenate(list(chosen.reuse.sel(frame=frame).values.reshape(len(images), grid, grid)), axis=1)
fig = go.Figure([go.Image(z=image), go.Heatmap(z=np.where(mask, 1.0, np.nan), x=(np.arange(grid * len(images)) + 0.5) * cell,
                 y=(np.arange(grid) + 0.5) * cell, opacity=0.45, showscale=False, colorscale=[[0, "royalblue"], [1, "royalblue"]])])
fig.update_layout(title=f"{chosen.attrs['method']}: reused patches (blue), {episode.name} frame {frame}",
                  width=120 + 400 * len(images), height=520)
figures.append(common.save_figure(fig, "cache_behaviour_mask", config.figures_dir)); fig

# %% [markdown]
# ## Staleness, FLOPs and latency per tower
#
# The measured bars are the per-stage times of the interleaved timings (each policy's own stage clock), not of the
# recordings.

# %%
stale = pd.DataFrame([{"method": ds.attrs["method"], "staleness": int(v)} for ds in runs for v in ds.staleness.values.ravel()])
px.histogram(stale, x="staleness", color="method", barmode="group", histnorm="probability",
             title="Frames since each patch was last computed fresh")

# %%
vanilla = {str(ds.episode.item()): ds for ds in runs if ds.attrs["method"] == "vanilla"}
saved = pd.DataFrame([{"method": ds.attrs["method"], "tower": tower,
                       "ratio": float(vanilla[str(ds.episode.item())].flops.sel(tower=tower).sum() / ds.flops.sel(tower=tower).sum())}
                      for ds in runs for tower in ("dino", "siglip", "llm")]).groupby(["method", "tower"], as_index=False).mean()
stages = speed.stage_ratios(timings, "vanilla")
stages = stages[~stages.stage.isin(["select", "projector"])]  # decode (OpenVLA) or head (OFT) stays
saved = pd.concat([saved, stages.assign(tower=stages.stage + " (measured)", ratio=stages["time ratio"])[["method", "tower", "ratio"]]])
fig = px.bar(saved, x="tower", y="ratio", color="method", barmode="group",
             title="Vanilla / method: FLOPs per tower, and time per stage measured interleaved (same frames)")
figures.append(common.save_figure(fig, "cache_behaviour_savings", config.figures_dir)); fig

# %%
print("\n".join(map(str, figures)))
