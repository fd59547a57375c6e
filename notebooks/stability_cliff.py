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
# # Stability cliff: prefix K/V reuse in a Pi0-style policy
#
# The Pi0 report (seeds/004) gated prefix K/V reuse on the cosine similarity of consecutive steps' vision
# embeddings and saw success fall from 100% at threshold 0.985 to 22% at 0.98; reusing vision alone was far worse
# than reusing everything together (*consistency beats freshness*), and a gate that also asks the state to be
# similar (*synchronized*) was proposed. Here every mode x threshold streams the same shipped LIBERO frames and
# robot states (one inference every `replan_steps` frames, as openpi's LIBERO client) and is compared with the
# no-reuse run from the same noise: reuse rate, latency, Hz, action drift. The cliff is located from the data.
# Random weights: there is no success rate to measure (dcvla does not load Pi0 checkpoints yet), so the action
# drift stands in for it.

# %% tags=["parameters"]
preset = "small"          # small/tiny run the pi0-small/pi0-tiny presets (random weights); or a Pi0 preset name
seed = 0                  # weights seed; also seeds the flow noise, the same for every mode
device = "cpu"            # "cuda" on a GPU machine
dtype = "float32"
runs_dir = "data/runs"    # recorded datasets (one netCDF per mode, threshold and episode); tables go to its parent
figures_dir = "figures"
modes = ["full", "vision_only", "state_only", "text_fixed", "layer_wise", "synchronized"]
thresholds = [0.97, 0.98, 0.985, 0.99, 0.995]
suites = ["libero_spatial", "libero_object", "libero_goal", "libero_10"]
episodes_per_suite = 1    # shipped episodes per suite (0: all)
steps = 6                 # inferences per episode
replan_steps = 5          # frames between inferences (openpi executes 5 actions of each chunk)
compare_to = "previous"   # the gate compares with the previous step (the report), or with the "anchor" step

# %%
import numpy as np, pandas as pd, plotly.express as px
from dcvla.studies import common, stability_cliff
config = stability_cliff.CliffConfig.from_parameters(globals())
if globals().get("checkpoint"):
    print("checkpoint is an OpenVLA checkpoint; this study runs the random", config.pi0_preset(), "preset (no Pi0 loader yet)")
base = stability_cliff.pi0_base(config)
figures = []

# %%
runs = stability_cliff.load_cliff_runs(stability_cliff.record_cliff_runs(config, base=base))
table = stability_cliff.cliff_table(runs)
common.write_table(table, "stability_cliff", config)
table.round(4)

# %% [markdown]
# ## Reuse rate, speed and drift against the threshold

# %%
long = table.melt(id_vars=["mode", "threshold"], value_vars=["reuse rate", "speedup", "action drift"])
fig = px.line(long, x="threshold", y="value", color="mode", facet_col="variable", markers=True,
              title="Share of inferences reusing, measured speedup and action drift (to the no-reuse run, same noise)")
fig.update_yaxes(matches=None, showticklabels=True)
figures.append(common.save_figure(fig, "stability_cliff", config.figures_dir, width=1400)); fig

# %%
cliffs = stability_cliff.locate_cliff(table)
cliffs.round(4)

# %% [markdown]
# ## Consistency beats freshness?
#
# `full` against `vision_only` at the same gate (the same reuse rate).

# %%
h4 = stability_cliff.consistency_vs_freshness(table)
h4.round(4)

# %%
steps_table = []
for (mode, threshold, episode), ds in runs.items():
    if mode in ("full", "vision_only", "synchronized"):
        ref = runs[("none", None, episode)]
        drift = np.linalg.norm(ds.action.values - ref.action.values, axis=-1).mean(-1)
        steps_table += [{"mode": mode, "threshold": threshold, "staleness": int(s), "action drift": float(d)}
                        for s, d, g in zip(ds.staleness.sel(span="vision").values, drift, ds.gate.values) if g]
steps_table = pd.DataFrame(steps_table)
fig = px.box(steps_table, x="staleness", y="action drift", color="mode",
             title="Action drift of the inferences that reused, by the vision K/V's age (inferences)")
figures.append(common.save_figure(fig, "stability_cliff_staleness", config.figures_dir)); fig

# %% [markdown]
# ## What the gate sees: similarities of consecutive inferences

# %%
sims = pd.concat([pd.DataFrame({"vision": ds.vision_similarity.values, "state": ds.state_similarity.values}).assign(episode=episode)
                  for (mode, _, episode), ds in runs.items() if mode == "none"]).melt(id_vars="episode", var_name="embedding",
                                                                                   value_name="cosine similarity").dropna()
fig = px.histogram(sims, x="cosine similarity", color="embedding", barmode="overlay", nbins=60,
                   title="Cosine similarity to the previous inference (dashed: the swept thresholds)")
for t in config.thresholds:
    fig.add_vline(x=t, line_dash="dash", line_width=1)
figures.append(common.save_figure(fig, "stability_cliff_similarity", config.figures_dir)); fig

# %%
print("\n".join(map(str, figures)))
