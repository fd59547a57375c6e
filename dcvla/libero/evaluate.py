"""Closed-loop LIBERO evaluation with the upstream OpenVLA protocol; results as resumable xarray files.

`run_trial` is one episode of openvla/experiments/robot/libero/run_libero_eval.py: reset, load init state
i, 10 dummy-action waits, then up to MAX_STEPS[suite] policy steps on the processed agent-view frame,
gripper post-processing, success = `done` from `env.step`, any exception ends the trial as a failure with
its message recorded. `evaluate_task` runs trials of one (method, suite, task) with a tqdm bar and
rewrites `<run_dir>/<method>/<suite>_task<NN>.nc` atomically after every trial, so a crash loses at most
the trial in flight and a rerun skips the trials already in the file. One departure from upstream, which seeds
once per run: every trial starts from the evaluation's seeds, so a resumed or sharded run gives the trials an
uninterrupted one gives, and two methods' trials on an init state differ by the methods alone (with the RNGs
running on, a micro policy took 104 steps on init state 1 after trial 0 and 102 reseeded; 239 and 90 on init
state 6 in two runs that had played other trials before it).

pi0 / pi0.5 policies (openpi's examples/libero/main.py) are run the openpi way: `uses_state = True` adds the
8-dim robot state to each call, an action chunk [horizon, 7] is executed open-loop for its first
`replan_steps` actions before the policy is called again, and `action_convention = "libero"` skips the
OpenVLA gripper flip (the gripper is only binarised). Policies without these attributes run as before.

The cameras render only on the steps whose observation the policy reads (`env.CamerasOnDemand`): with chunks of 5-8
actions, one render in 5-8 instead of one per step, the trial unchanged bit for bit (the same trajectory digest;
`benchmarks/trial_rendering.py` measures both ways side by side).
"""

from __future__ import annotations

import contextlib
import random
import sys
import time
import traceback
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import xarray as xr

from dcvla.io import CorruptFileError, read_dataset, write_dataset

from . import protocol
from .env import CamerasOnDemand, close_env, get_init_states, get_task, make_env
from .results import TrajectoryDigest, TrialResult, trials_dataset, with_recorded

#: 2: every trial starts from the evaluation's seeds (in version 1 the RNGs ran on from the trials before it in the
#: process, so a trial's outcome depended on which trials ran first: a resumed run was another run).
RESULT_VERSION = 2


def seed_everything(seed: int = protocol.SEED) -> None:
    """Upstream `set_seed_everywhere`: python, numpy and torch RNGs."""
    random.seed(seed)
    np.random.seed(seed)
    try:
        import torch

        torch.manual_seed(seed)
    except ImportError:  # the protocol itself does not need torch
        pass


def _torch_threads() -> int:
    """torch's intra-op threads (0: torch not loaded, so no policy of this process computes with it)."""
    torch = sys.modules.get("torch")
    return torch.get_num_threads() if torch is not None else 0


def run_trial(policy: Any, env: Any, suite: str, init_state: np.ndarray, instruction: str,
              max_steps: int | None = None, center_crop: bool = True, every_frame: bool = False) -> TrialResult:
    """One closed-loop episode, upstream protocol.

    The policy is called when no planned action is left: a single action [7] plans one step (the OpenVLA
    loop), an action chunk [horizon, 7] plans its first `min(policy.replan_steps, horizon)` rows (openpi's
    action_plan deque; `replan_steps` defaults to 1). Every executed action is one env step of the budget
    and `done` on any of them ends the trial.

    Args:
        policy: object with `reset()` and `step(image uint8 [224,224,3], instruction) -> [7]`. Optional
            attributes: `uses_state = True` (called as `step(image, instruction, state)` with
            `protocol.obs_state` of the current observation, [8] float32), `uses_wrist = True` (the first
            argument is [agent view, wrist view], both processed alike, as OpenVLA-OFT's evaluation does; the env
            must render the wrist camera), `replan_steps` (int >= 1) for
            chunk policies, and `action_convention` ("openvla", the default: gripper [0, 1] flipped and
            binarised by `protocol.postprocess_action`; "libero": gripper already -1 open / +1 close, only
            binarised by `protocol.postprocess_libero_action`).
        env: a LIBERO env for the task (`make_env`, 256x256 render).
        suite: suite name (selects the step budget).
        init_state: the benchmark init state to load.
        instruction: the task's language instruction.
        max_steps: override the suite's step budget (e.g. for a quick smoke run).
        center_crop: the policy-time 90% center crop (on for the LIBERO fine-tunes).
        every_frame: render the cameras at every step (a wrapper filming the trial); by default only the steps
            whose observation the policy reads render (`env.CamerasOnDemand`: the trial is the same, faster).

    Returns:
        A TrialResult. Exceptions (from the env or the policy) are caught and recorded, as upstream.

    Raises:
        ValueError: the policy declares an unknown `action_convention` or a `replan_steps` below 1 (a
            misconfigured policy, not a failed trial).
    """
    budget = protocol.max_steps(suite) if max_steps is None else int(max_steps)
    loop = _ClosedLoop(policy, instruction, protocol.action_convention(policy), _replan_steps(policy),
                       bool(getattr(policy, "uses_state", False)), center_crop, uses_wrist(policy))
    error, t_start = "", time.perf_counter()
    with contextlib.nullcontext(_always) if every_frame else CamerasOnDemand(env) as cameras:
        try:
            obs = _start(env, policy, init_state, cameras)
            loop.run(env, obs, budget, cameras)
        except Exception as exc:  # noqa: BLE001 - upstream counts any exception as a failed trial
            error = _describe(exc)
    return TrialResult(loop.success, loop.steps, error, np.asarray(loop.latency, dtype=np.float64),
                       time.perf_counter() - t_start, np.asarray(loop.reuse, dtype=np.float64),
                       loop.digest.hexdigest(), _torch_threads())


@dataclass
class _ClosedLoop:
    """The policy-env loop of one trial; what it did so far survives an exception (the trial's record)."""

    policy: Any
    instruction: str
    convention: str
    replan: int
    uses_state: bool
    center_crop: bool
    uses_wrist: bool = False
    steps: int = 0
    success: bool = False
    latency: list[float] = field(default_factory=list)
    reuse: list[float] = field(default_factory=list)
    plan: deque = field(default_factory=deque)
    digest: TrajectoryDigest = field(default_factory=TrajectoryDigest)  # what it was shown and did, step by step

    def run(self, env: Any, obs: dict, budget: int, cameras: Callable[[bool], None]) -> None:
        """Execute planned actions until `done` or the budget; call the policy when the plan is empty. `cameras(on)`
        before each step: on for the step whose observation the policy reads (`CamerasOnDemand`)."""
        while self.steps < budget:
            if not self.plan:
                self.plan.extend(protocol.action_chunk(self._call_policy(obs))[: self.replan])
            action = protocol.postprocess(self.plan.popleft(), self.convention)
            self.digest.update(action)
            cameras(not self.plan)
            obs, _, done, _ = env.step(action.tolist())
            self.steps += 1
            if done:
                self.success = True
                return

    def _call_policy(self, obs: dict) -> np.ndarray:
        image = protocol.policy_input(protocol.process_frame(obs["agentview_image"]), crop=self.center_crop)
        if self.uses_wrist:
            if "robot0_eye_in_hand_image" not in obs:
                raise ValueError("the policy uses the wrist camera but the env does not render it; "
                                 "make_env(..., cameras=('agentview', 'robot0_eye_in_hand'))")
            wrist = protocol.policy_input(protocol.process_frame(obs["robot0_eye_in_hand_image"]), crop=self.center_crop)
            image = [image, wrist]
        state = protocol.obs_state(obs) if self.uses_state else None
        self.digest.update(*(image if self.uses_wrist else [image]), *([] if state is None else [state]))
        t0 = time.perf_counter()
        if self.uses_state:
            raw = self.policy.step(image, self.instruction, state)
        else:
            raw = self.policy.step(image, self.instruction)
        self.latency.append(time.perf_counter() - t0)
        reuse = getattr(self.policy, "last_reuse", None)
        self.reuse.append(np.nan if reuse is None else float(reuse))
        return raw


def _start(env: Any, policy: Any, init_state: np.ndarray, cameras: Callable[[bool], None]) -> dict:
    """Reset the env, load the init state, reset the policy, wait `protocol.WAIT_STEPS` dummy steps (objects
    settle); the observation after them, the only one rendered."""
    cameras(False)
    env.reset()
    cameras(not protocol.WAIT_STEPS)
    obs = env.set_init_state(init_state)
    policy.reset()
    for wait in range(protocol.WAIT_STEPS):
        cameras(wait == protocol.WAIT_STEPS - 1)
        obs, _, _, _ = env.step(list(protocol.DUMMY_ACTION))
    return obs


def _always(on: bool) -> None:
    """The cameras of `run_trial(..., every_frame=True)`: on at every step, whatever is asked."""


def _describe(exc: BaseException) -> str:
    """`Type: message (at file:line)` of the exception that ended a trial."""
    error = f"{type(exc).__name__}: {exc}"
    last = traceback.extract_tb(exc.__traceback__)[-1:]
    if last:
        error += f" (at {Path(last[0].filename).name}:{last[0].lineno})"
    return error


def _replan_steps(policy: Any) -> int:
    """`policy.replan_steps` (default 1), validated: a positive integer."""
    value = getattr(policy, "replan_steps", 1)
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{type(policy).__name__}.replan_steps must be an integer >= 1, got {value!r}")
    return int(value)


def result_path(run_dir: str | Path, method: str, suite: str, task_id: int, seed: int = 0,
                trials: range | None = None) -> Path:
    """`<run_dir>/<method>/<suite>_task<NN>.nc`; `..._seed<S>` for seed S > 0; `..._trials<A>-<B>` for a file of
    init states A..B only (`trials`, one of several files of the same method, task and seed: `load_results`)."""
    block = f"_trials{trials[0]:02d}-{trials[-1]:02d}" if trials is not None else ""
    return Path(run_dir) / method / f"{suite}_task{task_id:02d}{f'_seed{seed}' if seed else ''}{block}.nc"


def seeds_of(seed: int) -> tuple[int, int]:
    """(numpy/torch/python seed, env seed) of evaluation seed `seed`: 0 is the upstream protocol's (7 and 0); seed s
    shifts both by s, so every seed is another draw of the policy's sampling noise and of the simulator's RNG on the
    same init states."""
    if seed < 0:
        raise ValueError(f"evaluation seed must be >= 0, got {seed}")
    return protocol.SEED + seed, protocol.ENV_SEED + seed


#: Attributes added after RESULT_VERSION 1 files were first written, with the value those files imply.
_POLICY_ATTR_DEFAULTS = {"uses_state": 0, "uses_wrist": 0, "replan_steps": 1, "action_convention": "openvla",
                         "evaluation_seed": 0}


def uses_wrist(policy: Any) -> bool:
    """The policy takes [agent view, wrist view] (OpenVLA-OFT); the env must then render the wrist camera."""
    return bool(getattr(policy, "uses_wrist", False))


def cameras_for(policy: Any) -> tuple[str, ...]:
    return ("agentview", "robot0_eye_in_hand") if uses_wrist(policy) else ("agentview",)


def _check_compatible(old: xr.Dataset, attrs: dict, path: Path) -> None:
    for key in ("suite", "task_id", "method", "max_steps", "center_crop", "result_version", *_POLICY_ATTR_DEFAULTS):
        have = old.attrs.get(key, _POLICY_ATTR_DEFAULTS.get(key))
        have = have.item() if isinstance(have, np.generic) else have  # netCDF's numpy scalars, shown as plain values
        if str(have) != str(attrs[key]):
            raise ValueError(f"{path} was written with {key}={have!r}, this run has {attrs[key]!r}; "
                             "use another run_dir or method name, or delete the file")


def evaluate_task(policy: Any, suite: str, task: int | str, run_dir: str | Path, method: str | None = None,
                  trials: int | Iterable[int] = protocol.NUM_TRIALS, max_steps: int | None = None,
                  center_crop: bool = True, progress: bool = True, env: Any = None,
                  path: str | Path | None = None, seed: int = 0) -> xr.Dataset:
    """Evaluate one policy on one task; resumable, one netCDF file per (method, suite, task).

    Args:
        policy: the policy (reset/step interface); `policy.name` names the method when `method` is None.
        suite: suite name; task: id or name.
        run_dir: root directory of the run; results go to `result_path(run_dir, method, suite, task_id)`.
        method: label for this method (default: `policy.name`, else the class name).
        trials: number of trials (init states 0..n-1, in order) or an explicit list of init-state indices.
        max_steps: override the suite's step budget (keep None for the real protocol).
        center_crop: policy-time center crop.
        progress: show a tqdm bar.
        env: an existing env for this task to reuse (else one is built and closed here).
        path: the result file instead of `result_path(run_dir, ...)` (a `dcvla.units` unit's).
        seed: the evaluation seed (`seeds_of`; 0: the protocol's): python's, numpy's, torch's and the env's RNGs are
            reseeded from it before every trial (upstream seeds once per run; trial 0 is the same either way).

    Returns:
        The dataset for all trials in the file (earlier runs' included), dims (trial, step), sorted by trial.
    """
    info = get_task(suite, task)
    method = method or getattr(policy, "name", None) or type(policy).__name__
    init_states = get_init_states(suite, info.task_id)
    wanted = list(range(trials)) if isinstance(trials, int) else [int(t) for t in trials]
    bad = [t for t in wanted if not 0 <= t < len(init_states)]
    if bad:
        raise ValueError(f"trial (init state) indices {bad} out of range for {suite}/{info.task_id}; valid: 0..{len(init_states) - 1}")
    budget = protocol.max_steps(suite) if max_steps is None else int(max_steps)
    attrs = _result_attrs(policy, method, suite, info, budget, center_crop, seed)
    path = Path(path) if path else result_path(run_dir, method, suite, info.task_id, seed)
    old = _read_previous(path, f"{method} on {suite}/{info.task_id}")
    if old is not None:
        _check_compatible(old, attrs, path)
    done_trials = set() if old is None else {int(t) for t in old.trial.values}
    todo = [t for t in wanted if t not in done_trials]
    if not todo:
        return old
    own = env is None
    env = env if env is not None else make_env(suite, info.task_id, resolution=protocol.RENDER_RESOLUTION,
                                               seed=None, cameras=cameras_for(policy))
    try:
        return _run_trials(policy, env, suite, info, init_states, todo, budget, center_crop, old, attrs, path, progress)
    finally:
        if own:
            close_env(env)


def _read_previous(path: Path, run: str) -> xr.Dataset | None:
    """The result file a rerun resumes from (None: there is none; one from before the reuse was recorded gets its
    variables as not reported, `with_recorded`). A damaged one stops the run, naming it, rather
    than being overwritten: it holds finished trials, minutes of simulation each, that the user may want back."""
    if not path.exists():
        return None
    try:
        old = read_dataset(path)
    except CorruptFileError as err:
        raise CorruptFileError(f"cannot resume {run}: {err}; move the file away (or delete it) to run its trials "
                               "again") from err
    if "trial" not in old.dims:
        raise CorruptFileError(f"cannot resume {run}: {path} has no trial dimension (not a dcvla LIBERO result file?); "
                               "move it away to run the trials")
    return with_recorded(old)


def _result_attrs(policy: Any, method: str, suite: str, info: Any, budget: int, center_crop: bool, seed: int) -> dict:
    """What a result file records of the protocol and the policy (a resumed run must match all of it)."""
    rng_seed, env_seed = seeds_of(seed)
    return dict(method=method, suite=suite, task_id=info.task_id, task_name=info.name, instruction=info.instruction,
                max_steps=budget, wait_steps=protocol.WAIT_STEPS, center_crop=int(center_crop), seed=rng_seed,
                env_seed=env_seed, evaluation_seed=seed, render_resolution=protocol.RENDER_RESOLUTION,
                policy_resolution=protocol.POLICY_RESOLUTION, jpeg_decoder=protocol.JPEG_DECODER,
                result_version=RESULT_VERSION, uses_state=int(bool(getattr(policy, "uses_state", False))),
                uses_wrist=int(uses_wrist(policy)),
                replan_steps=_replan_steps(policy), action_convention=protocol.action_convention(policy))


def _run_trials(policy: Any, env: Any, suite: str, info: Any, init_states: np.ndarray, todo: list[int], budget: int,
                center_crop: bool, old: xr.Dataset | None, attrs: dict, path: Path, progress: bool) -> xr.Dataset:
    """Run the pending trials in order, rewriting the result file (atomically) after each one."""
    from tqdm.auto import tqdm

    ds = old
    bar = tqdm(todo, desc=f"{attrs['method']} {suite}/{info.task_id}", disable=not progress, unit="trial")
    n_success = 0 if old is None else int(old.success.sum())
    for t in bar:
        # every trial from the evaluation's seeds: its outcome is its init state's and its seed's alone, whichever
        # trials ran before it in this process (a resume, a shard, a worker's earlier jobs)
        seed_everything(attrs["seed"])
        env.seed(attrs["env_seed"])
        r = run_trial(policy, env, suite, init_states[t], info.instruction, budget, center_crop)
        new = trials_dataset([t], [r], budget)
        ds = new if ds is None else xr.concat([ds, new], dim="trial", data_vars="all").sortby("trial")
        ds.attrs = dict(attrs, trials_done=int(ds.sizes["trial"]),
                        success_rate=float(ds.success.mean()), updated=time.strftime("%Y-%m-%dT%H:%M:%S"))
        write_dataset(ds, path)
        n_success += r.success
        bar.set_postfix(success=f"{n_success}/{ds.sizes['trial']}", steps=r.steps)
    return ds


def load_results(run_dir: str | Path, method: str | None = None, keep: dict[str, list] | None = None) -> xr.Dataset:
    """Stack every result file under `run_dir` into one dataset with dims (method, suite, task, seed, trial).

    Trials missing from a file (partial runs) are NaN. `step` is padded to the longest budget.
    `keep` ({dim: values}) keeps one run's methods, suites, tasks, seeds and trials: other runs' files in the same
    folder drop out, and a value no file has is NaN (not played).
    """
    files: dict[tuple, list[tuple[Path, xr.Dataset]]] = {}
    pattern = f"{method}/*.nc" if method else "*/*.nc"
    for p in sorted(Path(run_dir).glob(pattern)):
        ds = with_recorded(read_dataset(p))
        key = (ds.attrs["method"], ds.attrs["suite"], int(ds.attrs["task_id"]), int(ds.attrs.get("evaluation_seed", 0)))
        files.setdefault(key, []).append((p, ds))
    if not files:
        raise ValueError(f"no result files under {run_dir}" + (f" for method {method!r}" if method else ""))
    rows = [_trials_of(key, found).expand_dims(method=[key[0]], suite=[key[1]], task=[key[2]], seed=[key[3]])
            for key, found in files.items()]
    results = xr.combine_by_coords(rows, combine_attrs="drop_conflicts", data_vars="all", join="outer")
    return results.reindex(keep) if keep else results


def _trials_of(key: tuple, found: list[tuple[Path, xr.Dataset]]) -> xr.Dataset:
    """The trials of one (method, suite, task, seed) from its files (several: a grid run in blocks of init states,
    `result_path(..., trials=)`), in trial order; a trial two files hold stops it, naming both."""
    seen: dict[int, Path] = {}
    for path, ds in found:
        for t in ds.trial.values.tolist():
            if t in seen:
                raise ValueError(f"{seen[t]} and {path} both hold trial {t} of {key[0]} on {key[1]} task {key[2]} "
                                 f"(evaluation seed {key[3]}): one grid in two layouts (trials_per_unit changed?); "
                                 "move one of them away")
            seen[t] = path
    if len(found) == 1:
        return found[0][1]
    return xr.concat([ds for _, ds in found], dim="trial", data_vars="all", combine_attrs="drop_conflicts").sortby("trial")
