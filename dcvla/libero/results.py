"""What a closed-loop trial records (`TrialResult`) and the variables of a result file, one row per trial.

A trial's `trajectory` is a digest of everything the closed loop exchanged: every input the policy was given (the
views, the state) and every action executed. Two trials with the same digest on the same init state played the
same episode, step for step: a deterministic policy in a scene whose reset draws nothing the init state does not
fix replays its trial under every evaluation seed, and such a replay adds no evidence (`dcvla.success` counts it
once).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np
import xarray as xr


@dataclass
class TrialResult:
    """Outcome of one closed-loop trial.

    Attributes:
        success: the env reported `done` within the step budget.
        steps: env steps executed after the wait (one per action; for single-action policies, one per
            policy call).
        error: "" or the exception that ended the trial (type: message).
        latency_s: wall seconds of each `policy.step` call (fewer entries than steps for chunk policies).
        wall_s: wall seconds of the whole trial, env stepping and rendering included.
        reuse: the policy's `last_reuse` after each `policy.step` call (the share of its cache's unit, e.g. a flow
            policy's prefix K/V, taken from its store); NaN for a policy that does not report it.
        trajectory: the hex digest of the policy's inputs and the executed actions (`TrajectoryDigest`).
        threads: torch's intra-op threads during the trial (0: not recorded). The policy's float sums, so the
            trajectory, depend on them: the same init state and seed replay bit for bit at the same count only.
    """

    success: bool
    steps: int
    error: str = ""
    latency_s: np.ndarray = field(default_factory=lambda: np.zeros(0))
    wall_s: float = 0.0
    reuse: np.ndarray = field(default_factory=lambda: np.zeros(0))
    trajectory: str = ""
    threads: int = 0


class TrajectoryDigest:
    """A running 64-bit BLAKE2b digest of a trial's closed loop: arrays are fed with their dtype and shape, so the
    same values in another layout are another trajectory."""

    def __init__(self) -> None:
        self._hash = hashlib.blake2b(digest_size=8)

    def update(self, *arrays: np.ndarray) -> None:
        for a in arrays:
            a = np.ascontiguousarray(a)
            self._hash.update(f"{a.dtype.str}{a.shape}".encode())
            self._hash.update(a.tobytes())

    def hexdigest(self) -> str:
        return self._hash.hexdigest()


TRAJECTORY_DESCRIPTION = ("digest of the policy's inputs and the executed actions (dcvla.libero.results); the same "
                          "on the same init state: the same episode; '': not recorded")
THREADS = "torch's intra-op threads during the trial (the trajectory depends on them); 0: not recorded"


def trials_dataset(trials: list[int], results: list[TrialResult], budget: int) -> xr.Dataset:
    """One row per trial of `results` (init state indices `trials`), the per-call series padded to `budget`."""
    lat = np.full((len(trials), budget), np.nan, dtype=np.float64)
    reuse = np.full((len(trials), budget), np.nan, dtype=np.float64)
    stats = {k: np.full(len(trials), np.nan) for k in ("mean", "p50", "p90", "max")}
    for i, r in enumerate(results):
        ms = 1000 * r.latency_s[:budget]
        lat[i, : len(ms)] = ms
        reuse[i, : len(r.reuse[:budget])] = r.reuse[:budget]
        if len(ms):
            stats["mean"][i], stats["max"][i] = ms.mean(), ms.max()
            stats["p50"][i], stats["p90"][i] = np.percentile(ms, [50, 90])
    data = {
        "success": ("trial", np.array([r.success for r in results], dtype=np.int8), {"description": "1 if env done"}),
        "steps": ("trial", np.array([r.steps for r in results], dtype=np.int32), {"units": "env steps after the wait"}),
        "error": ("trial", np.array([r.error for r in results], dtype=object), {"description": "'' or the exception"}),
        "wall_s": ("trial", np.array([r.wall_s for r in results]), {"units": "s"}),
        "trajectory": ("trial", np.array([r.trajectory for r in results], dtype=object),
                       {"description": TRAJECTORY_DESCRIPTION}),
        "torch_threads": ("trial", np.array([r.threads for r in results], dtype=np.int32), {"description": THREADS}),
        "latency_ms": (("trial", "step"), lat, {"units": "ms", "description": "wall time of each policy.step call; NaN past the last call"}),
    }
    for k, v in stats.items():
        data[f"latency_{k}_ms"] = ("trial", v, {"units": "ms"})
    data.update(reuse_variables(reuse))
    return xr.Dataset({k: xr.Variable(d, v, a) for k, (d, v, a) in data.items()},
                      coords={"trial": ("trial", np.asarray(trials, dtype=np.int32), {"description": "init state index"}),
                              "step": np.arange(budget, dtype=np.int32)})


def reuse_variables(reuse: np.ndarray) -> dict:
    """The closed-loop reuse of each trial from its per-call shares [trial, step] (NaN past the last call, or all NaN:
    the policy does not report it): the shares, their mean and the calls that reused anything."""
    called = ~np.isnan(reuse)
    with np.errstate(invalid="ignore"):
        mean = np.where(called.any(1), np.nansum(reuse, 1) / np.maximum(called.sum(1), 1), np.nan)
    reused = np.where(called.any(1), (reuse > 0).sum(1), -1).astype(np.int32)
    return {
        "reuse": (("trial", "step"), reuse, {"description": "the policy's last_reuse after each policy.step call (share "
                                                           "of its cache's unit taken from the store); NaN: no call, "
                                                           "or not reported"}),
        "reuse_mean": ("trial", mean, {"description": "mean of reuse over the trial's calls; NaN: not reported"}),
        "reused_calls": ("trial", reused, {"description": "policy.step calls that reused anything; -1: not reported"}),
    }


def with_recorded(old: xr.Dataset) -> xr.Dataset:
    """A result file written before trials recorded their reuse, trajectory or threads, with those variables as not
    reported (NaN / -1 / "" / 0)."""
    new = {}
    if "reuse" not in old:
        shape = (old.sizes["trial"], old.sizes["step"])
        new = {k: xr.Variable(d, v, a) for k, (d, v, a) in reuse_variables(np.full(shape, np.nan)).items()}
    if "trajectory" not in old:
        new["trajectory"] = xr.Variable("trial", np.full(old.sizes["trial"], "", dtype=object),
                                        {"description": TRAJECTORY_DESCRIPTION})
    if "torch_threads" not in old:
        new["torch_threads"] = xr.Variable("trial", np.zeros(old.sizes["trial"], np.int32), {"description": THREADS})
    return old.assign(new) if new else old


