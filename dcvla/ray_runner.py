"""Running units on a Ray cluster (`dcvla.units`): long-lived actors, each loading the policy once (its study's
`worker(config)`) and running unit after unit; the results stream back to the driver, which writes each one
atomically at the unit's path, so only the driver's file system holds results and a unit is complete or absent.

Faults: an actor whose process dies mid-unit (killed, out of memory, a lost node) is restarted by Ray and the unit
is sent again (`max_restarts`, `max_task_retries`); the driver writes nothing for the lost attempt. A unit that
raises for a reason of its own is not retried: the error is reported with the unit's name after the others have
run (a simulator exception inside a LIBERO trial never gets here: the protocol records it as a failed trial).
"""

from __future__ import annotations

import importlib
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

from .io import atomic_path

Unit = Any  # a dcvla.units.Unit (its `name`, `path`, `trials`), here as the runner sees it

RESTARTS = 3   # times an actor process is restarted, and a unit re-sent, after the process died


def make_worker(factory: tuple[str, dict]) -> Callable[[Unit, Path], None]:
    """The function that runs one unit into a path: `importlib.import_module(module).worker(config)`."""
    module, config = factory
    return importlib.import_module(module).worker(config)


def run_to_bytes(work: Callable[[Unit, Path], None], unit: Unit) -> bytes:
    """Run a unit into a temporary file of this process and return the file's bytes (what a Ray worker sends back).
    A trials unit resumes from the driver's file when the worker can read it (one machine, or a shared disk)."""
    with tempfile.TemporaryDirectory(prefix="dcvla-unit-") as tmp:
        out = Path(tmp) / Path(unit.path).name
        if unit.trials and Path(unit.path).is_file():
            out.write_bytes(Path(unit.path).read_bytes())
        work(unit, out)
        return out.read_bytes()


def write_bytes(data: bytes, path: str | os.PathLike) -> Path:
    """A unit's result, written atomically at its path."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


class UnitWorker:
    """A Ray actor: the study's worker, made once in the actor's process, runs units into bytes."""

    def __init__(self, factory: tuple[str, dict]) -> None:
        os.environ.setdefault("MUJOCO_GL", "egl")  # the simulator is created in this process, headless
        self.factory, self.work = factory, None

    def run(self, unit: Unit) -> bytes:
        if self.work is None:
            self.work = make_worker(self.factory)
        return run_to_bytes(self.work, unit)

    def pid(self) -> int:
        return os.getpid()


class UnitFailed(RuntimeError):
    """Units that raised on their own (not a lost worker); the others completed."""


def connect(address: str):
    """Ray, initialised for this process: `local` starts a cluster on this machine for the run, `auto` joins the
    one `ray start` made here, anything else is a cluster's address."""
    import ray

    if not ray.is_initialized():
        kwargs = {"include_dashboard": False, "log_to_driver": False}
        ray.init(**kwargs) if address == "local" else ray.init(address=address, **kwargs)
    return ray


def start_workers(ray, factory: tuple[str, dict], num_workers: int = 0) -> list:
    """The actors: one per GPU of the cluster where it has GPUs (each holding one; more workers than GPUs share
    them, `num_gpus` a fraction each), else one per CPU."""
    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    count = num_workers or gpus or max(1, int(resources.get("CPU", 1)))
    actor = ray.remote(num_cpus=1, num_gpus=min(1.0, gpus / count) if gpus else 0, max_restarts=RESTARTS,
                       max_task_retries=RESTARTS)(UnitWorker)
    return [actor.remote(factory) for _ in range(count)]


def run_on_ray(units: list[Unit], factory: tuple[str, dict], address: str, num_workers: int = 0,
               progress: bool = True, workers: list | None = None) -> list[Path]:
    """Run `units` on the actors (started here unless given), one at a time each, writing every result at its
    unit's path as it arrives; a progress bar over the units of the whole cluster."""
    import ray as ray_module

    owned = not ray_module.is_initialized()  # a connection made here is closed here (a local cluster stops)
    ray = connect(address)
    try:
        return _dispatch(ray, units, workers or start_workers(ray, factory, num_workers), progress)
    finally:
        if owned:
            ray.shutdown()


def _dispatch(ray, units: list[Unit], workers: list, progress: bool) -> list[Path]:
    from tqdm.auto import tqdm

    queue, running, failed = list(units), {}, []
    bar = tqdm(total=len(units), desc=f"units on {len(workers)} Ray workers", unit="unit", disable=not progress)
    idle = list(workers)
    while queue or running:
        while queue and idle:
            worker, unit = idle.pop(), queue.pop(0)
            running[worker.run.remote(unit)] = (worker, unit)
        ready, _ = ray.wait(list(running), num_returns=1)
        worker, unit = running.pop(ready[0])
        idle.append(worker)
        try:
            write_bytes(ray.get(ready[0]), unit.path)
        except ray.exceptions.RayTaskError as err:  # the unit's own error, raised in the worker
            failed.append(f"{unit.name}: {err.cause!r}")
        bar.update(1)
    bar.close()
    if failed:
        raise UnitFailed(f"{len(failed)} unit(s) failed: " + "; ".join(failed))
    return [Path(u.path) for u in units]
