"""The 8-dim robot state, action chunks and the LIBERO gripper convention for Pi0-style policies.

The state is openpi's LIBERO example input: concat(eef_pos, axis-angle(eef_quat), gripper_qpos). Closed-loop
chunk execution is checked on a fake env (every action it receives is recorded), the state layout on the
shipped episodes and on one real simulator observation.
"""

from __future__ import annotations

import os

os.environ.setdefault("MUJOCO_GL", "egl")

import numpy as np
import pytest

from dcvla.libero import evaluate as V
from dcvla.libero import protocol as P
from dcvla.libero.episodes import list_episodes, load_episode, replay

S45 = np.sqrt(0.5)


# --- quat2axisangle / robot_state / obs_state -------------------------------------------------------


def test_quat2axisangle_known_values():
    assert np.array_equal(P.quat2axisangle([0.0, 0.0, 0.0, 1.0]), np.zeros(3))  # identity
    assert np.allclose(P.quat2axisangle([0.0, 0.0, S45, S45]), [0, 0, np.pi / 2], atol=1e-12)  # 90 deg about z
    assert np.allclose(P.quat2axisangle([1.0, 0.0, 0.0, 0.0]), [np.pi, 0, 0], atol=1e-12)  # 180 deg about x
    assert np.allclose(P.quat2axisangle([0.0, -S45, 0.0, S45]), [0, -np.pi / 2, 0], atol=1e-12)
    # w just outside [-1, 1] (float noise) is clipped: den = 0 -> zeros, not NaN from sqrt of a negative
    for q in ([0.0, 0.0, 0.0, 1.0 + 1e-9], [1e-6, 0.0, 0.0, 1.0 + 1e-7], [0.0, 0.0, 0.0, -1.0 - 1e-9]):
        out = P.quat2axisangle(q)
        assert np.array_equal(out, np.zeros(3)), (q, out)
    # the caller's array is not clipped in place (robosuite's version does that)
    q = np.array([0.0, 0.0, 0.0, 1.5])
    P.quat2axisangle(q)
    assert q[3] == 1.5
    with pytest.raises(ValueError, match=r"\[\.\.\., 4\]"):
        P.quat2axisangle([0.0, 0.0, 1.0])


def test_quat2axisangle_matches_robosuite_and_batches():
    T = pytest.importorskip("robosuite.utils.transform_utils")
    rng = np.random.default_rng(0)
    q = rng.normal(size=(64, 4))
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    q[0] = [0, 0, 0, 1]
    q[1] = [0, 0, 0, -1]
    batched = P.quat2axisangle(q)
    assert batched.shape == (64, 3) and batched.dtype == np.float64
    for i in range(len(q)):
        ref = T.quat2axisangle(q[i].copy())
        assert np.allclose(P.quat2axisangle(q[i]), ref, rtol=1e-12, atol=1e-12), (q[i], ref)
        assert np.array_equal(batched[i], P.quat2axisangle(q[i]))


def test_robot_state_layout_and_validation():
    s = P.robot_state([0.1, -0.2, 1.3], [0.0, 0.0, S45, S45], [0.04, -0.039])
    assert s.shape == (P.STATE_DIM,) == (8,) and s.dtype == np.float32
    assert np.allclose(s, [0.1, -0.2, 1.3, 0, 0, np.pi / 2, 0.04, -0.039], atol=1e-7)
    batch = P.robot_state(np.zeros((5, 3)), np.tile([0.0, 0.0, 0.0, 1.0], (5, 1)), np.ones((5, 2)))
    assert batch.shape == (5, 8) and batch.dtype == np.float32
    with pytest.raises(ValueError, match="eef_quat"):
        P.robot_state(np.zeros(3), np.zeros(3), np.zeros(2))
    with pytest.raises(ValueError, match="gripper_qpos"):
        P.robot_state(np.zeros(3), np.zeros(4), np.zeros(1))
    with pytest.raises(ValueError, match="leading dims"):
        P.robot_state(np.zeros((2, 3)), np.zeros((3, 4)), np.zeros((2, 2)))


def _obs(t: int) -> dict:
    """A LIBERO-like observation that changes with t (uint8 render, float64 proprio like robosuite)."""
    a = 0.05 * t
    img = np.zeros((256, 256, 3), np.uint8)
    img[:, :, 0] = (7 * t) % 256
    img[t % 256, :, 1] = 255
    return {"agentview_image": img,
            "robot0_eef_pos": np.array([0.1 + 0.01 * t, -0.1, 1.0 - 0.002 * t]),
            "robot0_eef_quat": np.array([np.sin(a / 2), 0.0, 0.0, np.cos(a / 2)]),
            "robot0_gripper_qpos": np.array([0.04 - 0.001 * t, -0.04 + 0.001 * t])}


def test_obs_state_reads_the_proprio_keys():
    obs = _obs(3)
    s = P.obs_state(obs)
    assert s.shape == (8,) and s.dtype == np.float32
    assert np.allclose(s, np.r_[obs["robot0_eef_pos"], 0.15, 0, 0, obs["robot0_gripper_qpos"]], atol=1e-7)
    with pytest.raises(ValueError, match="robot0_gripper_qpos"):
        P.obs_state({k: v for k, v in obs.items() if k != "robot0_gripper_qpos"})
    with pytest.raises(ValueError, match="robot0_eef_quat"):
        P.obs_state(dict(obs, robot0_eef_quat=np.zeros(3)))


def test_obs_state_on_a_real_observation_is_openpis_state():
    T = pytest.importorskip("robosuite.utils.transform_utils")
    from dcvla.libero import env as E

    env = E.make_env("libero_spatial", 0, render=False)
    try:
        obs = E.reset_to_init_state(env, E.get_init_state("libero_spatial", 0, 0))
    finally:
        E.close_env(env)
    # openpi examples/libero/main.py, with its _quat2axisangle (a copy of robosuite's)
    ref = np.concatenate((obs["robot0_eef_pos"], T.quat2axisangle(obs["robot0_eef_quat"].copy()),
                          obs["robot0_gripper_qpos"]))
    assert np.allclose(P.obs_state(obs), ref, atol=1e-6)
    assert np.abs(ref[3:6]).max() > 0.1  # a non-trivial orientation, so the axis-angle part is exercised


# --- action chunks and conventions -------------------------------------------------------------------


def test_action_chunk_and_libero_postprocessing():
    assert P.action_chunk(np.arange(7)).shape == (1, 7)
    assert P.action_chunk(np.zeros((10, 7))).shape == (10, 7)
    for bad in (np.zeros(6), np.zeros((10, 8)), np.zeros((0, 7)), np.zeros((1, 10, 7))):
        with pytest.raises(ValueError, match="horizon, 7"):
            P.action_chunk(bad)
    a = P.postprocess_libero_action([0.1, -0.2, 0.3, 0.01, 0.02, -0.03, 0.7])
    assert np.allclose(a[:6], [0.1, -0.2, 0.3, 0.01, 0.02, -0.03]) and a[6] == 1.0  # close stays close
    assert P.postprocess_libero_action(np.r_[np.zeros(6), -0.2])[6] == -1.0  # open stays open, no flip
    assert P.postprocess_libero_action(np.r_[np.zeros(6), 0.0])[6] == 0.0  # sign(0), like postprocess_action
    assert P.postprocess(np.r_[np.zeros(6), 0.9], "openvla")[6] == -1.0  # the OpenVLA flip is unchanged
    with pytest.raises(ValueError, match="7-dim"):
        P.postprocess_libero_action(np.zeros(8))
    with pytest.raises(ValueError, match="openvla, libero"):
        P.postprocess(np.zeros(7), "LIBERO")


# --- Episode.states and replay ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def episode():
    return load_episode(list_episodes(suite="libero_spatial")[0])


def test_episode_states(episode, spatial_episode):
    frames, instruction = spatial_episode
    assert episode.instruction == instruction and np.array_equal(episode.frames[: len(frames)], frames)
    states = episode.states
    n = len(episode)
    assert states.shape == (n, 8) and states.dtype == np.float32 and np.isfinite(states).all()
    assert np.array_equal(states[:, :3], episode.eef_pos) and np.array_equal(states[:, 6:], episode.gripper_qpos)
    for i in (0, n // 2, n - 1):
        assert np.array_equal(states[i], P.robot_state(episode.eef_pos[i], episode.eef_quat[i], episode.gripper_qpos[i]))
    # the hand points down all episode: rotation angle near pi, and it varies as the oracle corrects it
    angle = np.linalg.norm(states[:, 3:6], axis=1)
    assert (np.abs(angle - np.pi) < 0.5).all() and np.ptp(states[:, 3:6], axis=0).max() > 1e-3


class StatefulChunkPolicy:
    """A Pi0-like fake: takes the state, returns [horizon, 7] chunks whose rows encode (call, row)."""

    uses_state = True
    action_convention = "libero"

    def __init__(self, horizon: int = 10, replan_steps: int = 5):
        self.horizon, self.replan_steps = horizon, replan_steps
        self.resets, self.calls, self.images, self.states, self.chunks = 0, 0, [], [], []

    def reset(self):
        self.resets += 1

    def step(self, image, instruction, state):
        self.images.append(image)
        self.states.append(np.array(state))
        chunk = np.zeros((self.horizon, 7), np.float32)
        chunk[:, 0] = self.calls
        chunk[:, 1] = np.arange(self.horizon) / 100
        chunk[:, 6] = np.tile([0.8, -0.6, 0.0], self.horizon)[: self.horizon]  # close, open, undecided
        self.calls += 1
        self.chunks.append(chunk)
        return chunk


def test_replay_passes_each_frames_state(episode):
    pol = StatefulChunkPolicy()
    actions, latency = replay(pol, episode)
    states = episode.states
    assert pol.resets == 1 and pol.calls == len(episode) and actions.shape == (len(episode), 7)
    assert latency.shape == (len(episode),) and (latency >= 0).all()
    for i in range(len(episode)):
        assert pol.states[i].dtype == np.float32 and np.array_equal(pol.states[i], states[i]), i
    assert np.array_equal(actions, np.stack([c[0] for c in pol.chunks]))  # a chunk's first row, raw
    assert np.array_equal(pol.images[3], P.center_crop(episode.frames[3]))


# --- closed loop with chunks, on a fake env ------------------------------------------------------------


class FakeEnv:
    """Records every action; observation t follows the t-th step; `done` after `done_at` steps if set."""

    def __init__(self, done_at: int | None = None):
        self.done_at, self.actions, self.t = done_at, [], 0

    def reset(self):
        self.t, self.actions = 0, []
        return _obs(0)

    def set_init_state(self, init_state):
        return _obs(0)

    def step(self, action):
        assert isinstance(action, list) and len(action) == 7
        self.actions.append(np.array(action))
        self.t += 1
        return _obs(self.t), 0.0, self.done_at is not None and self.t >= self.done_at, {}


def test_run_trial_executes_chunks_open_loop():
    env, pol = FakeEnv(), StatefulChunkPolicy(horizon=10, replan_steps=5)
    r = V.run_trial(pol, env, "libero_spatial", np.zeros(3), "do it", max_steps=12, center_crop=False)
    assert r.error == "" and not r.success and r.steps == 12
    assert pol.resets == 1 and pol.calls == 3 and r.latency_s.shape == (3,)  # at steps 0, 5, 10
    wait = P.WAIT_STEPS
    executed = np.stack(env.actions[wait:])
    assert len(env.actions) == wait + 12
    assert all(np.array_equal(a, P.DUMMY_ACTION) for a in env.actions[:wait])
    expected = np.concatenate([pol.chunks[0][:5], pol.chunks[1][:5], pol.chunks[2][:2]]).astype(np.float64)
    expected[:, 6] = np.sign(expected[:, 6])  # LIBERO convention: binarised, not flipped
    assert np.array_equal(executed, expected)
    assert executed[:, 6].tolist()[:5] == [1.0, -1.0, 0.0, 1.0, -1.0]
    # each call saw the state (and frame) of the observation current at that call: after step wait + 5k
    for k in range(3):
        obs = _obs(wait + 5 * k)
        assert np.array_equal(pol.states[k], P.obs_state(obs)), k
        assert np.array_equal(pol.images[k], P.process_frame(obs["agentview_image"]))


def test_run_trial_done_mid_chunk_and_short_chunks():
    # done on the 7th policy-driven step: in the middle of the second chunk
    env, pol = FakeEnv(done_at=P.WAIT_STEPS + 7), StatefulChunkPolicy(horizon=10, replan_steps=5)
    r = V.run_trial(pol, env, "libero_spatial", np.zeros(3), "do it", max_steps=50)
    assert r.success and r.steps == 7 and pol.calls == 2 and len(r.latency_s) == 2
    # replan_steps beyond the horizon is clipped to it: a new call every 3 steps
    env, pol = FakeEnv(), StatefulChunkPolicy(horizon=3, replan_steps=5)
    r = V.run_trial(pol, env, "libero_spatial", np.zeros(3), "do it", max_steps=9)
    assert r.steps == 9 and pol.calls == 3
    assert np.array_equal(np.stack(env.actions[P.WAIT_STEPS:])[:, 0], [0, 0, 0, 1, 1, 1, 2, 2, 2])


class OpenVLAStylePolicy:
    """The old interface: two arguments, one action, OpenVLA gripper convention."""

    def __init__(self):
        self.calls = 0

    def reset(self):
        pass

    def step(self, image, instruction):
        self.calls += 1
        return np.array([0.1, 0, 0, 0, 0, 0, 0.9 if self.calls % 2 else 0.1])


def test_run_trial_single_action_policies_unchanged():
    env, pol = FakeEnv(), OpenVLAStylePolicy()
    r = V.run_trial(pol, env, "libero_spatial", np.zeros(3), "do it", max_steps=4)
    assert r.error == "" and r.steps == 4 and pol.calls == 4 and len(r.latency_s) == 4
    grip = [a[6] for a in env.actions[P.WAIT_STEPS:]]
    assert grip == [-1.0, 1.0, -1.0, 1.0]  # OpenVLA 0.9 open -> -1, 0.1 close -> +1 (flipped)


def test_run_trial_rejects_misconfigured_policies():
    pol = StatefulChunkPolicy(replan_steps=0)
    with pytest.raises(ValueError, match="replan_steps"):
        V.run_trial(pol, FakeEnv(), "libero_spatial", np.zeros(3), "do it", max_steps=3)
    pol = StatefulChunkPolicy()
    pol.action_convention = "LIBERO"
    with pytest.raises(ValueError, match="action_convention"):
        V.run_trial(pol, FakeEnv(), "libero_spatial", np.zeros(3), "do it", max_steps=3)


class ShiftedEnv(FakeEnv):
    """The same env with its scene drawn otherwise: every observation one step ahead (as a fixture the init state
    does not fix would be elsewhere)."""

    def step(self, action):
        obs, reward, done, info = super().step(action)
        return _obs(self.t + 1), reward, done, info


def test_a_trial_records_the_digest_of_what_the_loop_exchanged():
    """The same policy on the same observations: the same trajectory; another action, or the same actions on other
    observations: another one."""
    def trial(env, pol):
        return V.run_trial(pol, env, "libero_spatial", np.zeros(3), "do it", max_steps=12, center_crop=False)

    first, again = trial(FakeEnv(), StatefulChunkPolicy()), trial(FakeEnv(), StatefulChunkPolicy())
    assert len(first.trajectory) == 16 and int(first.trajectory, 16) >= 0
    assert again.trajectory == first.trajectory
    assert trial(FakeEnv(), StatefulChunkPolicy(replan_steps=4)).trajectory != first.trajectory  # other actions
    moved = trial(ShiftedEnv(), StatefulChunkPolicy())  # the chunks ignore what they see: the same actions
    assert moved.steps == first.steps and moved.trajectory != first.trajectory
