"""Training the micro policies (dcvla.training, dcvla.openvla.train; scripts/train_micro.py) at the tiny preset on two
shipped episodes standing in for the demonstrations: the objective is the decoder's own computation, a stopped run
resumes to the very weights of one that never stopped, and the result is a checkpoint the family's loader takes."""

from __future__ import annotations

import csv
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from dcvla.libero.episodes import load_episodes
from dcvla.openvla import CacheConfig, CachedPolicy
from dcvla.openvla.actions import unnormalize_action
from dcvla.openvla.model import random_model
from dcvla.libero.protocol import openvla_action, postprocess_action
from dcvla.openvla.train import STATS_KEY, DemoFrames, action_loss, dataset_statistics, normalize, teacher_forced_logits
from dcvla.training import LOSS_FILE, STATE_FILE, TrainConfig, batch_indices, train

ROOT = Path(__file__).resolve().parents[1]


def load_script(name: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


SCRIPT = load_script("train_micro")


@pytest.fixture(scope="module")
def demos():
    """The shipped libero_spatial episodes, every 4th frame (decoding every frame costs seconds)."""
    cut = lambda ep, k=slice(None, None, 4): replace(  # noqa: E731
        ep, jpegs=ep.jpegs[k], eef_pos=ep.eef_pos[k], eef_quat=ep.eef_quat[k], gripper_qpos=ep.gripper_qpos[k],
        actions=ep.actions[k], done=ep.done[k], wrist_jpegs=None, _frames=None, _wrist_frames=None)
    episodes = [cut(ep) for ep in load_episodes(suite="libero_spatial")]
    assert all(-1.0 in ep.actions[:, -1] and 1.0 in ep.actions[:, -1] for ep in episodes), "both gripper commands"
    return SCRIPT.openvla_demos(episodes)


@pytest.fixture(scope="module")
def statistics(demos):
    return dataset_statistics(demos)


def tiny_data(base, demos, statistics, seed=0):
    model = random_model(base.model.config, seed=seed)
    model.norm_stats = statistics
    return model, DemoFrames(demos, base.processor, model, statistics)


def test_actions_in_openvlas_conventions(demos, statistics):
    stats = statistics[STATS_KEY]["action"]
    assert stats["mask"] == [True] * 6 + [False]
    libero = np.concatenate([ep.actions for ep in load_episodes(suite="libero_spatial")])
    assert set(np.unique(libero[:, -1])) == {-1.0, 1.0}
    openvla = openvla_action(libero)
    np.testing.assert_array_equal(openvla[:, -1], np.where(libero[:, -1] < 0, 1.0, 0.0))  # open (-1) is 1, as OpenVLA's
    assert all(np.array_equal(postprocess_action(a), b) for a, b in zip(openvla, libero))  # the evaluation's inverse
    inside = np.concatenate([d.actions for d in demos])
    inside = inside[((inside[:, :6] >= stats["q01"][:6]) & (inside[:, :6] <= stats["q99"][:6])).all(1)]
    np.testing.assert_allclose(unnormalize_action(normalize(inside, stats), stats), inside, atol=1e-9)


def test_the_objective_scores_what_the_decoder_computes(base, demos, statistics):
    """Teacher forcing on the greedy tokens gives the logits greedy decoding chose them with: the training sequence is
    the inference sequence."""
    model, data = tiny_data(base, demos, statistics)
    pixels, ids, _ = data.sample(5)
    prediction = model.reference_action(ids[None], pixels[None], unnorm_key=STATS_KEY)
    with torch.no_grad():
        logits = teacher_forced_logits(model, pixels[None], [ids], prediction.token_ids[None])
    torch.testing.assert_close(logits[0], prediction.logits, rtol=1e-4, atol=1e-4)
    other = data.sample(40)  # a longer batch row: right padding leaves the shorter row's logits alone
    with torch.no_grad():
        both = teacher_forced_logits(model, torch.stack([pixels, other[0]]), [ids, torch.cat([other[1], other[1][1:]])],
                                     torch.stack([prediction.token_ids, other[2]]))
    torch.testing.assert_close(both[0], prediction.logits, rtol=1e-4, atol=1e-4)


def test_batches_are_a_function_of_the_step():
    config = TrainConfig(steps=10, batch_size=4, seed=3)
    first = [batch_indices(10, config, s) for s in range(5)]  # two epochs of 10 samples
    assert sorted(np.concatenate(first[:2]).tolist() + first[2][:2].tolist()) == list(range(10))
    assert all(np.array_equal(a, batch_indices(10, config, s)) for s, a in enumerate(first))
    assert not np.array_equal(first[0], batch_indices(10, TrainConfig(steps=10, batch_size=4, seed=4), 0))


def test_a_stopped_run_resumes_to_the_same_weights(base, demos, statistics, tmp_path):
    config = TrainConfig(steps=4, batch_size=2, lr=1e-3, warmup=1, checkpoint_every=2)
    straight, data = tiny_data(base, demos, statistics)
    train(straight, lambda m, idx: action_loss(m, data, idx), len(data), config, tmp_path / "straight", progress=False)

    model, data = tiny_data(base, demos, statistics)
    calls = []

    def crashing(m, idx):  # a crash in step 3, after the checkpoint of step 2 and step 2's loss row
        calls.append(len(calls))
        if len(calls) == 4:
            raise KeyboardInterrupt
        return action_loss(m, data, idx)

    with pytest.raises(KeyboardInterrupt):
        train(model, crashing, len(data), config, tmp_path / "resumed", progress=False)
    assert torch.load(tmp_path / "resumed" / STATE_FILE, weights_only=True)["step"] == 2
    model, data = tiny_data(base, demos, statistics, seed=1)  # other weights: the checkpoint must replace them
    assert train(model, lambda m, idx: action_loss(m, data, idx), len(data), config, tmp_path / "resumed",
                 progress=False) == 4
    for (name, a), b in zip(straight.state_dict().items(), model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    rows = list(csv.DictReader((tmp_path / "resumed" / LOSS_FILE).open()))
    assert [int(r["step"]) for r in rows] == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="train_state.pt was trained with"):
        train(model, lambda m, idx: action_loss(m, data, idx), len(data), TrainConfig(steps=5, batch_size=2),
              tmp_path / "resumed", progress=False)


def test_training_fits_a_batch_and_ships_a_loadable_checkpoint(base, demos, statistics, tmp_path):
    from dcvla.openvla.checkpoint import save_pretrained

    model, data = tiny_data(base, demos, statistics)
    config = TrainConfig(steps=8, batch_size=4, lr=3e-3, warmup=1, checkpoint_every=8)
    train(model, lambda m, idx: action_loss(m, data, np.arange(4)), len(data), config, tmp_path / "work", progress=False)
    losses = [float(r["loss"]) for r in csv.DictReader((tmp_path / "work" / LOSS_FILE).open())]
    assert losses[-1] < losses[0] - 1.0, losses
    save_pretrained(model, tmp_path / "ckpt")
    policy = CachedPolicy.from_pretrained(tmp_path / "ckpt", config=CacheConfig("vanilla", unnorm_key=STATS_KEY))
    assert policy.model.norm_stats == statistics
    action = policy.step(data.frame(0), demos[0].instruction)
    assert action.shape == (7,) and 0.0 <= action[-1] <= 1.0


def test_train_micro_script_trains_resumes_and_writes_the_checkpoint(tmp_path, capsys):
    """scripts/train_micro.py end to end at two steps: the checkpoint in OpenVLA's layout with its statistics, the
    loss curve; a rerun resumes at the end and trains nothing more."""
    import shutil

    from dcvla.libero.episodes import list_episodes
    from dcvla.openvla.checkpoint import load_pretrained

    root = tmp_path / "demos"
    root.mkdir()
    shutil.copy(list_episodes(suite="libero_goal")[0], root)
    script = SCRIPT
    args = ["openvla-micro", "--demos", str(root), "--out", str(tmp_path / "ckpt"), "--work", str(tmp_path / "work"),
            "--figure", str(tmp_path / "loss.png"), "--steps", "2", "--batch-size", "2", "--checkpoint-every", "1"]
    assert script.main(args) == 0
    out = capsys.readouterr().out
    assert "demonstrations: libero_goal task 6: 1\n" in out and "checkpoint ->" in out
    model = load_pretrained(tmp_path / "ckpt")
    assert model.config.name == "openvla-micro" and STATS_KEY in model.norm_stats
    assert (tmp_path / "loss.png").stat().st_size > 0
    assert script.main(args) == 0
    assert len(list(csv.DictReader((tmp_path / "work" / LOSS_FILE).open()))) == 2
