"""The shipped micro policies (dcvla.studies.micro): each loads with its family's strict loader from
checkpoints/<preset>, stays under 40 MB, and runs a closed-loop step in the simulator on the first official init
state of every task it was trained on."""

from __future__ import annotations

import pytest
import torch

from dcvla.studies.micro import CHECKPOINT_DIR, ONE_TASK, SHIPPED, center_crop, load_micro, micro_checkpoint

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def test_a_missing_or_unknown_micro_checkpoint_is_named(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="unknown micro preset 'pi0-micro'; known: openvla-micro, oft-micro, smolvla-micro"):
        micro_checkpoint("pi0-micro")
    monkeypatch.setattr("dcvla.studies.micro.CHECKPOINT_DIR", tmp_path)
    with pytest.raises(FileNotFoundError,
                       match="no smolvla-micro checkpoint; train it with .*train_micro.py smolvla-micro"):
        micro_checkpoint("smolvla-micro")


@pytest.mark.parametrize("name", sorted(p.name for p in CHECKPOINT_DIR.iterdir() if p.is_dir()))
def test_every_committed_checkpoint_is_small(name):
    size = sum(f.stat().st_size for f in (CHECKPOINT_DIR / name).rglob("*") if f.is_file())
    assert size <= 40 * 2**20, f"{name}: {size / 2**20:.1f} MB"


@pytest.mark.parametrize("name", ONE_TASK)
def test_a_one_task_checkpoint_loads_strictly_and_steps_on_its_task(name):
    """The checkpoints ONE_TASK names (docs/micro.md): a micro preset trained on one task alone,
    loaded by its family's strict loader without caching, one closed-loop step on that task's first init state."""
    from dcvla.libero.env import close_env, get_init_states, get_task, make_env
    from dcvla.libero.evaluate import cameras_for, run_trial

    preset, suite, task = ONE_TASK[name]
    policy = load_micro(preset, checkpoint=CHECKPOINT_DIR / name)
    assert policy.name == {"openvla-micro": "vanilla", "oft-micro": "vanilla", "smolvla-micro": "none"}[preset]
    assert policy.model.config.name == preset
    env = make_env(suite, task, cameras=cameras_for(policy))
    try:
        result = run_trial(policy, env, suite, get_init_states(suite, task)[0], get_task(suite, task).instruction,
                           max_steps=1, center_crop=center_crop(preset))
    finally:
        close_env(env)
    assert result.error == "" and result.steps == 1


@pytest.mark.parametrize("name, default, chunk", [("oft-micro-goal", 8, 8), ("smolvla-micro-goal", 5, 10)])
def test_load_micro_sets_the_actions_executed_per_chunk(name, default, chunk):
    """`replan_steps` (scripts/eval_micro.py's --replan-steps): the family's protocol unless given, any value from 1
    to the chunk's length, anything else refused with the checkpoint named."""
    preset, path = ONE_TASK[name][0], CHECKPOINT_DIR / name
    assert load_micro(preset, checkpoint=path).replan_steps == default
    policy = load_micro(preset, checkpoint=path, replan_steps=3)
    assert policy.replan_steps == 3 and policy.name == {"oft-micro": "vanilla", "smolvla-micro": "none"}[preset]
    if preset == "smolvla-micro":
        assert policy.config.replan_steps == 3  # the flow policy's ReuseConfig says it too
    for bad in (0, chunk + 1):
        with pytest.raises(ValueError, match=f"replan_steps must be 1 to {chunk} \\(the chunk of .*{name}\\), got {bad}"):
            load_micro(preset, checkpoint=path, replan_steps=bad)


@pytest.mark.parametrize("preset", SHIPPED)
def test_a_shipped_micro_policy_steps_on_every_trained_task(preset):
    from dcvla.libero.env import close_env, get_init_states, get_task, make_env
    from dcvla.libero.episodes import DEMO_TASKS
    from dcvla.libero.evaluate import cameras_for, run_trial

    policy = load_micro(preset)
    assert policy.name == {"openvla-micro": "vanilla", "oft-micro": "vanilla", "smolvla-micro": "none"}[preset]  # no caching, no reuse
    for suite, task in DEMO_TASKS.items():
        info = get_task(suite, task)
        env = make_env(suite, task, cameras=cameras_for(policy))
        try:
            result = run_trial(policy, env, suite, get_init_states(suite, task)[0], info.instruction, max_steps=1,
                               center_crop=center_crop(preset))
        finally:
            close_env(env)
        assert result.error == "" and result.steps == 1, (suite, result.error)
        assert len(result.latency_s) == 1  # the policy was called once


def test_the_studies_take_a_micro_policy_by_name(tmp_path, monkeypatch):
    from dcvla.smolvla import SmolVLAPolicy
    from dcvla.studies.stability_cliff import CliffConfig, pi0_base

    trained = SmolVLAPolicy.from_preset("smolvla-tiny", seed=3)
    trained.save_pretrained(tmp_path / "smolvla-micro", dtype=None)
    monkeypatch.setattr("dcvla.studies.micro.CHECKPOINT_DIR", tmp_path)
    config = CliffConfig(checkpoint="smolvla-micro")
    loaded = pi0_base(config)
    assert config.model_name() == "smolvla-micro" and isinstance(loaded, SmolVLAPolicy)
    for (name, mine), theirs in zip(trained.model.state_dict().items(), loaded.model.state_dict().values()):
        assert torch.equal(mine, theirs), name
    monkeypatch.setattr("dcvla.studies.micro.CHECKPOINT_DIR", tmp_path / "elsewhere")
    with pytest.raises(FileNotFoundError, match="no smolvla-micro checkpoint"):
        pi0_base(config)


def test_the_openvla_studies_take_a_shipped_checkpoint_as_their_preset(tmp_path, monkeypatch):
    """A committed OpenVLA checkpoint's name is a study preset (`PolicyParameters.trained`), as a flow one is the
    stability cliff's: the study loads it strictly; `checkpoint` still overrides; a random preset stays random."""
    from dcvla.openvla.checkpoint import save_pretrained
    from dcvla.openvla.loading import vanilla_policy
    from dcvla.studies.common import StudyConfig, base_policy

    trained = vanilla_policy("tiny", seed=3).model
    save_pretrained(trained, tmp_path / "openvla-tiny-goal", dtype=None)
    monkeypatch.setattr("dcvla.studies.micro.CHECKPOINT_DIR", tmp_path)
    config = StudyConfig(preset="openvla-tiny-goal")
    assert config.trained() == "openvla-tiny-goal" and config.model_name() == "openvla-tiny-goal"
    for (name, mine), theirs in zip(trained.state_dict().items(), base_policy(config).model.state_dict().values()):
        assert torch.equal(mine, theirs), name
    assert StudyConfig(preset="openvla-tiny-goal", checkpoint=str(tmp_path / "x")).trained() == str(tmp_path / "x")
    assert StudyConfig(preset="tiny").trained() == "" and StudyConfig(preset="tiny").model_name() == "tiny preset"
    with pytest.raises(ValueError, match="StudyConfig.preset: unknown preset 'nosuch'.*shipped micro policy: openvla-tiny-goal"):
        StudyConfig(preset="nosuch")
    from dcvla.studies.stability_cliff import CliffConfig

    with pytest.raises(ValueError, match="no flow-matching preset or shipped micro policy for 'openvla-tiny-goal'"):
        CliffConfig(preset="openvla-tiny-goal")  # an OpenVLA checkpoint is no flow policy


def test_eval_micro_script_runs_trials_in_workers_and_resumes_them(tmp_path):
    """scripts/eval_micro.py: each trial of the official init states in its own result file, written by a worker
    process with --replan-steps' actions of each chunk executed; a rerun runs nothing again (the files are
    untouched) and reports the same success and interval."""
    import os
    import subprocess
    import sys

    import xarray as xr

    from dcvla.libero.episodes import DEMO_TASKS
    from dcvla.success import wilson_interval

    task = DEMO_TASKS["libero_goal"]
    command = [sys.executable, str(CHECKPOINT_DIR.parent / "scripts" / "eval_micro.py"), "smolvla-micro",
               "--checkpoint", str(CHECKPOINT_DIR / "smolvla-micro"), "--suites", "libero_goal", "--trials", "2",
               "--workers", "1", "--max-steps", "3", "--replan-steps", "2", "--out", str(tmp_path)]
    env = dict(os.environ, MUJOCO_GL=os.environ.get("MUJOCO_GL", "egl"))

    def run() -> str:
        done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
        assert done.returncode == 0, done.stderr[-2000:]
        return done.stdout

    first = run()
    files = [tmp_path / f"libero_goal_task{task:02d}" / f"trial{t:02d}.nc" for t in range(2)]
    stamps = [f.stat().st_mtime_ns for f in files]
    low, high = wilson_interval(0, 2)
    summary = f"libero_goal task {task}: 0/2 = 0.00 (Wilson 95% {low:.2f}-{high:.2f})"
    assert summary in first  # three steps never finish the task
    assert summary in run()
    assert [f.stat().st_mtime_ns for f in files] == stamps
    result = xr.open_dataset(files[0])
    assert result.attrs["method"] == "none"  # the policy without prefix reuse
    # two actions of each chunk executed (the protocol's 5 would call the policy once in the 3 steps)
    assert result.attrs["replan_steps"] == 2 and int(result.latency_ms.notnull().sum("step")[0]) == 2


def test_rollout_gif_summarises_a_flow_policys_reuse():
    """scripts/rollout_gif.py's line on a flow policy's trial: its inferences, the gate's openings, the mean reuse
    (an OpenVLA policy's records have no gate: tests/test_training_oft.py)."""
    from types import SimpleNamespace

    from test_training import load_script

    records = [SimpleNamespace(gate=False, reuse_fraction=0.0), SimpleNamespace(gate=True, reuse_fraction=0.5)]
    summary = load_script("rollout_gif").reuse_summary("smolvla-micro", SimpleNamespace(records=records))
    assert summary == "2 inferences; the gate opened on 1, 0.25 of the prefix K/V reused on average"


def test_rollout_gif_refuses_a_reuse_option_of_the_other_family(capsys):
    """--mode is a flow policy's, --method an OpenVLA-family policy's: the other is refused before anything loads."""
    from test_training import load_script

    gif = load_script("rollout_gif")
    for argv, said in ((["oft-micro", "--mode", "full"], "--mode is a flow policy's reuse mode; oft-micro is OpenVLA's"),
                       (["smolvla-micro", "--method", "dual_cache"],
                        "--method is an OpenVLA-family cache method; smolvla-micro is a flow policy")):
        with pytest.raises(SystemExit) as exit_:
            gif.main(argv)
        assert exit_.value.code == 2 and said in capsys.readouterr().err


def test_eval_micro_pairs_its_trials_with_another_run(tmp_path):
    """scripts/eval_micro.py --against: the trials of the same init states another run's folder holds, paired, with
    which init states only one run won and the exact McNemar p; a task the folder lacks is said so."""
    import xarray as xr

    from test_training import load_script

    script = load_script("eval_micro")
    for trial, success in [(0, 0), (1, 0), (2, 1), (5, 0)]:
        path = script.trial_path(tmp_path, "libero_10", 4, trial)
        path.parent.mkdir(parents=True, exist_ok=True)
        xr.Dataset({"success": ("trial", [success])}, coords={"trial": [trial]}).to_netcdf(path)
    mine = {("libero_10", 4): {0: 1, 1: 0, 2: 1, 3: 1}, ("libero_goal", 8): {0: 1}}
    lines = script.against(tmp_path, mine)
    assert lines == [
        f"libero_10 task 4 against {tmp_path}: 3 paired trials, 1 both won, 1 only this run ([0]), 0 only that one "
        "([]); McNemar p = 1",
        f"libero_goal task 8 against {tmp_path}: no trial of these init states there"]
    mine[("libero_10", 4)].update({1: 1, 2: 0})  # wins 0 and 1, loses 2
    assert "2 only this run ([0, 1]), 1 only that one ([2])" in script.against(tmp_path, mine)[0]
