"""The stability cliff's closed-loop success: every run's LIBERO trials (`success_trials`), their table with Wilson
intervals and McNemar tests against no reuse (`success_table`), and the hypotheses decided from paired trials: every
run of the grid plays the same init states under the same evaluation seeds, so two runs are compared trial by trial
(an exact McNemar test on the trials where they disagree), never by their rates alone.

- the cliff, per mode under its own gate: the step between adjacent thresholds where success falls the most (the
  Pi0 report: 1.00 at cosine 0.985, 0.22 at 0.98), and whether that fall is significant;
- consistency beats freshness (H4), on success: `full` against `vision_only` at each threshold (the same gate);
- the synchronized gate against the cosine gate: `synchronized` against `full` at each threshold.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd
import xarray as xr

from ..success import ALPHA, fewest_decisive, outcomes, paired, replays, success_summary
from ..units import run_units
from . import stability_cliff
from .cliff_config import own_gate_runs
from .stability_cliff import CliffConfig, CliffWorker, run_label, success_keys, success_units

def rate(success: xr.DataArray, label: str) -> float:
    """A run's success rate over the trials it played, each replayed trial once (`dcvla.success.replays`)."""
    run = success.sel({"method": label}, drop=True)
    return float(np.nanmean(run.where(~replays(success, label)).values))


def success_cliff(success: xr.DataArray, runs: pd.DataFrame, reference: str = "none") -> pd.DataFrame:
    """Per mode (under its own gate): its runs from the highest threshold (least reuse) down, each paired with the
    next lower one; the cliff is the step where success falls the most, with that step's McNemar p and a verdict.
    `runs`: one row per run with "mode", "gate", "value" and "label" (its method name in `success`)."""
    rows = []
    for mode, own in own_gate_runs(runs).groupby("mode", sort=False):
        own = own.sort_values("value", ascending=False)
        labels = [reference] + list(own["label"])
        values = [np.inf] + list(own["value"])
        steps = [paired(success, hi, lo) | {"from": v_hi, "to": v_lo}
                 for hi, lo, v_hi, v_lo in zip(labels, labels[1:], values, values[1:])]
        worst = max(steps, key=lambda s: (s["rate a"] - s["rate b"], -s["McNemar p"]))
        hi, lo, fall = worst["rate a"], worst["rate b"], worst["rate a"] - worst["rate b"]
        where = _name(worst["from"])
        thin = min(steps, key=lambda s: s["paired trials"])
        if thin["paired trials"] < fewest_decisive() and not (fall > 0 and worst["McNemar p"] < ALPHA):
            verdict = (f"undecided: {thin['paired trials']} paired trials between {_name(thin['from'])} and "
                       f"{thin['to']:g} (p < {ALPHA:g} needs at least {fewest_decisive()})")
        elif not fall > 0:
            verdict = "no fall in success over the sweep"
        elif worst["McNemar p"] < ALPHA:
            verdict = f"cliff between {where} and {worst['to']:g}: success {hi:.2f} -> {lo:.2f}"
        else:
            verdict = f"largest fall between {where} and {worst['to']:g} ({hi:.2f} -> {lo:.2f}) is not significant"
        rates = {f"success at {v:g}": rate(success, lab) for v, lab in zip(own["value"], own["label"])}
        rows.append({"mode": mode, "gate": own["gate"].iloc[0], "from": where, "to": worst["to"],
                     "fall": fall, "McNemar p": worst["McNemar p"], "verdict": verdict, **rates})
    return pd.DataFrame(rows)


def _name(value: float) -> str:
    """A step's upper end in a verdict: a threshold, or no reuse (the reference, value inf)."""
    return "no reuse" if value == np.inf else f"{value:g}"


def mode_against_mode(success: xr.DataArray, runs: pd.DataFrame, a: str, b: str) -> pd.DataFrame:
    """Mode `a` against mode `b` at each threshold both ran under their own gates (H4: a="full", b="vision_only";
    the gates: a="synchronized", b="full"), trial by trial."""
    own = own_gate_runs(runs)
    label = {(m, v): lab for m, v, lab in zip(own["mode"], own["value"], own["label"])}
    common = sorted({v for m, v in label if m == a} & {v for m, v in label if m == b}, reverse=True)
    return pd.DataFrame([{"threshold": v, **paired(success, label[(a, v)], label[(b, v)])} for v in common])


def success_table(config: CliffConfig, trials: xr.DataArray) -> pd.DataFrame:
    """Closed-loop LIBERO success per (mode, gate, value) of `success_trials`' trials, the reference ("none") too,
    with 95% Wilson intervals, against the reference on the same init states the paired difference and the exact
    McNemar p (`dcvla.success`), the trials' mean reuse per inference (`reuse_mean`; NaN: files from before it was
    recorded) and a "label" column, each run's method in the trials."""
    rows = success_summary(trials, "none").set_index("method")
    if "reuse_mean" in trials.coords:
        rows["closed-loop reuse"] = trials.reuse_mean.mean([d for d in trials.dims if d != "method"]).to_series()
    return pd.DataFrame([{"mode": m, "gate": g, "value": v, "label": run_label(m, g, v),
                          **rows.loc[run_label(m, g, v)].to_dict()} for m, g, v in success_keys(config)])


def success_trials(config: CliffConfig, base=None, progress: bool = False) -> xr.DataArray:
    """Every run's closed-loop trials, 1 (success) or 0 (NaN: not played), dims (method, suite, task, seed, trial),
    each trial's mean reuse per inference as coordinate `reuse_mean` (NaN: not recorded): `success_trials` trials
    of each task in `success_tasks` of each suite (its trained one when empty) under each of `success_seeds`,
    openpi's protocol (`dcvla.libero.evaluate`: both cameras, the state, `replan_steps` actions per chunk; no center
    crop), one unit per run and task under the process's runner. Resumable: trials already in a result file are
    kept. Meaningful with a trained checkpoint (`checkpoint`); random weights succeed by chance."""
    from ..libero.evaluate import load_results

    todo = success_units(config)
    run_units(todo, (stability_cliff.__name__, asdict(config)), work=lambda: CliffWorker(config, base, progress), progress=progress)
    labels, tasks = [run_label(*key) for key in success_keys(config)], sorted({u.get("task") for u in todo})
    results = load_results(Path(todo[0].path).parents[1], keep={"method": labels, "suite": config.suites, "task": tasks,
                                                                 "seed": config.success_seeds, "trial": list(range(config.trials()))})
    return outcomes(results).assign_coords(reuse_mean=results.reuse_mean)
