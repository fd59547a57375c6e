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
# # LIBERO benchmark
#
# Closed-loop success per method x suite x trial with the upstream OpenVLA protocol (`dcvla.libero.evaluate`). Give a
# fine-tuned checkpoint (e.g. `openvla/openvla-7b-finetuned-libero-spatial`, `unnorm_key=libero_spatial`, on a GPU)
# for meaningful numbers. The embedded default runs `oft-micro-goal`, a 9.4 M-parameter policy of OpenVLA-OFT's
# architecture the project trained on scripted demonstrations of libero_goal task 8 (docs/micro.md; not OpenVLA-OFT's
# weights), on two init states of that task with the suite's full step budget: real successes, too few trials to
# separate the methods (docs/micro.md gives the 20-state, two-seed grid). A preset with random weights (`-p preset
# openvla-micro -p max_steps 10`) shows only that the loop, the protocol and the result files work.

# %% tags=["parameters"]
preset = "oft-micro-goal"  # a shipped micro policy (trained: OpenVLA-OFT's architecture on libero_goal task 8), or
                           # a preset with random weights: openvla-micro, small, tiny; OpenVLA-OFT: oft-micro, oft-small
checkpoint = ""           # OpenVLA or OpenVLA-OFT checkpoint dir or hub id, e.g. openvla/openvla-7b-finetuned-libero-spatial
unnorm_key = ""           # dataset statistics of the checkpoint (empty: its only one)
seed = 0                  # weights seed of the random preset
device = "cpu"            # "cuda" on a GPU machine
dtype = "float32"         # "bfloat16" for openvla-7b on a GPU
runs_dir = "data/runs"    # result files (runs_dir/libero_benchmark/METHOD/SUITE_taskNN.nc); tables go to its parent
figures_dir = "figures"
methods = ["vanilla", "dual_cache"]
suites = ["libero_goal"]  # the default policy's suite
tasks = []                # task ids per suite ([]: its trained one, the first shipped episode's)
trials = 2                # init states 0..trials-1 (the protocol uses 50)
trials_per_unit = 0       # init states per unit and result file (0: all of a method's on a task in one): blocks
                          # spread a grid of few tasks evenly over shards and Ray actors; keep it for the grid's life
seeds = [0]               # evaluation seeds (0: the protocol's); each runs every trial again (a replay of an
                          # earlier seed's trial, step for step, is counted once: dcvla.success.replays)
max_steps = 0             # 0: the protocol's per-suite budget; smoke runs of random weights cut it short

# %%
import plotly.express as px
from dcvla.studies import common, libero_benchmark
config = libero_benchmark.BenchmarkConfig.from_parameters(globals())
base = common.base_policy(config)
figures = []

# %%
if not config.trained():
    print("No checkpoint: random weights of the", config.preset, "preset. Success rates here are NOT meaningful.")
results = libero_benchmark.evaluate(config, base=base)
table = libero_benchmark.success_table(results)
common.write_table(table, "libero_benchmark", config)
table

# %% [markdown]
# Per method over every trial: the success rate with its 95% Wilson interval, and each method against vanilla on
# the same init states: the paired difference and the exact McNemar test of the trials where the two disagree. A
# trial that replays an earlier seed's on its init state (the same trajectory digest: a deterministic policy in a
# scene the init state fixes) is counted once ("replays left out").

# %%
libero_benchmark.success_table(results, by=())

# %% [markdown]
# Does the dual cache keep success where the other caches do? Against vanilla and each of VLA-Cache, TTF and
# TTF + VLA-Cache the run played, trial by trial: the rates on the trials both played, the trials only one of the
# two won, the exact McNemar p, the verdict (significant below p = 0.05), and "kept": the share of the other's
# successes on which the dual cache succeeded too.

# %%
verdicts = libero_benchmark.dual_cache_verdicts(results)
if len(verdicts):
    common.write_table(verdicts, "libero_benchmark_dual_cache", config)
verdicts

# %%
fig = px.bar(table, x="suite", y="success rate", color="method", barmode="group", facet_col="task",
             error_y=table["95% CI high"] - table["success rate"], error_y_minus=table["success rate"] - table["95% CI low"],
             title="Closed-loop success, 95% Wilson intervals" + (f" ({config.model_name()})" if config.trained() else " (random weights: not meaningful)"))
figures.append(common.save_figure(fig, "libero_benchmark", config.figures_dir)); fig

# %%
print("\n".join(map(str, figures)))
