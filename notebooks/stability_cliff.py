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
# # Stability cliff: K/V reuse across inferences in pi0, pi0.5 and SmolVLA
#
# The Pi0 report (seeds/004) gated prefix K/V reuse on the cosine similarity of consecutive inferences' vision
# embeddings and saw success fall from 100% at threshold 0.985 to 22% at 0.98; reusing vision alone was far worse
# than reusing everything together (*consistency beats freshness*), and a gate that also asks the state to be
# similar (*synchronized*) was proposed. This study runs it on the published architectures (pi0: the state is a
# token in the expert's suffix; pi0.5: its bins are in the prompt; `dcvla.pi0`; SmolVLA: one projected token, last in
# the prefix, `dcvla.smolvla`): every mode x cosine threshold,
# then gates beyond one threshold on `gate_modes` (a cache interval, `max_age`; a pixel-change bound, `pixel_mae`;
# a stricter threshold near grasp and place, `phase_aware`), each streaming the same shipped LIBERO frames (agent
# and wrist views) and robot states, one inference every `replan_steps` frames as openpi's LIBERO client, compared
# with the no-reuse run from the same noise: reuse rate, latency, Hz, action drift. The cliff is located from the
# data. The default policy is `smolvla-micro-goal`, a small SmolVLA trained here on scripted demonstrations of
# libero_goal task 8 (docs/micro.md; not SmolVLA's published weights), so the study also measures closed-loop success
# on that task: a few trials per run at the default, the full grid's command and numbers in docs/micro.md. With the
# random weights of a preset (`-p preset small`) there is no success to measure and the action drift stands in for
# it; `checkpoint` takes a lerobot pi0 / pi0.5 / SmolVLA directory (and `tokenizer`).
#
# **How speed is measured.** Each run is recorded on its own, one after another, so the recordings' `latency_ms`
# carry whatever load the machine had at that moment: their ratios are not a speedup. The speed columns come from
# a timing unit per episode that steps the no-reuse reference and every run on the same inferences in one process,
# interleaved inference by inference in a rotating order (`dcvla.timing`, no recorder attached, after a short
# warm-up): `speedup (interleaved, median)` is the median over inferences of the paired latency ratio no-reuse /
# run, `speedup (interleaved, total)` the ratio of total times, `ms` / `Hz (interleaved, median)` the run's median
# latency and its rate. The line printed under the table says how many inferences, on which device and dtype.

# %% tags=["parameters"]
preset = "smolvla-micro-goal"  # a shipped micro policy (trained), or small/tiny: pi0-small/pi0-tiny, pi05-small,
                               # smolvla-small, pi0, ... (random weights)
checkpoint = ""           # a lerobot pi0 / pi0.5 / SmolVLA checkpoint directory (e.g. lerobot/pi05_base), instead
tokenizer = ""            # its tokenizer's directory (PaliGemma's, SmolVLM2's), for a checkpoint that ships none
seed = 0                  # weights seed; also seeds the flow noise, the same for every mode
device = "cpu"            # "cuda" on a GPU machine
dtype = "float32"
runs_dir = "data/runs"    # recorded datasets (one netCDF per mode, gate, value and episode); tables go to its parent
figures_dir = "figures"
modes = ["full", "vision_only", "state_only", "text_fixed", "layer_wise", "synchronized"]
thresholds = [0.97, 0.98, 0.985, 0.99, 0.995]
gates = ["max_age", "pixel_mae", "phase_aware"]  # beyond each mode's own gate, run on gate_modes
gate_modes = ["full"]
max_ages = [2, 3, 4]      # max_age: refresh at least every N inferences
pixel_thresholds = [0.005, 0.01, 0.02, 0.04]  # pixel_mae: mean |pixel change| in [0, 1] since the cached frame
phase_threshold = 0.995   # phase_aware: the cosine threshold near a grasp or a place
suites = ["libero_goal"]  # the default policy's; all four: ["libero_spatial", "libero_object", "libero_goal", "libero_10"]
episodes_per_suite = 1    # shipped episodes per suite (0: all)
episodes_dir = ""         # a folder of recorded episodes (scripts/record_episodes.py); empty: the shipped ones
steps = 20                # inferences per episode (the first 6 of the shipped libero_goal episode never open a gate)
replan_steps = 5          # frames between inferences (openpi executes 5 actions of each chunk)
compare_to = "previous"   # the gate compares with the previous inference (the report), or with the "anchor" one
success_trials = -1       # closed-loop LIBERO trials per run and task (-1: 1 with trained weights, 0 with random)
success_runs = ["full-cosine-0.985", "vision_only-cosine-0.985", "synchronized-synchronized-0.985"]  # []: every run
success_tasks = []        # task ids of each suite for success_trials ([]: its trained one, the first episode's)
success_seeds = [0]       # evaluation seeds of those trials (0: the protocol's)
max_steps = 0             # env steps per trial (0: the protocol's budget)

# %%
import numpy as np, pandas as pd, plotly.express as px
from dcvla.studies import cliff_success, common, stability_cliff
config = stability_cliff.CliffConfig.from_parameters(globals())
base = stability_cliff.pi0_base(config)
print(config.model_name(), base.model.config.variant, "" if config.trained() else "(random weights: drift, not success)")
figures = []

# %%
runs = stability_cliff.load_cliff_runs(stability_cliff.record_cliff_runs(config, base=base))
timings = stability_cliff.time_cliff_runs(config, base=base)
table = stability_cliff.cliff_table(runs, timings)
common.write_table(table, "stability_cliff", config)
print(table.attrs["speed"])
table.round(4)

# %% [markdown]
# ## Closed-loop success (with `success_trials`)
#
# Each (mode, gate, value) and the no-reuse reference on LIBERO with openpi's protocol; with random weights a
# success is chance, so this runs only when asked.

# %%
if config.trials():
    trials = cliff_success.success_trials(config, base=base)
    success = cliff_success.success_table(config, trials)
    display(success.round(3))
    attrs = table.attrs  # a merge drops them: keep "speed", how the speed columns were measured
    table = table.merge(success[success["mode"] != "none"], on=["mode", "gate", "value"], how="left")
    table.attrs = attrs
    common.write_table(table, "stability_cliff", config)

# %% [markdown]
# ## The hypotheses on success (with `success_trials`)
#
# Every run plays the same init states under the same seeds, so each comparison is trial by trial (exact McNemar
# on the trials where two runs disagree, significant below p = 0.05): per mode, the step between adjacent thresholds
# where success falls the most (the report: 1.00 at 0.985, 0.22 at 0.98); `full` against `vision_only` at each
# threshold (consistency beats freshness, on success); the synchronized gate against `full`'s cosine gate.

# %%
if config.trials():
    grid_runs = success[success["mode"] != "none"]
    hypotheses = {"cliff": cliff_success.success_cliff(trials, grid_runs),
                  "full_vs_vision_only": cliff_success.mode_against_mode(trials, grid_runs, "full", "vision_only"),
                  "synchronized_vs_cosine": cliff_success.mode_against_mode(trials, grid_runs, "synchronized", "full")}
    for name, verdicts in hypotheses.items():
        if len(verdicts):
            common.write_table(verdicts, f"stability_cliff_success_{name}", config)
        print(name)
        display(verdicts.round(4))
    own = stability_cliff.own_gate_runs(success).sort_values("value")
    above, below = own["95% CI high"] - own["success rate"], own["success rate"] - own["95% CI low"]
    modes = list(dict.fromkeys(own["mode"]))  # side by side at each threshold, so equal rates stay visible
    own["threshold"] = own["value"] + 0.0006 * (own["mode"].map(modes.index) - (len(modes) - 1) / 2)
    fig = px.line(own, x="threshold", y="success rate", color="mode", markers=True, error_y=above, error_y_minus=below,
                  hover_data=["value", "trials"], title=f"Closed-loop success per reuse mode and threshold "
                                                        f"({config.model_name()}; Wilson 95%; dashed: no reuse)")
    fig.add_hline(y=float(success.loc[success["mode"] == "none", "success rate"].iloc[0]), line_dash="dash")
    span = [*config.thresholds, *own["value"]]
    fig.update_xaxes(range=[min(span) - 0.003, max(span) + 0.003])
    fig.update_yaxes(range=[-0.05, 1.05])
    figures.append(common.save_figure(fig, "stability_cliff_success", config.figures_dir))
    display(fig)

# %% [markdown]
# ## Reuse rate, speed and drift against the threshold (each mode under its own gate)

# %%
own = stability_cliff.own_gate_runs(table).rename(columns={"value": "threshold"})
long = own.melt(id_vars=["mode", "threshold"], value_vars=["reuse rate", "speedup (interleaved, median)", "action drift"])
fig = px.line(long, x="threshold", y="value", color="mode", facet_col="variable", markers=True,
              title="Share of inferences reusing, speedup (median paired no-reuse/run latency, runs interleaved) "
                    "and action drift (to the no-reuse run, same noise)")
fig.update_yaxes(matches=None, showticklabels=True)
figures.append(common.save_figure(fig, "stability_cliff", config.figures_dir, width=1400)); fig

# %%
cliffs = stability_cliff.locate_cliff(table)
cliffs.round(4)

# %% [markdown]
# ## Consistency beats freshness?
#
# `full` against `vision_only` at the same cosine gate (the same reuse rate).

# %%
h4 = stability_cliff.consistency_vs_freshness(table)
h4.round(4)

# %% [markdown]
# ## Gates at equal reuse
#
# Each gate's drift against its reuse rate on `gate_modes`: at the same share of reusing inferences, the gate
# with the lower drift reuses at the better moments. The table compares each run of a gate with the cosine gate's
# drift interpolated at the same reuse rate (drift ratio < 1: the gate reuses more wisely).

# %%
gated = table[table["mode"].isin(config.gate_modes)]
fig = px.line(gated.sort_values("reuse rate"), x="reuse rate", y="action drift", color="gate", facet_col="mode",
              markers=True, hover_data=["value"], title="Action drift against reuse rate, per gate")
figures.append(common.save_figure(fig, "stability_cliff_gates", config.figures_dir)); fig

# %%
stability_cliff.gates_at_equal_reuse(table, mode=config.gate_modes[0]).round(4)

# %%
steps_table = []
for (mode, gate, value, episode), ds in runs.items():
    if mode in ("full", "vision_only", "synchronized") and gate in ("cosine", "synchronized"):
        ref = runs[("none", "", None, episode)]
        drift = np.linalg.norm(ds.action.values - ref.action.values, axis=-1).mean(-1)
        steps_table += [{"mode": mode, "threshold": value, "staleness": int(s), "action drift": float(d)}
                        for s, d, g in zip(ds.staleness.sel(span="vision").values, drift, ds.gate.values) if g]
steps_table = pd.DataFrame(steps_table, columns=["mode", "threshold", "staleness", "action drift"])
fig = px.box(steps_table, x="staleness", y="action drift", color="mode",
             title="Action drift of the inferences that reused, by the vision K/V's age (inferences)")
figures.append(common.save_figure(fig, "stability_cliff_staleness", config.figures_dir)); fig

# %% [markdown]
# ## What the gates see: similarities and pixel change of consecutive inferences

# %%
sims = pd.concat([pd.DataFrame({"vision": ds.vision_similarity.values, "state": ds.state_similarity.values}).assign(episode=episode)
                  for (mode, _, _, episode), ds in runs.items() if mode == "none"]).melt(id_vars="episode", var_name="embedding",
                                                                                      value_name="cosine similarity").dropna()
fig = px.histogram(sims, x="cosine similarity", color="embedding", barmode="overlay", nbins=60,
                   title="Cosine similarity to the previous inference (dashed: the swept thresholds)")
for t in config.thresholds:
    fig.add_vline(x=t, line_dash="dash", line_width=1)
figures.append(common.save_figure(fig, "stability_cliff_similarity", config.figures_dir)); fig

# %%
print("\n".join(map(str, figures)))
