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
# Browse recorded runs (`*.nc` under `runs_dir`, recursively) frame by frame, with the frame the policy saw:
#
# - OpenVLA and OpenVLA-OFT runs: the reuse mask / staleness per patch over the image (OFT: pick the camera, each
#   image has its own patches), text-to-vision attention per layer and head, Q/K/V drift and the action (OFT: the
#   chunk at the frame) against a full recompute.
# - pi0, pi0.5 and SmolVLA runs (the stability cliff study's): which spans' K/V were reused at which prefix layer,
#   the gate's decisions and similarities, staleness per span or drift over inferences (the `curves` menu), and the
#   action chunk against the no-reuse shadow pass.
#
# A file that cannot be read, or that is not a recording, is listed under the dataset menu with the reason.
# Open it in JupyterLab (`make lab`; the runs dir from `DCVLA_RUNS_DIR`, default `data/runs`) and run all cells,
# serve it as an app with `make explorer` (Voila), or run it with papermill (`dcvla run explorer -p runs_dir ...`).

# %% tags=["parameters"]
import os

runs_dir = os.environ.get("DCVLA_RUNS_DIR", "data/runs")

# %%
from dcvla.explorer import Explorer

explorer = Explorer(runs_dir)
explorer.widget
