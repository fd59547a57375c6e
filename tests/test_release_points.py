"""scripts/release_points.py: where a pick-and-place task's objects are let go, in demonstrations and rollouts."""

from __future__ import annotations

import numpy as np
import pytest

from dcvla.libero.episodes import Episode, save_episode
from dcvla.studies.micro import CHECKPOINT_DIR
from test_training import load_script

script = load_script("release_points")


def test_a_release_is_an_open_after_a_close():
    gripper = np.array([-1, -1, 1, 1, -1, -1, 1, -1, 1])  # LIBERO: +1 closes, -1 opens
    assert script.releases(gripper).tolist() == [4, 7]
    assert script.releases(np.array([-1, -1])).tolist() == [] and script.releases(np.array([1, 1])).tolist() == []


def test_hover_counts_the_still_steps_high_above_each_release():
    z = np.array([0.5, 0.7, 0.7, 0.7, 0.6, 0.5, 0.5, 0.7, 0.7, 0.5, 0.5])
    hand = np.stack([np.zeros_like(z), np.zeros_like(z), z], axis=1)
    gripper = np.array([-1, 1, 1, 1, 1, 1, -1, 1, 1, 1, -1])  # closes at 1 and 7, releases at 6 and 10
    # first release: steps 1 and 2 still at 0.7 (step 3 moves down); second: step 7 still at 0.7, step 8 moves
    assert script.hover_steps(hand, gripper) == [2, 1]
    assert script.hover_steps(hand, gripper, height=0.3) == [0, 0]


def _demo(path, hand: np.ndarray, gripper: list[float]) -> None:
    n = len(gripper)
    actions = np.zeros((n, 7), np.float32)
    actions[:, 6] = gripper
    save_episode(Episode(jpegs=[b"jpeg"] * n, eef_pos=hand.astype(np.float32), eef_quat=np.zeros((n, 4)),
                         gripper_qpos=np.zeros((n, 2)), actions=actions, done=np.zeros(n, bool), meta={}), path)


def test_demonstrations_releases_and_their_summary(tmp_path, capsys):
    hand = np.arange(15, dtype=float).reshape(5, 3) / 100
    _demo(tmp_path / "a.npz", hand, [1, -1, 1, 1, -1])       # two releases: steps 1 and 4
    _demo(tmp_path / "b.npz", hand + 0.1, [-1, 1, 1, -1, -1])  # one: step 3
    rows = script.demo_releases(tmp_path)
    assert [name for name, _, _ in rows] == ["a.npz", "b.npz"]
    np.testing.assert_allclose(rows[0][1], hand[[1, 4]], atol=1e-6)
    np.testing.assert_allclose(rows[1][1], hand[[3]] + 0.1, atol=1e-6)
    first, second = script.summarise(rows)
    # release 1: hands at x 0.03 and 0.19 (median 0.11); release 2 only in a.npz
    assert first.startswith("release 1: 2 of 2; hand x +0.110 (+0.030 to +0.190)")
    assert second.startswith("release 2: 1 of 2; hand x +0.120 (+0.120 to +0.120)")
    assert first.endswith("hovered above it 0 (0 to 0) steps")  # it never stood still
    assert script.main(["--demos", str(tmp_path)]) == 0
    assert ("a.npz: 2 releases, hand at (+0.030, +0.040, +0.050), (+0.120, +0.130, +0.140); hovered above them [0, 0]"
            " steps") in capsys.readouterr().out
    with pytest.raises(FileNotFoundError, match="no demonstrations"):
        script.demo_releases(tmp_path / "nothing")


def test_a_rollout_reports_where_each_goal_object_ends(capsys):
    """A 3-step rollout of the shipped oft-micro-goal on its task: no release, and the goal objects' distance from
    their targets at the end (libero_goal task 8: the bowl and the plate)."""
    argv = ["oft-micro", "--checkpoint", str(CHECKPOINT_DIR / "oft-micro-goal"), "--suite", "libero_goal",
            "--inits", "0", "--max-steps", "3"]
    assert script.main(argv) == 0
    out = capsys.readouterr().out
    assert "init state 0: failure in 3 steps" in out and "release at" not in out
    end = next(line for line in out.splitlines() if line.startswith("  end: "))
    assert " cm from " in end and " cm above it" in end and ", gripper open; " in end  # 3 steps: never closed
    with pytest.raises(SystemExit):
        script.main(["oft-micro", "--demos", "x"])  # one or the other
