"""Closed-loop success with the statistics a reviewer accepts: a Wilson interval per success rate, and each method
against a reference on the same trials (same init states, same seeds): the paired difference and an exact McNemar
test on the trials where the two disagree.

A trial is an outcome keyed by (suite, task, trial[, seed]); pairing two methods on those keys is what makes their
difference a measurement of the methods rather than of the init states that happened to be drawn.
"""

from __future__ import annotations

import math
from statistics import NormalDist

import numpy as np
import pandas as pd
import xarray as xr

ALPHA = 0.05  # a paired difference counts when its exact McNemar p is below this


def wilson_interval(successes: int, trials: int, confidence: float = 0.95) -> tuple[float, float]:
    """The Wilson score interval of a success rate (good at small n and rates near 0 or 1, unlike the normal one)."""
    if trials < 1 or not 0 <= successes <= trials:
        raise ValueError(f"wilson_interval needs 0 <= successes <= trials and trials >= 1, got {successes}/{trials}")
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    p, n = successes / trials, trials
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def mcnemar_exact(a: np.ndarray, b: np.ndarray) -> tuple[int, int, float]:
    """Paired outcomes a, b (bool, same trials): (trials only a succeeded, trials only b succeeded, the exact
    two-sided McNemar p-value: the binomial test of those discordant counts against 1/2)."""
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    if a.shape != b.shape:
        raise ValueError(f"mcnemar_exact needs paired outcomes, got shapes {a.shape} and {b.shape}")
    only_a, only_b = int((a & ~b).sum()), int((~a & b).sum())
    n, k = only_a + only_b, min(only_a, only_b)
    p = min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2**n) if n else 1.0
    return only_a, only_b, p


def success_summary(success: xr.DataArray, reference: str, by: tuple[str, ...] = ()) -> pd.DataFrame:
    """Per method (and per `by` dims, e.g. ("suite", "task")): trials, successes, the rate with its 95% Wilson
    interval, and against `reference` on the same trials: the paired difference in rate, the discordant counts and
    the exact McNemar p-value. `success` has a "method" dim and the trial dims; NaN marks a trial not run (a trial
    run by one method only is left out of that pair)."""
    if reference not in success.method.values:
        raise ValueError(f"success_summary: no {reference!r} trials to compare with (methods: "
                         f"{', '.join(map(str, success.method.values))})")
    trial_dims = [d for d in success.dims if d != "method" and d not in by]
    groups = [((), success)] if not by else list(success.stack(group=list(by)).groupby("group"))
    rows = []
    for key, data in groups:
        data = data.stack(trial_key=trial_dims) if trial_dims else data
        ref = data.sel({"method": reference}).values  # sel(method=...) would be the matching keyword
        for method in data.method.values:
            run = data.sel({"method": method}).values
            done = ~np.isnan(run)
            paired = done & ~np.isnan(ref)
            n, s = int(done.sum()), int(np.nansum(run))
            low, high = wilson_interval(s, n) if n else (np.nan, np.nan)
            only_run, only_ref, p = mcnemar_exact(run[paired] > 0.5, ref[paired] > 0.5)
            rows.append({"method": str(method), **dict(zip(by, key if isinstance(key, tuple) else (key,))),
                         "trials": n, "successes": s, "success rate": s / n if n else np.nan,
                         "95% CI low": low, "95% CI high": high, "paired trials": int(paired.sum()),
                         f"difference to {reference}": (run[paired].mean() - ref[paired].mean()) if paired.any() else np.nan,
                         "only this succeeded": only_run, f"only {reference} succeeded": only_ref, "McNemar p": p})
    return pd.DataFrame(rows)


def paired(success: xr.DataArray, a: str, b: str) -> dict:
    """Run `a` against run `b` on the trials both played: their rates there, how many both won and how many only one
    of them won, the exact McNemar p and a verdict. `success` has a "method" dim (run labels) and the trial dims; NaN: not played."""
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
            "both": int((x & y).sum()), "only a": only_a, "only b": only_b, "McNemar p": p, "verdict": verdict}
