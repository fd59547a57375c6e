"""The stability cliff's hypotheses decided on closed-loop success, from paired trials: every run of the grid plays the
same init states under the same evaluation seeds, so two runs are compared trial by trial (an exact McNemar test on
the trials where they disagree), never by their rates alone.

- the cliff, per mode under its own gate: the step between adjacent thresholds where success falls the most (the
  Pi0 report: 1.00 at cosine 0.985, 0.22 at 0.98), and whether that fall is significant;
- consistency beats freshness (H4), on success: `full` against `vision_only` at each threshold (the same gate);
- the synchronized gate against the cosine gate: `synchronized` against `full` at each threshold.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import xarray as xr

from ..success import mcnemar_exact

ALPHA = 0.05  # a paired difference counts when its exact McNemar p is below this


def paired(success: xr.DataArray, a: str, b: str) -> dict:
    """Run `a` against run `b` on the trials both played: their rates there, how many only one of them won, the
    exact McNemar p and a verdict. `success` has a "method" dim (run labels) and the trial dims; NaN: not played."""
    missing = [m for m in (a, b) if m not in success.method.values]
    if missing:
        raise ValueError(f"paired: no trials of {missing} (runs: {', '.join(map(str, success.method.values))})")
    x, y = (success.sel({"method": m}).values.ravel() for m in (a, b))
    both = ~np.isnan(x) & ~np.isnan(y)
    x, y = x[both] > 0.5, y[both] > 0.5
    only_a, only_b, p = mcnemar_exact(x, y)
    n = int(both.sum())
    if not n:
        verdict = "no trials in common"
    elif p < ALPHA:
        verdict = f"{a if only_a > only_b else b} succeeds more (p = {p:.3g})"
    else:
        verdict = f"no significant difference (p = {p:.3g}, {n} paired trials)"
    rates = (x.mean(), y.mean()) if n else (np.nan, np.nan)
    return {"a": a, "b": b, "paired trials": n, "rate a": rates[0], "rate b": rates[1],
            "only a": only_a, "only b": only_b, "McNemar p": p, "verdict": verdict}


def rate(success: xr.DataArray, label: str) -> float:
    """A run's success rate over the trials it played."""
    return float(np.nanmean(success.sel({"method": label}).values))


def success_cliff(success: xr.DataArray, runs: pd.DataFrame, reference: str = "none") -> pd.DataFrame:
    """Per mode (under its own gate): its runs from the highest threshold (least reuse) down, each paired with the
    next lower one; the cliff is the step where success falls the most, with that step's McNemar p and a verdict.
    `runs`: one row per run with "mode", "gate", "value" and "label" (its method name in `success`)."""
    rows = []
    for mode, own in runs[runs["gate"].isin(["cosine", "synchronized"])].groupby("mode", sort=False):
        own = own.sort_values("value", ascending=False)
        labels = [reference] + list(own["label"])
        values = [np.inf] + list(own["value"])
        steps = [paired(success, hi, lo) | {"from": v_hi, "to": v_lo}
                 for hi, lo, v_hi, v_lo in zip(labels, labels[1:], values, values[1:])]
        worst = max(steps, key=lambda s: (s["rate a"] - s["rate b"], -s["McNemar p"]))
        hi, lo, fall = worst["rate a"], worst["rate b"], worst["rate a"] - worst["rate b"]
        where = "no reuse" if worst["from"] == np.inf else f"{worst['from']:g}"
        if not fall > 0:
            verdict = "no fall in success over the sweep"
        elif worst["McNemar p"] < ALPHA:
            verdict = f"cliff between {where} and {worst['to']:g}: success {hi:.2f} -> {lo:.2f}"
        else:
            verdict = f"largest fall between {where} and {worst['to']:g} ({hi:.2f} -> {lo:.2f}) is not significant"
        rates = {f"success at {v:g}": rate(success, lab) for v, lab in zip(own["value"], own["label"])}
        rows.append({"mode": mode, "gate": own["gate"].iloc[0], "from": where, "to": worst["to"],
                     "fall": fall, "McNemar p": worst["McNemar p"], "verdict": verdict, **rates})
    return pd.DataFrame(rows)


def mode_against_mode(success: xr.DataArray, runs: pd.DataFrame, a: str, b: str) -> pd.DataFrame:
    """Mode `a` against mode `b` at each threshold both ran under their own gates (H4: a="full", b="vision_only";
    the gates: a="synchronized", b="full"), trial by trial."""
    own = runs[runs["gate"].isin(["cosine", "synchronized"])]
    label = {(m, v): lab for m, v, lab in zip(own["mode"], own["value"], own["label"])}
    common = sorted({v for m, v in label if m == a} & {v for m, v in label if m == b}, reverse=True)
    return pd.DataFrame([{"threshold": v, **paired(success, label[(a, v)], label[(b, v)])} for v in common])
