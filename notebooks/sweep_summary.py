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
# # Sweep summary
#
# `dcvla sweep STUDY -p NAME '[v1, v2]' ...` runs a study's notebook once per combination of the parameter lists,
# each in its own folder under `sweep_dir` (its runs, figures, table and the executed notebook, the record of that
# run). This notebook reads every combination's table and stacks them with the swept parameters as columns.

# %% tags=["parameters"]
study = "stability_cliff"             # the swept study
sweep_dir = "data/sweeps/stability_cliff"  # one folder per combination: parameters.json, STUDY.nc, STUDY.ipynb

# %%
import json
from pathlib import Path

import pandas as pd

from dcvla.io import read_dataset

rows = []
for folder in sorted(p for p in Path(sweep_dir).iterdir() if (p / "parameters.json").exists()):
    swept = json.loads((folder / "parameters.json").read_text())["swept"]  # the parameters that vary
    table_file = folder / f"{study}.nc"
    if not table_file.exists():
        print(f"{folder.name}: no table ({table_file.name} missing: did its notebook fail? see {folder / f'{study}.ipynb'})")
        continue
    table = read_dataset(table_file).to_dataframe().reset_index(drop=True)
    for name, value in swept.items():  # as columns, named "swept NAME" where the table has a NAME of its own
        table.insert(0, f"swept {name}" if name in table else name, json.dumps(value) if isinstance(value, (list, dict)) else value)
    table.insert(0, "combination", folder.name)
    rows.append(table)
summary = pd.concat(rows, ignore_index=True) if rows else pd.DataFrame()
print(f"{len(rows)} combinations of {study} under {sweep_dir}")
summary
