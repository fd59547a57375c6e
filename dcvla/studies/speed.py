"""Speed in the studies, from paired timings: per episode, one timing unit steps every run of the study on that
episode's frames, interleaved frame by frame in a rotating order (`dcvla.timing`, no recorder attached), and the
tables' speed columns come from those timings only.

The recordings keep their own `latency_ms`, but each run is recorded alone, one after another, so a ratio of two
recordings' times compares two moments of the machine as much as two methods (a busy machine showed dual_cache
at 0.95x beside a 1.53x FLOPs ratio); no table presents it as a speedup.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pandas as pd
import xarray as xr

from ..io import read_dataset, write_dataset
from ..streaming import step_args
from ..timing import paired_latency
from ..units import Unit, make_unit

TIMING = "timing"  # the folder of a study's timing files, beside its runs' folders
SPEEDUP, TOTAL = "speedup (interleaved, median)", "speedup (interleaved, total)"
MEDIAN_MS, HZ = "ms (interleaved, median)", "Hz (interleaved, median)"
COLUMNS = (SPEEDUP, TOTAL, MEDIAN_MS, HZ)


def timing_unit(study: str, reference_run: Path, names: Sequence[str], **params) -> Unit:
    """The timing unit of one episode: its file sits in `timing/` beside the runs' folders, named as the episode's
    reference run plus a digest of the timed runs' names (another set of runs is another file, never a stale one)."""
    digest = hashlib.sha1(",".join(names).encode()).hexdigest()[:8]
    path = Path(reference_run).parent.parent / TIMING / f"{Path(reference_run).stem}_{digest}.nc"
    return make_unit(study, path, timed_runs=len(names), **params)


def is_timing(unit: Unit) -> bool:
    return "timed_runs" in dict(unit.params)


def time_episode(policies: Mapping[str, object], images: np.ndarray, instruction: str, states: np.ndarray | None,
                 device: str, path: Path, labels: dict) -> Path:
    """Time `policies` (name -> policy; the reference first) on one episode's inputs, as `record_episode` takes
    them, interleaved (`dcvla.timing.paired_latency`), into `path` (atomic) with `labels` in its attrs."""
    steps = step_args(next(iter(policies.values())), images, instruction, states)
    ds = paired_latency(policies, steps, device)
    ds.attrs.update(labels)
    return write_dataset(ds, path)


def load_timings(units: list[Unit]) -> list[xr.Dataset]:
    return [read_dataset(u.path) for u in units if is_timing(u)]


def speed_table(timings: list[xr.Dataset], reference: str) -> pd.DataFrame:
    """Per timed run (index "method"), over every frame of every timing: the median over frames of the paired ratio
    reference ms / run ms (`SPEEDUP`), the ratio of their total times (`TOTAL`: comparable to a FLOPs ratio; a
    cache's per-frame latency is bimodal with keyframes, so a median alone can mislead), the median ms and its Hz."""
    if not timings:
        raise ValueError("speed_table: no timing files (each study's plan has one timing unit per episode)")
    missing = [ds.attrs.get("episode", "?") for ds in timings if reference not in ds.run.values]
    if missing:
        raise ValueError(f"speed_table: the timings of {missing} hold no {reference!r} run to compare with")
    pairs: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {}  # per run: (reference ms, run ms) [frame] per episode
    for ds in timings:
        for name in ds.run.values:
            pairs.setdefault(str(name), []).append((ds.latency_ms.sel(run=reference).values, ds.latency_ms.sel(run=name).values))
    rows = []
    for name, episodes in pairs.items():
        ref, run = np.concatenate([r for r, _ in episodes]), np.concatenate([m for _, m in episodes])
        rows.append({"method": name, SPEEDUP: float(np.median(ref / run)), TOTAL: float(ref.sum() / run.sum()),
                     MEDIAN_MS: float(np.median(run)), HZ: 1e3 / float(np.median(run))})
    return pd.DataFrame(rows).set_index("method")


def speed_note(timings: list[xr.Dataset], reference: str) -> str:
    """How the speed columns were measured, in a few lines (a table keeps it in its attrs, "speed")."""
    frames = sum(ds.sizes["frame"] for ds in timings)
    where = sorted({f"{ds.attrs.get('device', '?')} {ds.attrs.get('dtype', '?')}, {ds.attrs.get('torch_threads', '?')} "
                    f"torch threads" for ds in timings})
    warmup = "/".join(sorted({str(ds.attrs.get("warmup_frames", 0)) for ds in timings}))
    return "\n".join([
        f"{SPEEDUP}: median over frames of the paired latency ratio {reference} / run; {TOTAL}: ratio of their "
        f"total times over the same frames; {MEDIAN_MS}: the run's median latency ({HZ}: 1000 / it).",
        f"Measured per episode with every run re-stepped on the same frames in one process, interleaved frame by "
        f"frame in a rotating order (after a {warmup}-frame warm-up, no recorder attached): {frames} frames per run from "
        f"{len(timings)} episode(s), {'; '.join(where)}. The recordings' own latency_ms (each run alone, one after "
        f"another) is not a speedup."])


def stage_ratios(timings: list[xr.Dataset], reference: str) -> pd.DataFrame:
    """Per (run, stage): the reference's total stage time over the run's, from the interleaved timings (the
    policies' own stage clocks)."""
    rows = []
    for ds in timings:
        totals = ds.stage_ms.sum("frame")  # [run, stage]
        rows += [{"method": str(name), "stage": str(stage), "ms": float(totals.sel(run=name, stage=stage)),
                  "reference ms": float(totals.sel(run=reference, stage=stage))}
                 for name in ds.run.values for stage in ds.stage.values]
    table = pd.DataFrame(rows).groupby(["method", "stage"], as_index=False).sum()
    table["time ratio"] = table["reference ms"] / table["ms"]
    return table
