"""Units of work: the grain at which every study and the closed-loop evaluation run, resume, shard and spread over a
Ray cluster.

A unit is one piece of a study (a method or a reuse mode on an episode; a method on a LIBERO task's trials) and the
one result file it writes, atomically, at a name made from its parameters: a unit is complete or absent, and a rerun
skips the complete ones. A study expands its parameters into units (`<study>.units(config)`), and one worker per
process (`<study>.worker(config)`: the policy loaded once) runs any of them. Three runners, one result:

- in process (`run_units` with no runner set): the units in order, here;
- a shard (`--shard I/N`, `DCVLA_SHARD`): the units I, I + N, I + 2N, ... of the study's deterministic list, for
  SLURM arrays or background processes; `dcvla merge` then makes the study's tables from the shards' files;
- Ray (`--ray auto|ADDRESS|local`, `DCVLA_RAY`): long-lived actors, each loading the policy once and running many
  units (one GPU each where the cluster has GPUs, else one CPU), the simulator created inside the actor's process;
  each result comes back to the driver as bytes and is written there, atomically, so a worker killed mid-unit
  leaves no file: Ray restarts the actor and runs the unit again.
The runner is set for the whole process (`set_runner`, or the environment of a papermill kernel), so a study
notebook runs unchanged under any of them.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

import numpy as np

from .ray_runner import make_worker, run_on_ray

SHARD_ENV, RAY_ENV, MERGE_ENV = "DCVLA_SHARD", "DCVLA_RAY", "DCVLA_MERGE"
T = TypeVar("T")


@dataclass(frozen=True)
class Unit:
    """One unit: the study it belongs to, its parameters (in order: they name it) and its result file.

    `trials`: for a unit of closed-loop trials, how many the file must hold to be complete (0: a recording, complete
    when its file exists: recordings are written whole or not at all)."""

    study: str
    params: tuple[tuple[str, Any], ...]
    path: str
    trials: int = 0

    @property
    def name(self) -> str:
        return f"{self.study}[" + ", ".join(f"{k}={v}" for k, v in self.params) + "]"

    def get(self, key: str) -> Any:
        return dict(self.params)[key]

    def complete(self) -> bool:
        return self.done() >= max(self.trials, 1)

    def done(self) -> int:
        """Trials its file holds (a recording: 1 when its file exists, else 0)."""
        return self.played()[0]

    def played(self) -> tuple[int, list[float]]:
        """(trials its file holds, the wall seconds of each) from one read of the file: a recording's is (1, []) when
        its file exists; a missing or unreadable file holds none (the worker says why when it resumes)."""
        path = Path(self.path)
        if not path.is_file():
            return 0, []
        if not self.trials:
            return 1, []
        from .io import read_dataset

        try:
            ds = read_dataset(path)
        except Exception:
            return 0, []
        walls = np.ravel(ds["wall_s"].values) if "wall_s" in ds else []
        return int(ds.attrs.get("trials_done", 0)), [float(w) for w in walls if np.isfinite(w)]


def make_unit(study: str, path: str | os.PathLike, trials: int = 0, **params) -> Unit:
    return Unit(study, tuple(params.items()), str(path), trials)


def parse_shard(text: str) -> tuple[int, int]:
    """'I/N' -> (I, N), 0 <= I < N."""
    try:
        index, count = (int(x) for x in text.split("/"))
    except ValueError:
        raise ValueError(f"a shard is 'I/N' (e.g. 0/4), got {text!r}") from None
    if not 0 <= index < count:
        raise ValueError(f"shard {text!r}: I must be in 0..N-1")
    return index, count


def shard(units: list[T], index: int, count: int) -> list[T]:
    """Shard `index` of `count`: a deterministic round-robin share of the list (its order is the study's)."""
    return units[index::count]


@dataclass
class Runner:
    """How `run_units` runs: here, one shard, or on Ray; `merge`: every unit must already be complete."""

    shard: tuple[int, int] | None = None
    ray: str = ""                      # "" here; "local" (a cluster started for this process), "auto", an address
    num_workers: int = 0               # Ray actors (0: one per GPU, else one per CPU of the cluster)
    merge: bool = False
    partial: bool = False              # a merge that leaves the trials not played yet out (recordings must be whole)
    threads: int = 0                   # torch's intra-op threads here (0: torch's default, every core)
    done: list[str] = field(default_factory=list)  # units this process ran

    @classmethod
    def from_env(cls) -> "Runner":
        text, merge = os.environ.get(SHARD_ENV, ""), os.environ.get(MERGE_ENV, "")
        return cls(shard=parse_shard(text) if text else None, ray=os.environ.get(RAY_ENV, ""),
                   merge=merge in ("1", "partial"), partial=merge == "partial")


_RUNNER: Runner | None = None


@contextlib.contextmanager
def merging(mode: str) -> Iterator[None]:
    """The environment of a notebook run over results that are there (its kernel inherits it; `Runner.from_env`):
    "1" computes no unit, "partial" neither and tables the trials played so far, "" changes nothing. Restored after."""
    if not mode:
        yield
        return
    before = os.environ.get(MERGE_ENV)
    os.environ[MERGE_ENV] = mode
    try:
        yield
    finally:
        if before is None:
            del os.environ[MERGE_ENV]
        else:
            os.environ[MERGE_ENV] = before


def set_runner(runner: Runner | None) -> None:
    """Set this process's runner (None: the environment's, else in process); `dcvla run` sets it from its flags."""
    global _RUNNER
    _RUNNER = runner


def current_runner() -> Runner:
    global _RUNNER
    if _RUNNER is None:
        _RUNNER = Runner.from_env()
    return _RUNNER


class IncompleteUnits(RuntimeError):
    """A merge found units no shard has completed."""


def refuse_incomplete(units: list[Unit], total: int, partial: bool = False) -> None:
    """A merge's check (`dcvla merge`, and `run_units` under a merging runner): raise `IncompleteUnits` naming the
    units of `units` (of `total`) not complete; with `partial`, units of closed-loop trials may be complete in part."""
    missing = [u for u in units if not u.complete() and not (partial and u.trials)]
    if missing:
        raise IncompleteUnits(f"{len(missing)} of {total} units are not complete (first: {missing[0].name}); run the "
                              "missing shards with the same -p (or the study without --shard) before merging; "
                              "`dcvla progress` with them lists what is left")


def run_units(units: list[Unit], factory: tuple[str, dict], runner: Runner | None = None, progress: bool = True,
              work: Callable[[], Callable[[Unit, Path], None]] | None = None) -> list[Path]:
    """Run the units not complete yet under the process's runner; return every unit's path, in order.

    Args:
        factory: (module, config as a dict): `importlib.import_module(module).worker(config)` makes the function
            that runs one unit into a given path; it loads the policy, so a runner calls it once per process.
        work: makes that function for a run in this process instead (e.g. sharing a notebook's loaded policy).
    """
    runner = runner or current_runner()
    mine = units if runner.shard is None else shard(units, *runner.shard)
    if runner.merge:  # computes nothing; a partial merge reads the trials the files hold, the rest are NaN
        refuse_incomplete(mine, len(units), runner.partial)
        return [Path(u.path) for u in units]
    todo = [u for u in mine if not u.complete()]
    if todo:
        if runner.ray:
            run_on_ray(todo, factory, runner.ray, runner.num_workers, progress)
        else:
            if runner.threads:  # shards sharing a machine: its cores / shards each, or they fight over the cores
                import torch

                torch.set_num_threads(runner.threads)
            run = work() if work is not None else make_worker(factory)
            for unit in _bar(todo, progress):
                run(unit, Path(unit.path))
        runner.done.extend(u.name for u in todo)
    return [Path(u.path) for u in units]


def progress(units: list[Unit], shards: int = 0) -> str:
    """How far a study's units are: units complete, closed-loop trials played of those asked for, per shard of
    `shards` (the round-robin of `--shard I/N`) when given, then each incomplete unit and its trials.

    "~H h left": the trials not played yet, one after another, each at its unit's mean wall time so far (a unit
    with none played: the mean of every trial played), which is a shard's time left when it runs in one process."""
    read = [u.played() for u in units]  # each file once
    done = [min(n, max(u.trials, 1)) for u, (n, _) in zip(units, read)]
    complete = [n >= max(u.trials, 1) for u, n in zip(units, done)]
    walls = [unit_walls for _, unit_walls in read]
    seen = [w for unit_walls in walls for w in unit_walls]

    def line(name: str, picked: list[int]) -> str:
        trial_units = [i for i in picked if units[i].trials]
        played, asked = sum(done[i] for i in trial_units), sum(units[i].trials for i in trial_units)
        left = sum((units[i].trials - done[i]) * float(np.mean(walls[i] or seen)) for i in trial_units) if seen else 0
        return (f"{name}: {sum(complete[i] for i in picked)} of {len(picked)} units complete"
                + (f"; trials {played} of {asked} ({played / asked:.0%})" if asked else "")
                + (f"; ~{left / 3600:.1f} h left" if left else ""))

    index = list(range(len(units)))
    lines = [line(units[0].study if units else "no units", index)]
    lines += [line(f"  shard {i}/{shards}", shard(index, i, shards)) for i in range(shards)]
    lines += [f"  {units[i].name}: " + (f"{done[i]} of {units[i].trials} trials" if units[i].trials else "absent")
              for i in index if not complete[i]]
    return "\n".join(lines)


def _bar(units: list[Unit], progress: bool):
    from tqdm.auto import tqdm

    return tqdm(units, desc="units", unit="unit", disable=not progress)
