"""Training OpenVLA-OFT (dcvla.openvla.oft.train; scripts/train_micro.py oft-micro) at the tiny preset on the two
shipped libero_spatial episodes: the samples are what OFT's LIBERO evaluation hands the policy, the batched forward
is the policy's own, training fits, and the checkpoint is one the family's strict loader and the micro loader take."""

from __future__ import annotations

import csv
from dataclasses import replace

import numpy as np
import pytest
import torch

from dcvla.libero.episodes import load_episodes
from dcvla.libero.protocol import openvla_action, policy_input
from dcvla.openvla import CacheConfig
from dcvla.openvla.oft import OFTCachedPolicy, OFTProcessor, get_preset, random_model, save_pretrained
from dcvla.openvla.oft.processing import normalize_proprio
from dcvla.openvla.oft.train import OFTFrames, chunk_predictions, l1_loss
from dcvla.openvla.train import STATS_KEY, dataset_statistics, normalize
from dcvla.tokenizer import load_tokenizer
from dcvla.training import LOSS_FILE, TrainConfig, train

from test_training import SCRIPT, load_script

TINY = get_preset("oft-tiny")


@pytest.fixture(scope="module")
def demos():
    """The shipped libero_spatial episodes with both views, every 4th frame, as OFT demonstrations (their two
    instructions tokenize to prompts of different lengths)."""
    k = slice(None, None, 4)
    episodes = [replace(ep, jpegs=ep.jpegs[k], wrist_jpegs=ep.wrist_jpegs[k], eef_pos=ep.eef_pos[k],
                        eef_quat=ep.eef_quat[k], gripper_qpos=ep.gripper_qpos[k], actions=ep.actions[k], done=ep.done[k],
                        _frames=None, _wrist_frames=None) for ep in load_episodes(suite="libero_spatial")]
    return episodes, SCRIPT.oft_demos(episodes)


def oft_data(demos, seed=0, shift=0):
    model = random_model(TINY, seed=seed)
    model.norm_stats = dataset_statistics(demos)
    processor = OFTProcessor(load_tokenizer(), TINY)
    return model, processor, OFTFrames(demos, processor, model, model.norm_stats, shift=shift)


def test_samples_are_what_ofts_evaluation_hands_the_policy(demos):
    """Both views center-cropped, OpenVLA's gripper convention, the proprio and the chunk normalised by q01 / q99,
    the chunk clamped at the episode's end."""
    episodes, demos = demos
    model, _, data = oft_data(demos)
    stats = model.norm_stats[STATS_KEY]
    n = len(demos[0].actions)
    last = n - 3  # its chunk runs past the end: the last action repeats
    frames = data.frames(last)
    ep = episodes[0]
    np.testing.assert_array_equal(frames[0], policy_input(ep.frames[last]))
    np.testing.assert_array_equal(frames[1], policy_input(ep.wrist_frames[last]))
    pixels, ids, proprio, chunk = data.sample(last)
    want_ids, want_pixels = data.processor(frames, demos[0].instruction)  # the policy's own preprocessing
    torch.testing.assert_close(ids, want_ids[0], rtol=0, atol=0)
    torch.testing.assert_close(pixels.flatten(0, 1), want_pixels[0], rtol=0, atol=0)
    want = normalize(openvla_action(ep.actions)[[n - 3, n - 2, n - 1] + [n - 1] * 5], stats["action"])
    torch.testing.assert_close(chunk, torch.from_numpy(want).float())
    assert set(chunk[:, -1].tolist()) <= {0.0, 1.0}
    torch.testing.assert_close(proprio, torch.from_numpy(normalize_proprio(ep.states[last].astype(np.float64),
                                                                           stats["proprio"])).float())
    assert len(data.prompts) == 2 and len(set(map(len, data.prompts.values()))) == 2


def test_the_objective_is_the_policys_own_forward(demos):
    """Each sample's batched chunk (right-padded beside a longer prompt) equals the vanilla policy's step on that
    frame, its raw images and state: the training sequence, positions and preprocessing are the evaluation's."""
    _, demos = demos
    model, processor, data = oft_data(demos)
    policy = OFTCachedPolicy(model, processor, CacheConfig("vanilla", unnorm_key=STATS_KEY))
    picks = [5, len(demos[0].actions) + 5]  # one frame of each demonstration: prompts of two lengths
    pixels, prompts, proprio, _ = zip(*(data.sample(i) for i in picks))
    with torch.no_grad():
        batched = chunk_predictions(model, torch.stack(pixels).flatten(1, 2), prompts, torch.stack(proprio))
    for row, i in zip(batched, picks):
        d, f = data.index[i]
        policy.reset()
        policy.step(data.frames(i), demos[d].instruction, demos[d].states[f])
        torch.testing.assert_close(row, torch.from_numpy(policy.last.normalized), rtol=1e-4, atol=1e-5)
    assert (batched[0] - batched[1]).abs().max() > 1e-4  # two samples, not one twice


def test_shifts_move_each_view_on_its_own_and_again_alike(demos, monkeypatch):
    from dcvla.openvla.oft import train as oft_train

    _, demos = demos
    model, _, shifted = oft_data(demos, shift=8)
    seen = []
    monkeypatch.setattr(oft_train, "chunk_predictions", lambda m, pixels, prompts, proprio: seen.append(pixels)
                        or torch.zeros(len(prompts), 8, 7, requires_grad=True))
    for _ in range(2):
        l1_loss(model, shifted, np.array([1, 7]))
    plain = torch.stack([shifted.sample(1)[0], shifted.sample(7)[0]]).flatten(1, 2)
    assert torch.equal(seen[0], seen[1]) and not torch.equal(seen[0], plain)
    assert seen[0].shape == plain.shape == (2, 12, 224, 224)
    offsets = []
    for moved, original in zip(seen[0].reshape(4, 6, 224, 224), plain.reshape(4, 6, 224, 224)):
        offsets.append([(dy, dx) for dy in range(-8, 9) for dx in range(-8, 9)  # one offset for a view's 6 channels
                        if torch.equal(moved[:, 8:-8, 8:-8], original[:, 8 + dy: 216 + dy or None, 8 + dx: 216 + dx or None])])
        assert offsets[-1], "no single offset moves every channel of the view"
    assert offsets[0] != offsets[1] and offsets[2] != offsets[3]  # a sample's two views move on their own


def test_training_fits_a_batch_and_ships_a_loadable_checkpoint(demos, tmp_path):
    from dcvla.studies.micro import load_micro

    _, demos = demos
    model, _, data = oft_data(demos)
    config = TrainConfig(steps=8, batch_size=4, lr=3e-3, warmup=1, checkpoint_every=8)
    train(model, lambda m, idx: l1_loss(m, data, np.arange(4)), len(data), config, tmp_path / "work", progress=False)
    losses = [float(r["loss"]) for r in csv.DictReader((tmp_path / "work" / LOSS_FILE).open())]
    assert losses[-1] < 0.7 * losses[0], losses
    save_pretrained(model, tmp_path / "ckpt")
    policy = load_micro("oft-micro", checkpoint=tmp_path / "ckpt")  # the micro loader: OFT's strict one
    assert isinstance(policy, OFTCachedPolicy) and policy.model.config.name == "oft-tiny"
    assert policy.model.norm_stats == model.norm_stats
    chunk = policy.step(data.frames(0), demos[0].instruction, demos[0].states[0])
    assert chunk.shape == (8, 7) and np.isfinite(chunk).all()
    gif = load_script("rollout_gif")
    assert policy.records and gif.reuse_summary("oft-micro", policy, np.array([policy.last_reuse])) is None  # vanilla
    assert gif.reuse_summary("oft-micro", policy, np.array([0.0, 0.25, 0.125])) == (
        "3 inferences; 2 reused vision tokens, 0.125 of them on average (min 0.000, max 0.250)")


def test_train_micro_script_trains_oft_micro(tmp_path, capsys):
    """scripts/train_micro.py oft-micro at one step: OFT's layout (backbone, both heads, statistics) of the micro
    preset, loaded strictly."""
    import shutil

    from dcvla.libero.episodes import list_episodes
    from dcvla.openvla.oft import load_pretrained

    root = tmp_path / "demos"
    root.mkdir()
    shutil.copy(list_episodes(suite="libero_goal")[0], root)
    args = ["oft-micro", "--demos", str(root), "--out", str(tmp_path / "ckpt"), "--work", str(tmp_path / "work"),
            "--figure", str(tmp_path / "loss.png"), "--steps", "1", "--batch-size", "2"]
    assert SCRIPT.main(args) == 0
    assert "oft-micro: 9." in capsys.readouterr().out
    model = load_pretrained(tmp_path / "ckpt")
    assert model.config.name == "oft-micro" and STATS_KEY in model.norm_stats
    assert sorted(p.name.split("--")[0] for p in (tmp_path / "ckpt").glob("*--*.pt")) == ["action_head", "proprio_projector"]
