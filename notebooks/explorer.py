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
# # dcvla explorer
#
# Browse recorded runs (`*.nc` under `runs_dir`) frame by frame: the frame the policy saw with the reuse mask /
# staleness per patch, text-to-vision attention per layer and head, Q/K/V drift and action vs full recompute.
# Serve it with `make explorer` (or `voila notebooks/explorer.ipynb` after `make notebooks`; runs dir from
# `DCVLA_RUNS_DIR`) or run it with papermill (`dcvla run explorer -p runs_dir ...`).

# %% tags=["parameters"]
import os

runs_dir = os.environ.get("DCVLA_RUNS_DIR", "data/runs")

# %%
from dcvla.explorer import Explorer

explorer = Explorer(runs_dir)
explorer.widget
