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
# # Mechanism equivalence (H0-H4)
#
# Tests the design's hypotheses on shipped LIBERO frames instead of assuming them. H0: with nothing reused every
# method equals vanilla. H1/H2: once a static token's K/V come from the cache at every layer, its own Q and output
# rows (LLM and ViT) influence nothing, so Q reuse, Q recompute and dropping the rows agree. H3: how far
# `dual_cache` is from the ViT-fresh variant with the same mask and from TTF + VLA-Cache as published (TTF's own
# mask per tower, VLA-Cache's selection and schedule; the dual cache: one mask for both towers and the LLM).
# H4: does consistent reuse drift less than stale vision fed to a fresh LLM? Verdicts are computed from the numbers
# (tolerance on the action-token logits: 1e-4 in fp32, a few ulps of the logits in a 16-bit dtype).
#
# On OpenVLA-OFT (`preset = "oft-small"` or an OFT checkpoint) equality is judged on the L1 head's normalised action
# chunk instead (there are no tokens), and drift by its mean |difference| ("action L1"). Its attention is
# bidirectional, so a token's row is read by every other row; H1/H2 still hold because a static token whose K/V
# come from the cache at every layer has no row of its own left to read or be read: what others read of it is the
# cache.

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
suites = ["libero_spatial", "libero_object", "libero_goal", "libero_10"]
episodes_per_suite = 1
episodes_dir = ""         # a folder of recorded episodes (scripts/record_episodes.py); empty: the shipped ones
frames = 3

# %%
import numpy as np, pandas as pd, plotly.express as px
from dcvla.studies import common, mechanism_equivalence
config = common.StudyConfig.from_parameters(globals())
base = common.base_policy(config)
figures = []

# %%
table = mechanism_equivalence.equivalence_tests(config, base=base)
common.write_table(table, "mechanism_equivalence", config)
pd.set_option("display.max_colwidth", 120)
table

# %%
floor = 1e-9  # exact zeros drawn at a floor on the log axis
tolerance = mechanism_equivalence.equivalence_tolerance(config.dtype, base.family)  # scales with the dtype
output = table.output.iloc[0]  # OpenVLA: action-token logits; OpenVLA-OFT: the normalised chunk
outcome = np.where(table.verdict.str.startswith("holds"), "holds",
                   np.where(table.verdict.str.startswith("FAILS"), "FAILS", "measured (no equality expected)"))
plot = table.assign(label=table.hypothesis + ": " + table.compared, outcome=outcome,
                    shown=table["max |output diff|"].clip(lower=floor))
fig = px.bar(plot, x="shown", y="label", orientation="h", log_x=True, color="outcome",
             color_discrete_map={"holds": "seagreen", "FAILS": "crimson", "measured (no equality expected)": "steelblue"},
             title=f"Max |difference| of the {output} (dashed: tolerance {tolerance:g}; "
                   f"bars at {floor:g} are exactly 0)")
fig.add_vline(x=tolerance, line_dash="dash")
fig.update_layout(yaxis_title="", xaxis_title="max |output diff| (log)", legend=dict(orientation="h", y=-0.2))
figures.append(common.save_figure(fig, "mechanism_equivalence", config.figures_dir, width=1250, height=620)); fig

# %%
print("\n".join(map(str, figures)))
