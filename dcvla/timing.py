"""Paired latency: several policies (methods, reuse modes) timed on the same frames, interleaved frame by frame.

Timing each method's run after the other's lets the machine's load fall on them unequally (another job starts,
the clock throttles) and makes their ratio a comparison of two moments, not of two methods. Here every policy
steps each frame before any steps the next one, in an order that rotates from frame to frame (frame f starts with
policy f mod n), so a frame's latencies are measured under the same load, and no policy always runs first in a
frame or always right after the same other one (in the caches it left warm). The ratio of two policies' latencies
on one frame is then a paired measurement; its median over frames is the speedup least disturbed by other work.
The pairing is as close as the round of one frame is short: with many runs (the stability cliff's grid) or a
machine whose load changes within seconds, a frame's pair is measured seconds apart.

A step is timed between two device synchronisations (on a GPU, kernels run asynchronously; the policies' own
`StageClock` synchronises per stage, never per layer, and so adds no host sync beyond those here).
"""

from __future__ import annotations

import contextlib
import time
from typing import Iterator, Mapping, Sequence

import numpy as np
import torch
import xarray as xr

WARMUP = 2  # frames each policy steps before the timing: a full-compute keyframe and a reusing step, so neither
            # a first call's one-off costs (allocations, lazily loaded kernels) nor a reuse path's lands in a timing


def synchronize(device: torch.device | str) -> None:
    """Wait for the device's queued work (a no-op on the CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def timer(device: torch.device | str, out: dict, key: str = "ms") -> Iterator[None]:
    """Wall-clock milliseconds of the block into out[key], the device synchronised before and after."""
    synchronize(device)
    start = time.perf_counter()
    yield
    synchronize(device)
    out[key] = (time.perf_counter() - start) * 1e3


def rotation(names: Sequence[str], turn: int) -> list[str]:
    """The order of turn `turn`: `names` rotated to start at names[turn mod len(names)]."""
    k = turn % len(names)
    return list(names[k:]) + list(names[:k])


def warm_up(policies: Mapping[str, object], steps: Sequence[tuple], frames: int = WARMUP) -> None:
    """Step every policy on the first `frames` of `steps`, then reset them all (the timing starts afresh)."""
    for policy in policies.values():
        policy.reset()
        for args in steps[:frames]:
            policy.step(*args)
        policy.reset()


def interleave(policies: Mapping[str, object], steps: Sequence[tuple], device: torch.device | str,
               first_turn: int = 0) -> Iterator[tuple[int, str, int, float]]:
    """Reset the policies, then step them all on each of `steps` (each one `policy.step`'s arguments), interleaved
    in the rotating order (`rotation`, frame f at turn `first_turn + f`); yields (frame, name, position in that
    frame's order, milliseconds) right after each step, while the policy's last record (`records[-1]`) is that step's."""
    names = list(policies)
    for policy in policies.values():
        policy.reset()
    for frame, args in enumerate(steps):
        for position, name in enumerate(rotation(names, first_turn + frame)):
            timed: dict[str, float] = {}
            with timer(device, timed):
                policies[name].step(*args)
            yield frame, name, position, timed["ms"]


def paired_latency(policies: Mapping[str, object], steps: Sequence[tuple], device: torch.device | str,
                   warmup: int = WARMUP) -> xr.Dataset:
    """Every policy's latency on every frame of `steps`, interleaved (`interleave`) after a warm-up (`warm_up`).

    Returns:
        latency_ms [run, frame]: the whole step, synchronised at both ends; stage_ms [run, frame, stage]: the
        policy's own per-stage clock (its step record's `latency_ms`; NaN for a stage it did not run); order [run,
        frame]: the position each ran at in that frame's order. Runs are named as in `policies` (a dimension
        `method` would clash with xarray's `sel(method=...)`). attrs: the device, torch's threads, the warm-up.
    """
    names = list(policies)
    if not names or not steps:
        raise ValueError(f"paired_latency needs policies and frames, got {len(names)} policies and {len(steps)} frames")
    warm_up(policies, steps, warmup)
    latency, order = np.zeros((len(names), len(steps))), np.zeros((len(names), len(steps)), np.int32)
    stages: dict[tuple[int, int], dict[str, float]] = {}
    for frame, name, position, ms in interleave(policies, steps, device):
        m = names.index(name)
        latency[m, frame], order[m, frame] = ms, position
        stages[m, frame] = dict(policies[name].records[-1].latency_ms)
    stage_names = list(dict.fromkeys(s for per_stage in stages.values() for s in per_stage))
    stage_ms = np.array([[[stages[m, f].get(s, np.nan) for s in stage_names] for f in range(len(steps))]
                         for m in range(len(names))]).reshape(len(names), len(steps), len(stage_names))
    return xr.Dataset(
        {"latency_ms": (("run", "frame"), latency, {"units": "ms", "description": "one step, device-synchronised"}),
         "stage_ms": (("run", "frame", "stage"), stage_ms, {"units": "ms", "description": "the policy's stage clock"}),
         "order": (("run", "frame"), order, {"description": "position in the frame's rotating order"})},
        coords={"run": names, "frame": np.arange(len(steps)), "stage": stage_names},
        attrs={"device": str(device), "torch_threads": torch.get_num_threads(), "warmup_frames": min(warmup, len(steps)),
               "timing": "methods interleaved per frame in a rotating order (dcvla.timing)"})
