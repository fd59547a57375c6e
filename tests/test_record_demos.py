"""scripts/record_demos.py: resuming a folder of demonstrations, and keeping one recipe per folder."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np
import pytest

from dcvla.libero.episodes import Episode, save_episode

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("record_demos", ROOT / "scripts" / "record_demos.py")
script = importlib.util.module_from_spec(spec)
spec.loader.exec_module(script)


def test_record_demos_resumes_and_never_retries_a_failed_seed(tmp_path, monkeypatch):
    """scripts/record_demos.py: slot k tries seeds k, k + per_task, ...; a kept demonstration or a .failed marker
    settles a seed, so a rerun records only what is missing."""
    tried = []

    def fake_record(suite, task, env=None, placement_seed=None, action_noise=0.0, finish=False, oracle=None):
        assert action_noise == 0.25 and finish is True
        assert oracle.options() == {"lower_speed": 0.5, "approach_speed": 0.0, "carry_tolerance": 0.01}
        tried.append(placement_seed)
        meta = {"success": placement_seed != 1, "n_steps": 3, "suite": suite, "task_id": task,
                "placement_seed": placement_seed, "init_state_index": -1}
        return type("Ep", (), {"meta": meta, "name": f"{suite}/task{task:02d}/seed{placement_seed:04d}"})()

    monkeypatch.setattr(script, "record_episode", fake_record)
    monkeypatch.setattr(script, "save_episode", lambda ep, path: path.write_bytes(b"demo"))
    monkeypatch.setattr("dcvla.libero.env.make_env", lambda *a, **k: None)
    monkeypatch.setattr("dcvla.libero.env.close_env", lambda env: None)
    speeds = {"lower_speed": 0.5}
    job = ("libero_spatial", 0, [0, 1, 2], tmp_path, 3, 2, 0.25, True, speeds, os.getppid())  # seeds (0, 3), (1, 4), (2, 5)
    assert script.record_slots(job)[2:4] == (3, 1)
    assert tried == [0, 1, 4, 2]  # seed 1 failed, slot 1 went on to seed 4
    assert (tmp_path / "libero_spatial_task00_seed0001.failed").exists()
    tried.clear()
    assert script.record_slots(job)[2:4] == (0, 0) and tried == []  # everything settled: nothing redone
    (tmp_path / "libero_spatial_task00_seed0004.npz").unlink()
    tried.clear()
    assert script.record_slots(job[:-1] + (os.getppid() + 1,))[2:4] == (0, 0) and tried == []  # parent gone: stop
    script.record_slots(job)
    assert tried == [4]  # only the missing demonstration, not the failed seed again



def _demo(path: Path, meta: dict) -> None:
    """A one-frame demonstration file with `meta`."""
    one = np.zeros((1, 1))
    save_episode(Episode(jpegs=[b"jpeg"], eef_pos=one.repeat(3, 1), eef_quat=one.repeat(4, 1),
                         gripper_qpos=one.repeat(2, 1), actions=one.repeat(7, 1), done=np.zeros(1, bool), meta=meta), path)


def test_a_rerun_with_another_recipe_stops_naming_the_file(tmp_path):
    """Demonstrations of different recipes never mix in one folder; a file from before a speed existed counts it 0."""
    _demo(tmp_path / "libero_10_task04_seed0003.npz", {"action_noise": 0.3, "finish": 0})  # an older file: no speeds
    _demo(tmp_path / "libero_object_task00_seed0000.npz", {"action_noise": 0.0, "finish": 1})
    plain = dict(action_noise=0.3, finish=0.0, lower_speed=0.0, approach_speed=0.0, carry_tolerance=0.01)
    script.check_recipe(tmp_path, "libero_10", 4, plain)
    with pytest.raises(SystemExit, match=r"libero_10_task04_seed0003\.npz.*'lower_speed': 0\.0.*'lower_speed': 0\.5"):
        script.check_recipe(tmp_path, "libero_10", 4, {**plain, "lower_speed": 0.5})
    with pytest.raises(SystemExit, match="approach_speed"):
        script.check_recipe(tmp_path, "libero_10", 4, {**plain, "approach_speed": 0.3})
    with pytest.raises(SystemExit, match="'carry_tolerance': 0.01.*'carry_tolerance': 0.03"):  # the old default
        script.check_recipe(tmp_path, "libero_10", 4, {**plain, "carry_tolerance": 0.03})
    with pytest.raises(SystemExit, match="libero_object_task00_seed0000"):
        script.check_recipe(tmp_path, "libero_object", 0, {**plain, "finish": 1.0})
    script.check_recipe(tmp_path, "libero_spatial", 0, {**plain, "lower_speed": 0.5})  # none there yet
    (tmp_path / "libero_goal_task08_seed0000.npz").write_bytes(b"cut short")
    with pytest.raises(ValueError, match="libero_goal_task08_seed0000.npz"):
        script.check_recipe(tmp_path, "libero_goal", 8, plain)
    with pytest.raises(SystemExit):
        script.main(["--suites", "libero_10", "--lower-speed", "0.5", "--noise", "0.3", "--out", str(tmp_path)])
    with pytest.raises(SystemExit):  # argparse: out of range
        script.main(["--suites", "libero_spatial", "--approach-speed", "1.5", "--out", str(tmp_path)])
    with pytest.raises(SystemExit):  # metres, above 0
        script.main(["--suites", "libero_spatial", "--carry-tolerance", "0", "--out", str(tmp_path)])
