"""LIBERO suites, envs and the oracle, on the real simulator (CPU EGL rendering; nothing mocked)."""

from __future__ import annotations

import os
from itertools import groupby

os.environ.setdefault("MUJOCO_GL", "egl")

import numpy as np
import pytest

from dcvla.libero import env as E
from dcvla.libero import protocol
from dcvla.libero.episodes import SHIPPED
from dcvla.libero.oracle import Oracle, run_oracle, supported_goal

MAIN_SUITES = ("libero_spatial", "libero_object", "libero_goal", "libero_10")


def test_bad_suite_lists_valid_ones():
    with pytest.raises(ValueError) as e:
        E.get_suite("libero_spacial")
    msg = str(e.value)
    assert "libero_spacial" in msg and all(s in msg for s in E.SUITES)
    with pytest.raises(ValueError, match="libero_spatial"):
        protocol.max_steps("nope")


def test_bad_task_lists_valid_ones():
    with pytest.raises(ValueError) as e:
        E.get_task("libero_goal", 10)
    msg = str(e.value)
    assert "10" in msg and "0..9" in msg and "put_the_bowl_on_the_plate" in msg
    with pytest.raises(ValueError, match="open_the_middle_drawer_of_the_cabinet"):
        E.get_task("libero_goal", "put_the_bowl_in_the_sink")
    with pytest.raises(ValueError, match="0..49"):
        E.get_init_state("libero_goal", 0, 50)


@pytest.mark.parametrize("suite,n_tasks", [("libero_spatial", 10), ("libero_object", 10), ("libero_goal", 10),
                                           ("libero_10", 10), ("libero_90", 90)])
def test_suites_tasks_and_init_states(suite, n_tasks):
    tasks = E.list_tasks(suite)
    assert len(tasks) == n_tasks
    for i, t in enumerate(tasks):
        assert t.task_id == i and t.instruction and os.path.isfile(t.bddl_file) and t.n_init_states == 50
    assert E.get_task(suite, tasks[-1].name) == tasks[-1]
    states = E.get_init_states(suite, 0)
    assert states.ndim == 2 and states.shape[0] == 50 and np.isfinite(states).all()


@pytest.mark.parametrize("suite", E.SUITES)
def test_env_renders_a_real_frame(suite):
    env = E.make_env(suite, 0)
    try:
        obs = E.reset_to_init_state(env, E.get_init_state(suite, 0, 0))
        obs, _, done, _ = env.step(list(protocol.DUMMY_ACTION))
    finally:
        E.close_env(env)
    raw = obs[E.AGENTVIEW]
    assert raw.shape == (256, 256, 3) and raw.dtype == np.uint8
    frame = protocol.process_frame(raw)
    assert frame.shape == (224, 224, 3) and frame.dtype == np.uint8
    # not black, not flat: a lit table scene has mid-range brightness and plenty of texture
    assert 40 < frame.mean() < 220 and frame.std() > 15
    assert obs["robot0_eef_pos"].shape == (3,) and not done


SHIPPED_CASES = [(s, t, i) for s, entries in SHIPPED.items() for t, i in entries]


@pytest.mark.parametrize("suite,task,init", SHIPPED_CASES)
def test_oracle_solves_shipped_tasks(suite, task, init):
    # Physics only (no camera): the oracle reads poses from the simulator, so the outcome is the same
    # as when recording, at ~1/15 of the cost.
    env = E.make_env(suite, task, render=False)
    try:
        assert supported_goal(env)
        res = run_oracle(env, E.get_init_state(suite, task, init), protocol.max_steps(suite))
        assert env.check_success()
    finally:
        E.close_env(env)
    assert res["success"] and res["success_step"] < protocol.max_steps(suite)


def test_oracle_finish_releases_what_a_success_left_in_the_gripper(monkeypatch):
    """libero_object's basket goal holds while the can is still held, being lowered into the basket: by default the
    episode ends there, the gripper closed; with `finish` the oracle lowers, releases and retreats, and the goal still
    holds at the end."""
    suite, task = "libero_object", 0
    phases: list[str] = []
    oracle_act = Oracle.act

    def spy(self, obs):
        phases.append(self.phase)
        return oracle_act(self, obs)

    monkeypatch.setattr(Oracle, "act", spy)
    env = E.make_env(suite, task, render=False)
    runs = {}
    try:
        for finish in (False, True):
            phases.clear()
            grips: list[float] = []
            res = run_oracle(env, E.get_init_state(suite, task, 0), protocol.max_steps(suite),
                             on_step=lambda obs, a, done: grips.append(float(a[6])), finish=finish)
            runs[finish] = res, list(phases), grips, env.check_success()
    finally:
        E.close_env(env)
    (plain, plain_phases, plain_grips, _), (full, full_phases, full_grips, holds) = runs[False], runs[True]
    assert plain["success"] and full["success"] and holds
    assert plain["success_step"] == full["success_step"]  # the same rollout up to the first success
    assert "release" not in plain_phases and plain_grips[-1] == 1.0  # ended holding the can in the basket's region
    assert {"lower", "release", "retreat"} <= set(full_phases) and full_grips[-1] == -1.0  # released, arm away
    assert full["steps"] > plain["steps"]


def test_oracle_rejects_unsupported_goal():
    env = E.make_env("libero_goal", "open_the_middle_drawer_of_the_cabinet", render=False)
    try:
        assert not supported_goal(env)
        with pytest.raises(ValueError, match="open"):
            Oracle().reset(env)
    finally:
        E.close_env(env)


def _oracle_run(suite: str, task: int, placement_seed: int | None = None, noise: float = 0.0,
                **options) -> tuple[dict, list[tuple[str, np.ndarray]]]:
    """Run the oracle (physics only) with `options`, from init state 0 or the simulator's placement under
    `placement_seed` with DART noise as the demonstrations have it; its result and every (phase, action) it chose."""
    from dcvla.libero.episodes import _start

    log: list[tuple[str, np.ndarray]] = []
    oracle_act = Oracle.act

    def spy(self, obs):
        phase = self.phase
        a = oracle_act(self, obs)
        log.append((phase, a))
        return a

    env = E.make_env(suite, task, render=False)
    try:
        with pytest.MonkeyPatch.context() as patch:  # undone after this run, so a second run logs only its own
            patch.setattr(Oracle, "act", spy)
            init, perturb = _start(env, suite, task, 0, placement_seed, protocol.SEED, noise)
            res = run_oracle(env, init, protocol.max_steps(suite), noise=perturb, oracle=Oracle(**options))
        res["holds"] = env.check_success()
    finally:
        E.close_env(env)
    return res, log


def _runs(log: list[tuple[str, np.ndarray]], phase: str) -> list[list[np.ndarray]]:
    """The actions of each unbroken stretch of `phase`."""
    return [[a for _, a in stretch] for name, stretch in groupby(log, key=lambda entry: entry[0]) if name == phase]


def _lower_phases(suite: str, task: int, speed: float) -> tuple[dict, list[list[float]]]:
    res, log = _oracle_run(suite, task, lower_speed=speed)
    return res, [[float(a[2]) for a in run] for run in _runs(log, "lower")]


def test_oracle_lower_speed_keeps_lowering_until_the_object_rests(monkeypatch):
    """By default the oracle's z action decays toward 0 as the carried mug nears the plate; with `lower_speed` it never
    falls under that speed, and the lower phase ends (the release follows) once the object is down or stops on
    something, not at the phase's 40-step timeout."""
    plain, plain_lowers = _lower_phases("libero_10", 4, 0.0)
    fast, fast_lowers = _lower_phases("libero_10", 4, 0.5)
    assert plain["success"] and plain["holds"] and fast["success"] and fast["holds"]
    assert len(plain_lowers) == len(fast_lowers) == 2  # two mugs, two plates
    assert all(max(z) > -0.1 for z in plain_lowers)  # the last centimetres at near-zero actions
    assert all(max(z) <= -0.5 + 1e-9 for z in fast_lowers) and all(len(z) < 40 for z in fast_lowers)
    # aimed 5 cm under where the plate stops the mug: the default pushes until the timeout, lower_speed sees it rest
    place = Oracle._place_target
    monkeypatch.setattr(Oracle, "_place_target", lambda self, kind, target: (lambda xy, z: (xy, z - 0.05))(
        *place(self, kind, target)))
    _, stuck = _lower_phases("libero_10", 4, 0.0)
    _, rested = _lower_phases("libero_10", 4, 0.5)
    assert len(stuck[0]) == 40 and len(rested[0]) < 20


def test_oracle_approach_speed_goes_on_into_the_grasp_without_stopping():
    """By default the hand slows to a near stop above the can before descending; with `approach_speed` every
    approach and descend action moves it at least that fast, and the oracle still puts the can in the basket."""
    plain, plain_log = _oracle_run("libero_object", 0)
    fast, fast_log = _oracle_run("libero_object", 0, approach_speed=0.3)
    assert plain["success"] and fast["success"] and fast["holds"]

    def speeds(log):
        return [float(np.linalg.norm(a[:3])) for phase, a in log if phase in ("approach", "descend")]

    assert min(speeds(plain_log)) < 0.2  # the near stop a policy learns to stay in
    assert min(speeds(fast_log)) >= 0.3 - 1e-9


def test_oracle_carry_tolerance_ends_the_hover_above_the_plate():
    """Under the demonstrations' DART noise (0.3) the default carry hovers over each plate until its object is within
    1 cm, for tens of steps; at a 3 cm tolerance each carry ends sooner, the unperturbed lower phase steers the rest of
    the way, and both mugs still end on their plates."""
    options = dict(lower_speed=0.5, approach_speed=0.3)
    plain, plain_log = _oracle_run("libero_10", 4, placement_seed=0, noise=0.3, **options)
    loose, loose_log = _oracle_run("libero_10", 4, placement_seed=0, noise=0.3, carry_tolerance=0.03, **options)
    assert plain["success"] and loose["success"] and loose["holds"]
    plain_carries, loose_carries = map(len, _runs(plain_log, "carry")), list(map(len, _runs(loose_log, "carry")))
    assert len(loose_carries) == 2  # two mugs, two plates
    assert max(plain_carries) >= 60 and max(loose_carries) < 40


class LookingPolicy:
    """A chunk policy whose actions follow what it sees: each call's chunk moves the hand by the two frames' and
    the state's means, so a frame or a state that differs anywhere changes the rest of the trial."""

    uses_state, uses_wrist, replan_steps, action_convention = True, True, 8, "libero"

    def __init__(self):
        self.calls = 0

    def reset(self):
        self.calls = 0

    def step(self, images, instruction, state):
        self.calls += 1
        means = [float(np.mean(image)) / 255 for image in images] + [float(np.mean(state))]
        chunk = np.zeros((8, 7))
        chunk[:, :3] = (np.array(means) - 0.5) * 0.6
        chunk[:, 6] = -1.0 if self.calls % 2 else 1.0
        return chunk


def test_cameras_on_demand_render_only_the_frames_the_policy_reads_and_change_nothing(monkeypatch):
    """A trial rendering only the steps whose observation the policy reads (the default) against the same trial
    rendering every step: the same trajectory digest (every frame and state the policy saw, every action), steps and
    calls, with one render per camera and policy call, not per step."""
    from robosuite.utils.binding_utils import MjSim

    from dcvla.libero.evaluate import run_trial, seed_everything

    renders = []
    real_render = MjSim.render
    monkeypatch.setattr(MjSim, "render", lambda self, *a, **k: renders.append(1) or real_render(self, *a, **k))
    env = E.make_env("libero_goal", 8, cameras=("agentview", "robot0_eye_in_hand"))
    info, state = E.get_task("libero_goal", 8), E.get_init_state("libero_goal", 8, 0)
    try:
        results = {}
        for every_frame in (True, False, True):  # rendering every step after the lazy trial: the sensors are back
            seed_everything()
            env.seed(0)
            policy, before = LookingPolicy(), len(renders)
            result = run_trial(policy, env, "libero_goal", state, info.instruction, max_steps=24, every_frame=every_frame)
            results.setdefault(every_frame, []).append((result, policy.calls, len(renders) - before))
    finally:
        E.close_env(env)
    (always, calls, rendered), (again, _, rendered_again) = results[True]
    (lazy, lazy_calls, lazy_rendered), = results[False]
    assert always.error == lazy.error == "" and always.steps == lazy.steps == 24 and calls == lazy_calls == 3
    assert lazy.trajectory == always.trajectory == again.trajectory and rendered == rendered_again
    assert rendered - lazy_rendered == 2 * (protocol.WAIT_STEPS + 24 - calls)  # both cameras, but before a call
