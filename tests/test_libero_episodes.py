"""Shipped episodes, episode files, open-loop replay and the closed-loop, resumable evaluation."""

from __future__ import annotations

import os
import random

os.environ.setdefault("MUJOCO_GL", "egl")

import numpy as np
import pytest
import torch

from dcvla.io import CorruptFileError, read_dataset, write_dataset
from dcvla.libero import env as E
from dcvla.libero import evaluate as V
from dcvla.libero import protocol
from dcvla.libero.episodes import (DEFAULT_DIR, DEMO_TASKS, FORMAT_VERSION, SHIPPED, Episode, demo_path, episode_path,
                                   list_episodes, load_episode, load_episodes, record_episode, replay,
                                   sample_init_state, save_episode)
from dcvla.libero.oracle import OraclePolicy


class RecordingPolicy:
    """Returns a fixed action and remembers what it was shown."""

    name = "recorder"

    def __init__(self, action=(0, 0, 0, 0, 0, 0, 1.0), fail_at: int | None = None, interrupt_at_trial: int | None = None):
        self.action = np.asarray(action, dtype=np.float32)
        self.fail_at, self.interrupt_at_trial = fail_at, interrupt_at_trial
        self.resets, self.images, self.instructions, self.t = 0, [], [], 0

    def reset(self):
        self.resets += 1
        self.t = 0
        if self.interrupt_at_trial is not None and self.resets > self.interrupt_at_trial:
            raise KeyboardInterrupt  # a crash the protocol must not swallow

    def step(self, image, instruction):
        self.t += 1
        if self.fail_at is not None and self.t >= self.fail_at:
            raise RuntimeError("policy blew up")
        self.images.append(image)
        self.instructions.append(instruction)
        return self.action


def test_shipped_episodes_are_complete_and_small():
    paths = list_episodes(DEFAULT_DIR)
    expected = {episode_path(DEFAULT_DIR, s, t, i) for s, entries in SHIPPED.items() for t, i in entries}
    assert expected <= set(paths), sorted(expected - set(paths))
    assert all(len(v) >= 2 for v in SHIPPED.values()) and set(SHIPPED) == {"libero_spatial", "libero_object",
                                                                           "libero_goal", "libero_10"}
    assert sum(p.stat().st_size for p in paths) < 50e6
    for path in sorted(expected):
        ep = load_episode(path)
        info = E.get_task(ep.suite, ep.task_id)
        assert ep.meta["success"] and ep.meta["format_version"] == FORMAT_VERSION
        assert ep.instruction == info.instruction and ep.meta["task_name"] == info.name
        n = len(ep)
        assert n == ep.meta["n_steps"] > 50 and ep.done[-1] and ep.done.any()
        assert ep.actions.shape == (n, 7) and ep.eef_pos.shape == (n, 3) and ep.eef_quat.shape == (n, 4)
        assert ep.gripper_qpos.shape == (n, 2)
        # the wrist camera (OpenVLA-OFT's second image) sees another picture of the same step
        assert ep.has_wrist and len(ep.wrist_jpegs) == n and ep.states.shape == (n, 8)
        # the robot really moved and closed its gripper at some point
        assert np.ptp(ep.eef_pos, axis=0).max() > 0.1 and (ep.actions[:, 6] > 0).any()


def test_a_suites_episodes_list_its_trained_task_first(tmp_path):
    """A study's first episode of a suite (`episodes_per_suite=1`) is the scene its micro policy learned, even where
    the trained task's id is not the smallest (libero_goal: task 8 before task 6)."""
    for name in ("libero_goal_task06_init00", "libero_goal_task08_init00", "libero_goal_task08_init01",
                 "libero_10_task04_init00", "libero_spatial_task00_init00"):
        (tmp_path / f"{name}.npz").write_bytes(b"")
    assert [p.stem for p in list_episodes(tmp_path, suite="libero_goal")] == [
        "libero_goal_task08_init00", "libero_goal_task08_init01", "libero_goal_task06_init00"]
    assert [p.stem for p in list_episodes(tmp_path)][:2] == ["libero_10_task04_init00", "libero_goal_task06_init00"]
    for suite, paths in ((s, list_episodes(DEFAULT_DIR, suite=s)) for s in SHIPPED):
        assert paths[0] == episode_path(DEFAULT_DIR, suite, DEMO_TASKS[suite], 0), (suite, paths)


def test_episode_frames_are_the_pipeline_frames():
    ep = load_episode(episode_path(DEFAULT_DIR, "libero_spatial", *SHIPPED["libero_spatial"][0]))
    frames = ep.frames
    assert frames.shape == (len(ep), 224, 224, 3) and frames.dtype == np.uint8
    assert np.array_equal(frames[5], protocol.decode_frame(ep.jpegs[5]))
    assert frames.mean() > 40 and frames.std() > 15
    # consecutive frames differ (the arm moves) but are similar (same scene)
    d = np.abs(frames[1:].astype(int) - frames[:-1].astype(int)).mean(axis=(1, 2, 3))
    assert d.max() > 0.5 and d.mean() < 10


def test_save_load_roundtrip_and_version_guard(tmp_path):
    rng = np.random.default_rng(0)
    jpegs = [protocol.jpeg_encode(rng.integers(0, 255, (256, 256, 3), dtype=np.uint8)) for _ in range(3)]
    ep = Episode(jpegs=jpegs, eef_pos=rng.normal(size=(3, 3)), eef_quat=rng.normal(size=(3, 4)),
                 gripper_qpos=rng.normal(size=(3, 2)), actions=rng.normal(size=(3, 7)), done=np.array([0, 0, 1], bool),
                 meta=dict(suite="libero_goal", task_id=8, instruction="put the bowl on the plate", init_state_index=3))
    path = save_episode(ep, tmp_path / "ep.npz")
    assert [p.name for p in tmp_path.iterdir()] == ["ep.npz"]  # no temp file left behind
    back = load_episode(path)
    assert back.jpegs == jpegs and back.name == "libero_goal/task08/init03"
    assert np.allclose(back.actions, ep.actions, atol=1e-6) and back.done.tolist() == [False, False, True]
    assert back.frames.shape == (3, 224, 224, 3)
    assert not back.has_wrist
    with pytest.raises(ValueError, match="no wrist view"):
        back.wrist_frames
    wrist = [protocol.jpeg_encode(rng.integers(0, 255, (256, 256, 3), dtype=np.uint8)) for _ in range(3)]
    ep.wrist_jpegs = wrist
    with_wrist = load_episode(save_episode(ep, tmp_path / "wrist.npz"))
    assert with_wrist.wrist_jpegs == wrist and with_wrist.wrist_frames.shape == (3, 224, 224, 3)
    assert np.array_equal(with_wrist.wrist_frames[1], protocol.decode_frame(wrist[1]))
    ep.wrist_jpegs = wrist[:2]
    with pytest.raises(ValueError, match="2 wrist frames for 3"):
        save_episode(ep, tmp_path / "bad.npz")
    with np.load(path) as z:
        arrays = dict(z)
    arrays["format_version"] = np.int64(1)  # a file of the first format: no wrist arrays, still readable
    np.savez(tmp_path / "v1.npz", **arrays)
    assert load_episode(tmp_path / "v1.npz").jpegs == jpegs
    arrays["format_version"] = np.int64(FORMAT_VERSION + 1)
    np.savez(tmp_path / "future.npz", **arrays)
    with pytest.raises(ValueError, match="format_version"):
        load_episode(tmp_path / "future.npz")


def test_replay_feeds_every_frame_in_order():
    ep = load_episodes(DEFAULT_DIR, suite="libero_object")[0]
    pol = RecordingPolicy()
    actions, latency = replay(pol, ep)
    assert pol.resets == 1 and actions.shape == (len(ep), 7) and latency.shape == (len(ep),)
    assert np.allclose(actions, pol.action) and (latency >= 0).all()
    assert set(pol.instructions) == {ep.instruction}
    assert np.array_equal(pol.images[7], protocol.center_crop(ep.frames[7]))
    pol2 = RecordingPolicy()
    replay(pol2, ep, center_crop=False)
    assert np.array_equal(pol2.images[7], ep.frames[7])


@pytest.fixture(scope="module")
def spatial_env():
    env = E.make_env("libero_spatial", 0)
    yield env
    E.close_env(env)


def test_closed_loop_oracle_succeeds_through_the_protocol(spatial_env, tmp_path):
    # The oracle behind the policy interface: OpenVLA gripper convention in, post-processing, env `done` out.
    ds = V.evaluate_task(OraclePolicy(spatial_env), "libero_spatial", 0, tmp_path, trials=[0], env=spatial_env,
                         progress=False)
    assert ds.success.values.tolist() == [1] and 50 < int(ds.steps[0]) < 220 and ds.error.values[0] == ""
    assert np.isfinite(ds.latency_ms[0, : int(ds.steps[0])]).all() and np.isnan(ds.latency_ms[0, int(ds.steps[0]):]).all()


def test_evaluation_records_failures_and_resumes(spatial_env, tmp_path):
    kw = dict(suite="libero_spatial", task=0, run_dir=tmp_path, env=spatial_env, max_steps=3, progress=False)
    # an exception inside the episode is a failed trial with its message, not a crashed run
    ds = V.evaluate_task(RecordingPolicy(fail_at=2), method="flaky", trials=[0], **kw)
    assert ds.success.values.tolist() == [0] and ds.steps.values.tolist() == [1]
    assert "RuntimeError: policy blew up" in str(ds.error.values[0])
    # a crash (KeyboardInterrupt) mid-run keeps the finished trials on disk, complete and readable
    with pytest.raises(KeyboardInterrupt):
        V.evaluate_task(RecordingPolicy(interrupt_at_trial=2), method="m", trials=3, **kw)
    path = V.result_path(tmp_path, "m", "libero_spatial", 0)
    assert read_dataset(path).trial.values.tolist() == [0, 1]
    assert [p.name for p in path.parent.iterdir()] == [path.name]
    # the rerun does only the missing trial
    pol = RecordingPolicy()
    ds = V.evaluate_task(pol, method="m", trials=3, **kw)
    assert pol.resets == 1 and ds.trial.values.tolist() == [0, 1, 2]
    assert ds.steps.values.tolist() == [3, 3, 3] and ds.success.values.tolist() == [0, 0, 0]
    assert ds.attrs["max_steps"] == 3 and ds.attrs["suite"] == "libero_spatial" and ds.attrs["method"] == "m"
    with pytest.raises(ValueError, match="max_steps"):
        V.evaluate_task(RecordingPolicy(), method="m", trials=4, **dict(kw, max_steps=5))
    both = V.load_results(tmp_path)
    assert set(both.method.values) == {"m", "flaky"} and both.success.dims == ("method", "suite", "task", "seed", "trial")
    # another evaluation seed is another file, its own draw of the RNGs, beside the protocol's seed 0
    ds = V.evaluate_task(RecordingPolicy(), method="m", trials=2, seed=1, **kw)
    assert (ds.attrs["seed"], ds.attrs["env_seed"], ds.attrs["evaluation_seed"]) == (protocol.SEED + 1, protocol.ENV_SEED + 1, 1)
    assert V.result_path(tmp_path, "m", "libero_spatial", 0, seed=1).name == "libero_spatial_task00_seed1.nc"
    seeds = V.load_results(tmp_path, method="m")
    assert seeds.seed.values.tolist() == [0, 1] and int(seeds.success.sel(seed=1).notnull().sum()) == 2
    # one run's trials out of a folder other runs share: their methods drop out, what none played is NaN
    one = V.load_results(tmp_path, keep={"method": ["m", "not_run"], "suite": ["libero_spatial"], "task": [0],
                                         "seed": [1], "trial": [0, 1, 2]})
    assert one.method.values.tolist() == ["m", "not_run"] and one.trial.values.tolist() == [0, 1, 2]
    assert one.success.sel({"method": "m"}).squeeze().notnull().values.tolist() == [True, True, False]
    assert bool(one.success.sel({"method": "not_run"}).isnull().all())


def test_blocks_of_init_states_in_their_own_files_load_as_one_run(spatial_env, tmp_path):
    """A grid in blocks (`result_path(..., trials=)`): its files stack into the trials of one (method, task, seed),
    as one file of them all does; a trial two files hold stops the load, naming both."""
    kw = dict(suite="libero_spatial", task=0, run_dir=tmp_path, env=spatial_env, max_steps=2, progress=False)
    for block in (range(2, 3), range(0, 2)):
        path = V.result_path(tmp_path, "m", "libero_spatial", 0, trials=block)
        ds = V.evaluate_task(RecordingPolicy(), method="m", trials=block, path=path, **kw)
        assert ds.trial.values.tolist() == list(block) and path.name == f"libero_spatial_task00_trials0{block[0]}-0{block[-1]}.nc"
    V.evaluate_task(RecordingPolicy(), method="whole", trials=3, **kw)
    both = V.load_results(tmp_path)
    assert both.trial.values.tolist() == [0, 1, 2] and sorted(both.method.values) == ["m", "whole"]
    assert both.steps.sel(method="m").equals(both.steps.sel(method="whole")) and bool(both.steps.notnull().all())
    V.evaluate_task(RecordingPolicy(), method="m", trials=2, **kw)  # the same trials in one file too
    with pytest.raises(ValueError, match=r"task00\.nc and .*trials00-01\.nc both hold trial 0 of m on libero_spatial"):
        V.load_results(tmp_path)


def test_loading_a_missing_or_foreign_file_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"no episode file {tmp_path / 'missing.npz'}"):
        load_episode(tmp_path / "missing.npz")
    with pytest.raises(FileNotFoundError, match="episodes in it: list_episodes"):
        load_episode(tmp_path)
    (tmp_path / "notes.npz").write_text("hello")
    with pytest.raises(ValueError, match=rf"{tmp_path / 'notes.npz'} is not a dcvla episode .*not an \.npz \(zip\) archive"):
        load_episode(tmp_path / "notes.npz")
    np.savez(tmp_path / "other.npz", a=np.arange(3))
    with pytest.raises(ValueError, match=rf"{tmp_path / 'other.npz'} is not a dcvla episode .*it has no format_version, "
                                         r"meta, .* \(it has: a\)"):
        load_episode(tmp_path / "other.npz")
    data = bytearray(list_episodes()[0].read_bytes())
    (tmp_path / "cut.npz").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=f"{tmp_path / 'cut.npz'} is not a dcvla episode"):
        load_episode(tmp_path / "cut.npz")
    data[len(data) // 2] ^= 0xFF  # one flipped byte inside the frames
    (tmp_path / "flipped.npz").write_bytes(data)
    with pytest.raises(ValueError, match=f"{tmp_path / 'flipped.npz'}: the episode archive is damaged"):
        load_episode(tmp_path / "flipped.npz")


class DrawingPolicy(RecordingPolicy):
    """Draws from the global RNGs at every step (as a sampling policy or a noisy simulator would) and keeps each
    trial's first draws."""

    def __init__(self):
        super().__init__()
        self.first = []

    def reset(self):
        super().reset()
        self.first.append(None)

    def step(self, image, instruction):
        import torch

        if self.first[-1] is None:
            self.first[-1] = (float(np.random.rand()), float(torch.rand(())), random.random())
        np.random.rand(5)
        return super().step(image, instruction)


def test_every_trial_starts_from_the_evaluations_seeds(spatial_env, tmp_path):
    """A trial's outcome is its init state's and its seed's, not its place in the run: run alone (a resume, a shard,
    a worker's next job) after other draws, trial 2 draws what it drew third in a run of three; another evaluation
    seed draws otherwise. Files of result version 1 (seeded once per run) are not resumed."""
    kw = dict(suite="libero_spatial", task=0, env=spatial_env, max_steps=3, progress=False)
    run = DrawingPolicy()
    V.evaluate_task(run, run_dir=tmp_path / "all", trials=3, **kw)
    np.random.rand(7), random.random()  # whatever ran before in the process
    alone = DrawingPolicy()
    ds = V.evaluate_task(alone, run_dir=tmp_path / "one", trials=[2], **kw)
    assert alone.first == [run.first[2]] and run.first[0] == run.first[1] == run.first[2]
    other = DrawingPolicy()
    V.evaluate_task(other, run_dir=tmp_path / "one", trials=[2], seed=1, **kw)
    assert all(a != b for a, b in zip(other.first[0], alone.first[0]))
    old = ds.assign_attrs(result_version=1)
    write_dataset(old, V.result_path(tmp_path / "one", "recorder", "libero_spatial", 0))
    with pytest.raises(ValueError, match="result_version=1"):
        V.evaluate_task(DrawingPolicy(), run_dir=tmp_path / "one", trials=[2, 3], **kw)


class ReusingPolicy(RecordingPolicy):
    """Reports a reuse share after each call: 0 on the first call of a trial, then 0.5."""

    last_reuse = None

    def step(self, image, instruction):
        self.last_reuse = 0.0 if self.t == 0 else 0.5
        return super().step(image, instruction)


def test_trials_record_the_policys_reuse_per_call_and_old_files_resume_without_it(spatial_env, tmp_path):
    kw = dict(suite="libero_spatial", task=0, env=spatial_env, max_steps=3, progress=False)
    ds = V.evaluate_task(ReusingPolicy(), run_dir=tmp_path, trials=1, **kw)
    assert ds.reuse.isel(trial=0).values[:3].tolist() == [0.0, 0.5, 0.5] and np.isnan(ds.reuse.values[0, 3:]).all()
    assert float(ds.reuse_mean[0]) == pytest.approx(1 / 3) and int(ds.reused_calls[0]) == 2
    assert len(ds.trajectory.values[0]) == 16  # the digest of the trial's inputs and actions (dcvla.libero.results)
    assert ds.torch_threads.values.tolist() == [torch.get_num_threads()]  # the digest depends on them
    path = V.result_path(tmp_path, "recorder", "libero_spatial", 0)
    write_dataset(ds.drop_vars(["reuse", "reuse_mean", "reused_calls", "trajectory", "torch_threads"]), path)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:  # from before all three, resumed on one thread by a policy that reports no reuse
        ds = V.evaluate_task(RecordingPolicy(), run_dir=tmp_path, trials=2, **kw)
    finally:
        torch.set_num_threads(threads)
    assert np.isnan(ds.reuse_mean.values).all() and ds.reused_calls.values.tolist() == [-1, -1]
    assert ds.trajectory.values[0] == "" and len(ds.trajectory.values[1]) == 16
    assert ds.torch_threads.values.tolist() == [0, 1]  # 0: not recorded
    assert V.load_results(tmp_path).trajectory.sel(trial=1).item() == ds.trajectory.values[1]


def test_a_corrupt_result_file_stops_the_resume_naming_it(tmp_path):
    path = V.result_path(tmp_path, "m", "libero_spatial", 0)
    path.parent.mkdir(parents=True)
    path.write_bytes(b"\x89HDF\r\n\x1a\n cut short")
    with pytest.raises(CorruptFileError, match=rf"cannot resume m on libero_spatial/0: {path} is not a readable netCDF "
                                               r"dataset .*move the file away"):
        V.evaluate_task(RecordingPolicy(), "libero_spatial", 0, tmp_path, method="m", trials=1, progress=False)
    assert path.read_bytes() == b"\x89HDF\r\n\x1a\n cut short"  # left as it was


class WristPolicy(RecordingPolicy):
    """OpenVLA-OFT's call: [agent view, wrist view], the instruction and the state."""

    uses_wrist = True
    uses_state = True

    def step(self, images, instruction, state):
        assert isinstance(images, list) and len(images) == 2 and state.shape == (8,)
        return super().step(images, instruction)


def test_wrist_policies_get_both_views_open_and_closed_loop(tmp_path):
    ep = load_episode(episode_path(DEFAULT_DIR, "libero_goal", *SHIPPED["libero_goal"][0]))
    pol = WristPolicy()
    replay(pol, ep)
    assert len(pol.images) == len(ep)
    agent, wrist = pol.images[3]
    assert agent.shape == wrist.shape == (224, 224, 3)
    assert np.array_equal(agent, protocol.policy_input(ep.frames[3])) and np.array_equal(wrist, protocol.policy_input(ep.wrist_frames[3]))
    closed = WristPolicy()
    ds = V.evaluate_task(closed, "libero_goal", SHIPPED["libero_goal"][0][0], tmp_path, method="wrist", trials=[0],
                         max_steps=2, progress=False)
    assert int(ds.attrs["uses_wrist"]) == 1 and len(closed.images) == 2
    assert all(len(views) == 2 and not np.array_equal(*views) for views in closed.images)


def test_demonstrations_start_from_the_simulators_own_placements(spatial_env, tmp_path):
    """A demonstration starts where the task's placement sampler puts the objects under its seed (reproducibly), never
    at one of the benchmark's init states the evaluation uses; its name and file say which seed."""
    from dcvla.libero.env import get_init_states

    first, again, other = (sample_init_state(spatial_env, s) for s in (3, 3, 4))
    np.testing.assert_array_equal(first, again)
    assert np.abs(first - other).max() > 1e-3
    official = get_init_states("libero_spatial", 0)
    assert np.abs(official - first).max(axis=1).min() > 1e-3, "the sampled state is one of the benchmark's"
    ep = record_episode("libero_spatial", 0, max_steps=2, env=spatial_env, placement_seed=3)
    assert ep.name == "libero_spatial/task00/seed0003" and ep.meta["init_state_index"] == -1
    path = save_episode(ep, demo_path(tmp_path, "libero_spatial", 0, 3))
    assert path.name == "libero_spatial_task00_seed0003.npz" and load_episode(path).name == ep.name
    # the rollout starts from the sampled state: its first frame's gripper is where that state put it
    spatial_env.reset()
    obs = spatial_env.set_init_state(first)
    np.testing.assert_allclose(ep.eef_pos[0], obs["robot0_eef_pos"], atol=0.02)


def test_dart_noise_perturbs_what_the_env_executes_and_keeps_the_oracles_actions(spatial_env, monkeypatch):
    """A demonstration recorded with `action_noise`: the env executes the oracle's action with its translation
    perturbed (rotation and gripper as the oracle said), the episode keeps the oracle's own action, and the same
    seed perturbs the same way."""
    executed = []
    step = type(spatial_env).step
    monkeypatch.setattr(type(spatial_env), "step", lambda self, a: executed.append(np.array(a)) or step(self, a))
    ep = record_episode("libero_spatial", 0, max_steps=6, env=spatial_env, placement_seed=3, action_noise=0.5)
    ran = np.stack(executed[protocol.WAIT_STEPS:])
    assert ep.meta["action_noise"] == 0.5 and ran.shape == ep.actions.shape
    np.testing.assert_array_equal(ran[:, 3:], ep.actions[:, 3:])
    assert np.abs(ran[:, :3] - ep.actions[:, :3]).max(axis=1).min() > 0.01, "a step's translation was not perturbed"
    assert np.abs(ran[:, :3]).max() <= 1.0
    executed.clear()
    again = record_episode("libero_spatial", 0, max_steps=6, env=spatial_env, placement_seed=3, action_noise=0.5)
    np.testing.assert_allclose(np.stack(executed[protocol.WAIT_STEPS:]), ran, atol=1e-6)
    np.testing.assert_allclose(again.actions, ep.actions, atol=1e-6)


def test_position_noise_is_a_stationary_ar1_held_off_in_the_precise_phases():
    from dcvla.libero.oracle import PositionNoise

    action = np.array([0.9, -0.2, 0.0, 0.1, 0.2, 0.3, -1.0])
    noise = PositionNoise(0.3, seed=0)
    for phase in ("descend", "grasp", "lower", "release", "done"):
        assert noise(action, phase) is action
    draws = np.stack([noise(np.zeros(7), "carry")[:3] for _ in range(20000)])
    assert draws.std(0) == pytest.approx([0.3] * 3, rel=0.1)
    lag = np.mean([np.corrcoef(draws[:-1, k], draws[1:, k])[0, 1] for k in range(3)])
    assert lag == pytest.approx(0.9, abs=0.03)
    assert (np.abs(noise(action, "approach")[:3]) <= 1).all() and (noise(action, "carry")[3:] == action[3:]).all()
