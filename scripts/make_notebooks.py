"""Regenerate the study notebooks (notebooks/*.ipynb except the explorer) from their cell sources.

Edit the cells here or in Jupyter; outputs are never stored.  .venv/bin/python scripts/make_notebooks.py
"""
import nbformat as nbf
from pathlib import Path

COMMON = '''preset = "small"          # model preset with random weights (ignored when checkpoint is set)
checkpoint = ""           # OpenVLA-layout checkpoint directory or hub id, e.g. openvla/openvla-7b-finetuned-libero-spatial
unnorm_key = ""           # dataset statistics of the checkpoint (empty: its only one)
seed = 0                  # weights seed of the random preset
device = "cpu"            # "cuda" on a GPU machine
dtype = "float32"         # "bfloat16" for openvla-7b on a GPU
runs_dir = "data/runs"    # recorded datasets (one netCDF per method and episode); tables go to its parent
figures_dir = "figures"
'''

def nb(title, intro, params, cells, common=COMMON):
    n = nbf.v4.new_notebook()
    n.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    n.cells.append(nbf.v4.new_markdown_cell(f"# {title}\n\n{intro}"))
    p = nbf.v4.new_code_cell(common + params)
    p.metadata["tags"] = ["parameters"]
    n.cells.append(p)
    for c in cells:
        n.cells.append(nbf.v4.new_markdown_cell(c[1:]) if c.startswith("#md") else nbf.v4.new_code_cell(c.strip()))
    return n

SETUP = '''import numpy as np, pandas as pd, plotly.express as px, plotly.graph_objects as go
from dcvla import studies
config = studies.StudyConfig.from_parameters(globals())
base = studies.base_policy(config)
figures = []'''

nbs = {}
nbs["cache_behaviour"] = nb("Cache behaviour",
"How much each method reuses, where and when: reuse rate per suite, task, frame and layer, the reuse mask over the image, "
"staleness distributions, and the FLOPs and measured latency saved per tower. Every method streams the same shipped LIBERO "
"frames; the vanilla run on those frames is the reference.",
'''methods = ["vanilla", "vla_cache", "ttf", "ttf_vla_cache", "dual_cache"]
suites = ["libero_spatial", "libero_object", "libero_goal", "libero_10"]
episodes_per_suite = 0    # 0: every shipped episode of each suite
frames = 5                # frames per episode from its start (0: whole episode)
drift = False             # shadow recompute for Q/K/V drift (doubles the cost)
''', [SETUP, '''runs = studies.load_runs(studies.record_runs("cache_behaviour", config, base=base))
table = studies.summary(runs)
studies.write_table(table, "cache_behaviour", config)
table.round(3)''',
'''#md ## Reuse per suite, task and frame''',
'''per_run = pd.DataFrame([{"method": ds.attrs["method"], "suite": str(ds.suite.item()), "task": int(ds.task.item()),
                         "mask reuse": float(ds.reuse.mean()), "LLM reuse": ds.dcvla.llm_reuse_rate()}
                        for ds in runs])
fig = px.bar(per_run.groupby(["suite", "method"], as_index=False).mean(numeric_only=True), x="suite", y="LLM reuse",
             color="method", barmode="group", title="Share of vision tokens whose LLM K/V came from the cache")
figures.append(studies.save_figure(fig, "cache_behaviour_reuse_by_suite", config.figures_dir)); fig''',
'''per_frame = pd.DataFrame([{"method": ds.attrs["method"], "episode": str(ds.episode.item()), "frame": int(f),
                           "reuse": float(ds.reuse.sel(frame=f).mean())} for ds in runs for f in ds.frame.values])
px.line(per_frame, x="frame", y="reuse", color="method", line_dash="episode", title="Reuse mask share per frame")''',
'''by_layer = pd.concat([ds.dcvla.reuse_rate_by_layer().to_dataframe("reuse").reset_index().assign(method=ds.attrs["method"])
                      for ds in runs]).groupby(["method", "tower", "layer"], as_index=False)["reuse"].mean()
fig = px.line(by_layer.dropna(), x="layer", y="reuse", color="method", facet_col="tower", title="Reuse by layer")
figures.append(studies.save_figure(fig, "cache_behaviour_reuse_by_layer", config.figures_dir)); fig''',
'''#md ## The mask over the image''',
'''chosen = next(ds for ds in runs if ds.attrs["method"] == "dual_cache") if "dual_cache" in config.methods else runs[-1]
frame = int(chosen.frame[~chosen.keyframe.values][0]) if (~chosen.keyframe).any() else 0
episode = next(e for e in studies.episodes(config) if e.name == str(chosen.episode.item()))
image = studies.episode_frames(episode, frame + 1)[frame]
mask = chosen.reuse.sel(frame=frame).values.reshape(16, 16)
fig = go.Figure([go.Image(z=image), go.Heatmap(z=np.where(mask, 1.0, np.nan), x=np.arange(16) * 14 + 7,
                 y=np.arange(16) * 14 + 7, opacity=0.45, showscale=False, colorscale=[[0, "royalblue"], [1, "royalblue"]])])
fig.update_layout(title=f"{chosen.attrs['method']}: reused patches (blue), {episode.name} frame {frame}", width=520, height=520)
figures.append(studies.save_figure(fig, "cache_behaviour_mask", config.figures_dir)); fig''',
'''#md ## Staleness, FLOPs and latency per tower''',
'''stale = pd.DataFrame([{"method": ds.attrs["method"], "staleness": int(v)} for ds in runs for v in ds.staleness.values.ravel()])
px.histogram(stale, x="staleness", color="method", barmode="group", histnorm="probability",
             title="Frames since each patch was last computed fresh")''',
'''vanilla = {str(ds.episode.item()): ds for ds in runs if ds.attrs["method"] == "vanilla"}
saved = []
for ds in runs:
    ref = vanilla[str(ds.episode.item())]
    for tower in ("dino", "siglip", "llm"):
        saved.append({"method": ds.attrs["method"], "tower": tower,
                      "FLOPs ratio": float(ref.flops.sel(tower=tower).sum() / ds.flops.sel(tower=tower).sum())})
    for stage in ("dino", "siglip", "llm_prefill", "llm_decode"):
        saved.append({"method": ds.attrs["method"], "tower": stage + " (measured)",
                      "FLOPs ratio": float(ref.latency_ms.sel(stage=stage).sum() / ds.latency_ms.sel(stage=stage).sum())})
saved = pd.DataFrame(saved).groupby(["method", "tower"], as_index=False).mean()
fig = px.bar(saved, x="tower", y="FLOPs ratio", color="method", barmode="group",
             title="Vanilla / method: FLOPs per tower and measured time per stage (same frames)")
figures.append(studies.save_figure(fig, "cache_behaviour_savings", config.figures_dir)); fig''',
'''print("\\n".join(map(str, figures)))'''])

nbs["mechanism_equivalence"] = nb("Mechanism equivalence (H0-H4)",
"Tests the design's hypotheses on shipped LIBERO frames instead of assuming them. H0: with nothing reused every method "
"equals vanilla. H1/H2: once a static token's K/V come from the cache at every layer, its own Q and output rows (LLM and ViT) "
"influence nothing, so Q reuse, Q recompute and dropping the rows agree. H3: how far `dual_cache` is from the ViT-fresh "
"variant with the same mask and from TTF + VLA-Cache. H4: does consistent reuse drift less than stale vision fed to a "
"fresh LLM? Verdicts are computed from the numbers (tolerance 1e-4 on the action-token logits, fp32).",
'''suites = ["libero_spatial", "libero_object", "libero_goal", "libero_10"]
episodes_per_suite = 1
frames = 3
''', [SETUP,
'''table = studies.equivalence_tests(config, base=base)
studies.write_table(table, "mechanism_equivalence", config)
pd.set_option("display.max_colwidth", 120)
table''',
'''floor = 1e-9  # exact zeros drawn at a floor on the log axis
outcome = np.where(table.verdict.str.startswith("holds"), "holds",
                   np.where(table.verdict.str.startswith("FAILS"), "FAILS", "measured (no equality expected)"))
plot = table.assign(label=table.hypothesis + ": " + table.compared, outcome=outcome,
                    shown=table["max |logit diff|"].clip(lower=floor))
fig = px.bar(plot, x="shown", y="label", orientation="h", log_x=True, color="outcome",
             color_discrete_map={"holds": "seagreen", "FAILS": "crimson", "measured (no equality expected)": "steelblue"},
             title=f"Max |difference| of action-token logits (dashed: tolerance {studies.EQUIVALENCE_TOLERANCE:g}; "
                   f"bars at {floor:g} are exactly 0)")
fig.add_vline(x=studies.EQUIVALENCE_TOLERANCE, line_dash="dash")
fig.update_layout(yaxis_title="", xaxis_title="max |logit diff| (log)", legend=dict(orientation="h", y=-0.2))
figures.append(studies.save_figure(fig, "mechanism_equivalence", config.figures_dir, width=1250, height=620)); fig''',
'''print("\\n".join(map(str, figures)))'''])

nbs["long_horizon_stability"] = nb("Long-horizon stability",
"Drift accumulation over long libero_10 episodes (action-token KL and action distance to the vanilla run on the same "
"frames, against reuse and staleness), and sweeps of keyframe interval, pixel threshold and attention top-k: where does "
"action drift jump (the cliff)? The Pi0 report saw success fall from 100% at cosine threshold 0.985 to 22% at 0.98. "
"With random weights the action tokens barely move, so the action-token KL is the sensitive measure here.",
'''methods = ["vanilla", "vla_cache", "dual_cache"]
suites = ["libero_10"]
episodes_per_suite = 1
frames = 60               # consecutive frames of the long episode (0: all)
drift = False
sweep_methods = ["dual_cache"]
sweep_frames = 12
keyframe_intervals = [1, 3, 6, 12]
pixel_thresholds = [0.0, 0.01, 0.03, 0.1]
attention_top_ks = [0, 35, 70, 140]
''', [SETUP, '''runs = studies.load_runs(studies.record_runs("long_horizon_stability", config, base=base))
drift_table = studies.drift_over_time(runs)
fig = px.line(drift_table, x="frame", y="action KL", color="method", log_y=True,
              title="Action-token KL to vanilla over a long episode")
figures.append(studies.save_figure(fig, "long_horizon_drift", config.figures_dir)); fig''',
'''px.scatter(drift_table[drift_table.method != "vanilla"], x="mean staleness", y="action KL", color="method", log_y=True,
           title="Drift against mean staleness of the frame")''',
'''#md ## Sweeps and the cliff''',
'''from dataclasses import replace
sweep_config = replace(config, methods=sweep_methods, frames=sweep_frames)
sweeps = pd.concat([studies.sweep(sweep_config, name, values, base=base) for name, values in
                    [("keyframe_interval", keyframe_intervals), ("pixel_threshold", pixel_thresholds),
                     ("attention_top_k", attention_top_ks)]])
studies.write_table(sweeps, "long_horizon_stability", config)
fig = px.line(sweeps, x="value", y="action KL", color="method", facet_col="parameter", markers=True,
              title="Action-token KL to vanilla across sweeps (keyframe interval 1: nothing reused, exactly 0)")
fig.update_xaxes(matches=None)
figures.append(studies.save_figure(fig, "long_horizon_sweeps", config.figures_dir)); fig''',
'''cliffs = studies.find_cliff(sweeps)
cliffs''',
'''print("\\n".join(map(str, figures)))'''])

nbs["libero_benchmark"] = nb("LIBERO benchmark",
"Closed-loop success per method x suite x trial with the upstream OpenVLA protocol (`dcvla.libero.evaluate`). "
"Give a fine-tuned checkpoint (e.g. `openvla/openvla-7b-finetuned-libero-spatial`, `unnorm_key=libero_spatial`, "
"on a GPU) for meaningful numbers. On the embedded default it runs the small preset at smoke size: **random weights give "
"no meaningful success rate**; the run only shows the loop, the protocol and the result files work.",
'''methods = ["vanilla", "dual_cache"]
suites = ["libero_spatial"]
tasks = [0]               # task ids per suite
trials = 1                # init states 0..trials-1 (the protocol uses 50)
max_steps = 10            # 0: the protocol's per-suite budget; smoke runs cut it short
''', [SETUP, '''from dcvla.libero.evaluate import evaluate_task, load_results
from dcvla.methods import CacheConfig, CachedPolicy
if not config.checkpoint:
    print("No checkpoint: random weights of the", config.preset, "preset. Success rates here are NOT meaningful.")
run_dir = f"{config.runs_dir}/libero_benchmark"
for method in config.methods:
    policy = CachedPolicy(base.model, base.processor, CacheConfig(method=method, unnorm_key=config.unnorm_key or None))
    for suite in config.suites:
        for task in tasks:
            evaluate_task(policy, suite, task, run_dir, method=method, trials=trials, max_steps=max_steps or None)
results = load_results(run_dir)
table = results.success.mean("trial").to_dataframe("success rate").reset_index()
studies.write_table(table, "libero_benchmark", config)
table''',
'''fig = px.bar(table, x="suite", y="success rate", color="method", barmode="group", facet_col="task",
             title="Closed-loop success" + ("" if config.checkpoint else " (random weights: not meaningful)"))
figures.append(studies.save_figure(fig, "libero_benchmark", config.figures_dir)); fig''',
'''print("\\n".join(map(str, figures)))'''])

nbs["stability_cliff"] = nb("Stability cliff: prefix K/V reuse in a Pi0-style policy",
"The Pi0 report (seeds/004) gated prefix K/V reuse on the cosine similarity of consecutive steps' vision embeddings and "
"saw success fall from 100% at threshold 0.985 to 22% at 0.98; reusing vision alone was far worse than reusing "
"everything together (*consistency beats freshness*), and a gate that also asks the state to be similar "
"(*synchronized*) was proposed. Here every mode x threshold streams the same shipped LIBERO frames and robot states "
"(one inference every `replan_steps` frames, as openpi's LIBERO client) and is compared with the no-reuse run from the "
"same noise: reuse rate, latency, Hz, action drift. The cliff is located from the data. Random weights: there is no "
"success rate to measure (dcvla does not load Pi0 checkpoints yet), so the action drift stands in for it.",
'''modes = ["full", "vision_only", "state_only", "text_fixed", "layer_wise", "synchronized"]
thresholds = [0.97, 0.98, 0.985, 0.99, 0.995]
suites = ["libero_spatial", "libero_object", "libero_goal", "libero_10"]
episodes_per_suite = 1    # shipped episodes per suite (0: all)
steps = 6                 # inferences per episode
replan_steps = 5          # frames between inferences (openpi executes 5 actions of each chunk)
compare_to = "previous"   # the gate compares with the previous step (the report), or with the "anchor" step
''', ['''import numpy as np, pandas as pd, plotly.express as px, plotly.graph_objects as go
from dcvla import studies
config = studies.CliffConfig.from_parameters(globals())
if globals().get("checkpoint"):
    print("checkpoint is an OpenVLA checkpoint; this study runs the random", config.pi0_preset(), "preset (no Pi0 loader yet)")
base = studies.pi0_base(config)
figures = []''',
'''runs = studies.load_cliff_runs(studies.record_cliff_runs(config, base=base))
table = studies.cliff_table(runs)
studies.write_table(table, "stability_cliff", config)
table.round(4)''',
'''#md ## Reuse rate, speed and drift against the threshold''',
'''long = table.melt(id_vars=["mode", "threshold"], value_vars=["reuse rate", "speedup", "action drift"])
fig = px.line(long, x="threshold", y="value", color="mode", facet_col="variable", markers=True,
              title="Share of inferences reusing, measured speedup and action drift (to the no-reuse run, same noise)")
fig.update_yaxes(matches=None, showticklabels=True)
figures.append(studies.save_figure(fig, "stability_cliff", config.figures_dir, width=1400)); fig''',
'''cliffs = studies.locate_cliff(table)
cliffs.round(4)''',
'''#md ## Consistency beats freshness? `full` against `vision_only` at the same gate (the same reuse rate)''',
'''h4 = studies.consistency_vs_freshness(table)
h4.round(4)''',
'''steps_table = []
for (mode, threshold, episode), ds in runs.items():
    if mode in ("full", "vision_only", "synchronized"):
        ref = runs[("none", None, episode)]
        drift = np.linalg.norm(ds.action.values - ref.action.values, axis=-1).mean(-1)
        steps_table += [{"mode": mode, "threshold": threshold, "staleness": int(s), "action drift": float(d)}
                        for s, d, g in zip(ds.staleness.sel(span="vision").values, drift, ds.gate.values) if g]
steps_table = pd.DataFrame(steps_table)
fig = px.box(steps_table, x="staleness", y="action drift", color="mode",
             title="Action drift of the inferences that reused, by the vision K/V's age (inferences)")
figures.append(studies.save_figure(fig, "stability_cliff_staleness", config.figures_dir)); fig''',
'''#md ## What the gate sees: similarities of consecutive inferences''',
'''sims = pd.concat([pd.DataFrame({"vision": ds.vision_similarity.values, "state": ds.state_similarity.values}).assign(episode=episode)
                  for (mode, _, episode), ds in runs.items() if mode == "none"]).melt(id_vars="episode", var_name="embedding",
                                                                                   value_name="cosine similarity").dropna()
fig = px.histogram(sims, x="cosine similarity", color="embedding", barmode="overlay", nbins=60,
                   title="Cosine similarity to the previous inference (dashed: the swept thresholds)")
for t in config.thresholds:
    fig.add_vline(x=t, line_dash="dash", line_width=1)
figures.append(studies.save_figure(fig, "stability_cliff_similarity", config.figures_dir)); fig''',
'''print("\\n".join(map(str, figures)))'''],
common='''preset = "small"          # small/tiny run the pi0-small/pi0-tiny presets (random weights); or a Pi0 preset name
seed = 0                  # weights seed; also seeds the flow noise, the same for every mode
device = "cpu"            # "cuda" on a GPU machine
dtype = "float32"
runs_dir = "data/runs"    # recorded datasets (one netCDF per mode, threshold and episode); tables go to its parent
figures_dir = "figures"
''')

for name, n in nbs.items():
    for i, cell in enumerate(n.cells):  # stable ids: regenerating changes nothing that did not change
        cell["id"] = f"{name}-{i}"
    nbf.write(n, str(Path(__file__).resolve().parents[1] / "notebooks" / f"{name}.ipynb"))
    print("wrote", name)
