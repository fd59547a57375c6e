"""Closed-loop success with the statistics a reviewer accepts: a Wilson interval per success rate, and each method
against a reference on the same trials (same init states, same seeds): the paired difference and an exact McNemar
test on the trials where the two disagree.

A trial is an outcome keyed by (suite, task, trial[, seed]); pairing two methods on those keys is what makes their
difference a measurement of the methods rather than of the init states that happened to be drawn. A trial that
replays another seed's trial on the same init state (the same `trajectory` digest, `dcvla.libero.results`: a
deterministic policy in a scene the init state fixes plays one episode under every seed) is counted once: counted
twice it would narrow the interval and halve the McNemar p without a new observation.
"""

from __future__ import annotations

import math
from statistics import NormalDist

import numpy as np
import pandas as pd
import xarray as xr

ALPHA = 0.05  # a paired difference counts when its exact McNemar p is below this


def fewest_decisive(alpha: float = ALPHA) -> int:
    """The fewest paired trials on which an exact McNemar test can reach p < `alpha`: every one of them won by the
    same side, p = 2 / 2**n (6 at 0.05). Fewer decide nothing whatever their outcomes."""
    n = 1
    while 2 * 0.5**n >= alpha:
        n += 1
    return n


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


def outcomes(results: xr.Dataset) -> xr.DataArray:
    """A results dataset's `success` (1, 0; NaN: not played) with each trial's `trajectory` digest as a coordinate
    when the files recorded it (`replays` needs it)."""
    if "trajectory" not in results:
        return results.success
    return results.success.assign_coords(trajectory=results.trajectory)


def replays(success: xr.DataArray, *methods: str) -> xr.DataArray:
    """True where the trials of `methods` (together) replay an earlier evaluation seed's on the same init state:
    each method's `trajectory` (a coordinate of `success`, dims as its own) equal to its trajectory there. Dims: those
    of `success` but "method". All False without a "trajectory" coordinate or a "seed" dim; a trajectory not
    recorded ("" or NaN) replays nothing."""
    one = success.sel({"method": methods[0]}, drop=True)
    if "trajectory" not in success.coords or "seed" not in success.dims:
        return xr.zeros_like(one, dtype=bool)
    order = [d for d in one.dims if d != "seed"] + ["seed"]
    keys = np.stack([success.trajectory.sel({"method": m}).transpose(*order).values for m in methods], -1)
    keys = keys.reshape(-1, *keys.shape[-2:])  # [init states and tasks, seeds, methods]
    out = np.zeros(keys.shape[:2], bool)
    for row in range(len(keys)):
        seen: set[tuple] = set()
        for s, key in enumerate(map(tuple, keys[row])):
            if all(isinstance(k, str) and k for k in key):
                out[row, s] = key in seen
                seen.add(key)
    shape = [one.sizes[d] for d in order]
    coords = {d: one[d] for d in order if d in one.coords}
    return xr.DataArray(out.reshape(shape), dims=order, coords=coords).transpose(*one.dims)


def _groups(by: tuple[str, ...], **arrays: xr.DataArray) -> list[tuple[tuple, dict[str, np.ndarray]]]:
    """The arrays (same dims) flattened per combination of the `by` dims' values (one group of all without)."""
    if not by:
        return [((), {k: a.values.ravel() for k, a in arrays.items()})]
    stacked = {k: a.stack(group=list(by)) for k, a in arrays.items()}
    keys = next(iter(stacked.values())).group.values
    return [(key if isinstance(key, tuple) else (key,), {k: a.isel(group=i).values.ravel() for k, a in stacked.items()})
            for i, key in enumerate(keys)]


def success_summary(success: xr.DataArray, reference: str, by: tuple[str, ...] = ()) -> pd.DataFrame:
    """Per method (and per `by` dims, e.g. ("suite", "task")): trials, successes, the rate with its 95% Wilson
    interval, and against `reference` on the same trials: the paired difference in rate, the discordant counts and
    the exact McNemar p-value. `success` has a "method" dim and the trial dims; NaN marks a trial not run (a trial
    run by one method only is left out of that pair). Replays (`replays`) are left out and counted."""
    if reference not in success.method.values:
        raise ValueError(f"success_summary: no {reference!r} trials to compare with (methods: "
                         f"{', '.join(map(str, success.method.values))})")
    ref = success.sel({"method": reference}, drop=True)  # sel(method=...) would be the matching keyword
    per_method = {}
    for method in map(str, success.method.values):
        run, pair_again = success.sel({"method": method}, drop=True), replays(success, method, reference)
        per_method[method] = _groups(by, run=run, again=replays(success, method), pair_run=run.where(~pair_again),
                                     pair_ref=ref.where(~pair_again))
    rows = []
    for g, (key, _) in enumerate(per_method[reference]):  # group by group, every method in each
        for method, groups in per_method.items():
            rows.append({"method": method, **dict(zip(by, key)), **_summary_row(groups[g][1], reference)})
    return pd.DataFrame(rows)


def _summary_row(a: dict[str, np.ndarray], reference: str) -> dict:
    """One method's row of `success_summary` from its group's flattened arrays (`_groups`): "run" and "again" (its
    trials, which of them replay), "pair_run" and "pair_ref" (it and the reference with their joint replays NaN)."""
    done = ~np.isnan(a["run"])
    own, again = done & ~a["again"], done & a["again"]
    paired = ~np.isnan(a["pair_run"]) & ~np.isnan(a["pair_ref"])
    run, ref = a["pair_run"][paired] > 0.5, a["pair_ref"][paired] > 0.5
    n, s = int(own.sum()), int(a["run"][own].sum())
    low, high = wilson_interval(s, n) if n else (np.nan, np.nan)
    only_run, only_ref, p = mcnemar_exact(run, ref)
    return {"trials": n, "successes": s, "success rate": s / n if n else np.nan,
            "95% CI low": low, "95% CI high": high, "replays left out": int(again.sum()),
            "paired trials": int(paired.sum()),
            f"difference to {reference}": (run.mean() - ref.mean()) if paired.any() else np.nan,
            "only this succeeded": only_run, f"only {reference} succeeded": only_ref, "McNemar p": p}


def paired(success: xr.DataArray, a: str, b: str) -> dict:
    """Run `a` against run `b` on the trials both played: their rates there, how many both won and how many only one
    of them won, the exact McNemar p and a verdict. `success` has a "method" dim (run labels) and the trial dims; NaN:
    not played. Pairs that replay an earlier seed's pair (`replays`) are left out and counted ("replays left out")."""
    missing = [m for m in (a, b) if m not in success.method.values]
    if missing:
        raise ValueError(f"paired: no trials of {missing} (runs: {', '.join(map(str, success.method.values))})")
    again = replays(success, a, b)
    x, y = (success.sel({"method": m}, drop=True).transpose(*again.dims).values.ravel() for m in (a, b))
    played = ~np.isnan(x) & ~np.isnan(y)
    both = played & ~again.values.ravel()
    x, y = x[both] > 0.5, y[both] > 0.5
    only_a, only_b, p = mcnemar_exact(x, y)
    n = int(both.sum())
    if not n:
        verdict = "no trials in common"
    elif n < fewest_decisive():
        verdict = f"too few paired trials to decide ({n}; p < {ALPHA:g} needs at least {fewest_decisive()})"
    elif p < ALPHA:
        verdict = f"{a if only_a > only_b else b} succeeds more (p = {p:.3g})"
    else:
        verdict = f"no significant difference (p = {p:.3g}, {n} paired trials)"
    rates = (x.mean(), y.mean()) if n else (np.nan, np.nan)
    return {"a": a, "b": b, "paired trials": n, "replays left out": int((played & ~both).sum()),
            "rate a": rates[0], "rate b": rates[1],
            "both": int((x & y).sum()), "only a": only_a, "only b": only_b, "McNemar p": p, "verdict": verdict}
