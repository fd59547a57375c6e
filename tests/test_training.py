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


def test_openvla_batches_shift_both_towers_pixels_alike_and_the_same_way_again(base, demos, statistics, monkeypatch):
    """`shift` moves a sample's DINOv2 and SigLIP pixels by one offset, drawn from the batch's indices (a resumed run
    sees the same pixels); the action tokens stay the oracle's."""
    from dcvla.openvla import train as openvla_train

    model, plain = tiny_data(base, demos, statistics)
    shifted = DemoFrames(demos, base.processor, model, statistics, shift=8)
    seen = []
    monkeypatch.setattr(openvla_train, "teacher_forced_logits", lambda m, pixels, prompts, targets: seen.append(
        (pixels, targets)) or torch.zeros(*targets.shape, int(targets.max()) + 1, requires_grad=True))
    for data in (shifted, shifted, plain):
        action_loss(model, data, np.array([1, 7]))
    (a, tokens), (b, _), (c, plain_tokens) = seen
    assert torch.equal(a, b) and not torch.equal(a, c) and torch.equal(tokens, plain_tokens)
    for moved, original in zip(a, c):  # one offset for all 6 channels: some (dy, dx) maps both towers' pixels
        match = [(dy, dx) for dy in range(-8, 9) for dx in range(-8, 9)
                 if torch.equal(moved[:, 8:-8, 8:-8], original[:, 8 + dy: 216 + dy or None, 8 + dx: 216 + dx or None])]
        assert match, "no single offset moves every channel of the sample"


def test_batches_are_a_function_of_the_step():
    config = TrainConfig(steps=10, batch_size=4, seed=3)
    first = [batch_indices(10, config, s) for s in range(5)]  # two epochs of 10 samples
    assert sorted(np.concatenate(first[:2]).tolist() + first[2][:2].tolist()) == list(range(10))
    assert all(np.array_equal(a, batch_indices(10, config, s)) for s, a in enumerate(first))
    assert not np.array_equal(first[0], batch_indices(10, TrainConfig(steps=10, batch_size=4, seed=4), 0))


def test_a_run_stopped_before_its_first_checkpoint_starts_its_log_afresh(tmp_path):
    model = torch.nn.Linear(2, 1)
    config = TrainConfig(steps=3, batch_size=2, warmup=1, checkpoint_every=3)
    calls = []

    def loss(m, idx):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # in step 1: step 0's row is logged, no checkpoint yet
        return m(torch.ones(len(idx), 2)).pow(2).mean()

    with pytest.raises(KeyboardInterrupt):
        train(model, loss, 4, config, tmp_path, progress=False)
    assert not (tmp_path / STATE_FILE).exists() and (tmp_path / LOSS_FILE).exists()
    assert train(model, loss, 4, config, tmp_path, progress=False) == 3
    assert [int(r["step"]) for r in csv.DictReader((tmp_path / LOSS_FILE).open())] == [0, 1, 2]


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
    with pytest.raises(SystemExit):  # nothing trained yet: nothing to export
        script.main([*args, "--export"])
    assert f"no training state {tmp_path / 'work' / STATE_FILE} to export" in capsys.readouterr().err
    assert not (tmp_path / "ckpt").exists()
    assert script.main([*args, "--stop-after", "1"]) == 0 and not (tmp_path / "ckpt").exists()
    early = tmp_path / "step1"
    log = tmp_path / "work" / LOSS_FILE
    with log.open("a") as f:  # a run still training appends past its last checkpoint, to this very file
        f.write("1,9.9,0.0003,1.0\n")
    before = (log.stat().st_ino, log.read_text())
    assert script.main([*args, "--export", "--out", str(early)]) == 0  # step 1's weights, nothing trained
    assert f"checkpoint of step 1 -> {early}" in capsys.readouterr().out
    assert (log.stat().st_ino, log.read_text()) == before  # not rewritten under the live run
    state = torch.load(tmp_path / "work" / STATE_FILE, weights_only=True)["model"]
    exported = load_pretrained(early).state_dict()
    name = next(k for k in state if "lm_head" in k)
    torch.testing.assert_close(exported[name], state[name].to(torch.bfloat16).to(exported[name].dtype), rtol=0, atol=0)
    assert script.main(args) == 0
    out = capsys.readouterr().out
    assert "demonstrations: libero_goal task 8: 1\n" in out and "checkpoint ->" in out
    model = load_pretrained(tmp_path / "ckpt")
    assert model.config.name == "openvla-micro" and STATS_KEY in model.norm_stats
    assert (tmp_path / "loss.png").stat().st_size > 0
    assert script.main(args) == 0
    assert len(list(csv.DictReader((tmp_path / "work" / LOSS_FILE).open()))) == 2


# --------------------------------------------------------------------------------------------- SmolVLA (flow)
@pytest.fixture(scope="module")
def smolvla_demos():
    """The shipped libero_spatial episodes with their wrist views, every 4th frame, as SmolVLA demonstrations (their
    two instructions tokenize to prompts of different lengths)."""
    k = slice(None, None, 4)
    episodes = [replace(ep, jpegs=ep.jpegs[k], wrist_jpegs=ep.wrist_jpegs[k], eef_pos=ep.eef_pos[k],
                        eef_quat=ep.eef_quat[k], gripper_qpos=ep.gripper_qpos[k], actions=ep.actions[k], done=ep.done[k],
                        _frames=None, _wrist_frames=None) for ep in load_episodes(suite="libero_spatial")]
    return SCRIPT.smolvla_demos(episodes)


def smolvla_data(demos, preset="smolvla-tiny", seed=0, **changes):
    """A random SmolVLA of `preset` (with `changes`; 1024 token rows, as the micro preset holds dcvla's tokenizer:
    the tiny preset's 32,000 would be most of a step's time) normalised with the demonstrations' statistics, its
    policy on dcvla's tokenizer, and the demonstrations as its training samples."""
    from dcvla.smolvla import SmolVLAPolicy
    from dcvla.smolvla import random_model as smolvla_model
    from dcvla.smolvla.config import get_preset, with_dims
    from dcvla.smolvla.train import DemoFrames, dataset_statistics
    from dcvla.tokenizer import load_tokenizer

    model = smolvla_model(with_dims(get_preset(preset), **{"vocab_size": 1024, **changes}), seed=seed)
    model.normalization = dataset_statistics(demos)
    policy = SmolVLAPolicy(model, load_tokenizer(), seed=seed)
    return model, policy, DemoFrames(demos, policy)


def test_smolvla_learns_lerobots_targets_on_what_its_evaluation_hands_it(smolvla_demos):
    """LIBERO's own action convention (what the evaluation executes unflipped), MEAN_STD statistics in float32, chunks
    padded at the episode's end by repeating the last action and masking it, and micro frames that the policy's
    resize leaves untouched."""
    from dcvla.libero.protocol import POLICY_RESOLUTION, action_convention, postprocess
    from dcvla.normalization import ACTION, STATE
    from dcvla.smolvla import SmolVLAPolicy
    from dcvla.training import chunk_rows

    assert action_convention(SmolVLAPolicy) == "libero"
    actions = np.concatenate([d.actions for d in smolvla_demos])
    assert set(np.unique(actions[:, -1])) == {-1.0, 1.0}
    np.testing.assert_array_equal(np.stack([postprocess(a, "libero") for a in actions]), actions)
    model, policy, data = smolvla_data(smolvla_demos, "smolvla-micro")
    norm = model.normalization
    assert norm.modes == {STATE: "MEAN_STD", ACTION: "MEAN_STD"}
    np.testing.assert_array_equal(norm.stats[ACTION]["std"], actions.astype(np.float64).std(0).astype(np.float32))
    rows, is_pad = chunk_rows(5, 3)
    np.testing.assert_array_equal(rows, [[0, 1, 2], [1, 2, 3], [2, 3, 4], [3, 4, 4], [4, 4, 4]])
    np.testing.assert_array_equal(is_pad, rows != np.arange(5)[:, None] + np.arange(3))
    last = len(smolvla_demos[0].actions) - 1
    batch = data.batch([last])
    assert batch.is_pad[0].tolist() == [False] + [True] * 9 and (batch.actions[0, 1:] == batch.actions[0, 0]).all()
    frames = data.frames(last)
    assert model.config.image_size == POLICY_RESOLUTION == frames[0].shape[0]  # resize-with-pad: the identity
    expected = torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2).float() / 255.0 * 2.0 - 1.0
    assert torch.equal(batch.pixels[0], expected)
    assert sum(p.numel() for p in model.parameters()) * 2 < 40e6  # ships under 40 MB in bfloat16


def test_the_flow_objective_differentiates_the_policys_own_velocity(smolvla_demos):
    """The training forward's velocity is the policy's: two Euler steps of the policy (t = 1, then 0.5) are
    reproduced from the training velocities of the same sample, run as a batch with another frame of its
    demonstration (one prompt length: one batched prefix) beside a frame whose prompt has another length, and each
    sample's velocity in the batch is its velocity alone; the gradient reaches the vision tower, the prefix layers
    (through the batch's K/V) and the expert."""
    from dcvla.smolvla.train import velocities

    model, policy, data = smolvla_data(smolvla_demos, num_steps=2)
    i, other = 5, len(smolvla_demos[0].actions) + 5  # frames of the two demonstrations
    d, f = data.index[i]
    policy.step(data.frames(i), smolvla_demos[d].instruction, smolvla_demos[d].states[f])
    noise = policy.last.noise.clone()
    samples = [i, i + 3, other]
    batch = data.batch(samples)
    assert batch.prompts[0].shape == batch.prompts[1].shape != batch.prompts[2].shape
    first = velocities(model, batch, noise.expand(3, -1, -1), torch.ones(3))
    x = noise - 0.5 * first[:1]
    second = velocities(model, batch, x.expand(3, -1, -1), torch.full((3,), 0.5))
    torch.testing.assert_close(x - 0.5 * second[:1], policy.last.chunk_normalized, rtol=0, atol=1e-5)
    with torch.no_grad():
        alone = torch.cat([velocities(model, data.batch([s]), x, torch.full((1,), 0.5)) for s in samples])
    torch.testing.assert_close(second.detach(), alone, rtol=0, atol=1e-5)
    assert (second[0] - second[1]).abs().max() > 1e-3  # the two frames of one prompt are not one sample twice
    second.sum().backward()
    for module in (model.parts.vision_model.embeddings.patch_embedding, model.text_model.layers[0].self_attn.k_proj,
                   model.expert.layers[1].self_attn.k_proj, model.state_proj, model.action_in_proj):
        assert module.weight.grad is not None and module.weight.grad.abs().sum() > 0


def test_random_shift_translates_each_image_with_its_edges_replicated(smolvla_demos):
    """DrQ's augmentation: every image of a batch moved by its own offset of at most `shift` pixels, the uncovered
    border filled from the edge; the same batch shifts the same way (a resumed run sees the same pixels), and
    `shift=0` hands the policy's pixels through untouched."""
    from dcvla.smolvla.train import DemoFrames
    from dcvla.training import random_shift

    image = torch.arange(2 * 3 * 16 * 16, dtype=torch.float32).reshape(2, 3, 16, 16)
    out = random_shift(image, 3, np.random.default_rng(0))
    offsets = np.random.default_rng(0).integers(0, 7, size=(2, 2))
    for img, moved, (y, x) in zip(image, out, offsets):
        dy, dx = int(y) - 3, int(x) - 3  # moved[r, c] = img[clamp(r + dy), clamp(c + dx)]
        rows, cols = (np.clip(np.arange(16) + d, 0, 15) for d in (dy, dx))
        assert torch.equal(moved, img[:, rows][:, :, cols])
    assert not torch.equal(out, image) and random_shift(image, 0, np.random.default_rng(0)) is image
    _, policy, plain = smolvla_data(smolvla_demos)
    shifted = DemoFrames(smolvla_demos, policy, shift=8)
    a, b, c = shifted.batch([1, 7]), shifted.batch([1, 7]), plain.batch([1, 7])
    assert torch.equal(a.pixels, b.pixels) and not torch.equal(a.pixels, c.pixels)
    assert torch.equal(a.actions, c.actions) and torch.equal(a.states, c.states)


def test_the_flow_loss_is_lerobots_reduction(smolvla_demos, monkeypatch):
    """The squared error against u_t = noise - actions, over the 7 real action dims and the unpadded rows only,
    with x_t = t noise + (1 - t) actions; noise and times a function of the batch, t in lerobot's [0.001, 1]."""
    from dcvla.smolvla import train as flow

    model, _, data = smolvla_data(smolvla_demos)
    indices = [3, len(smolvla_demos[0].actions) - 2]  # the second one's chunk runs past the episode's end
    seen = {}

    def constant(model, batch, x_t, t):  # a velocity of 0.5 everywhere, recording what it was asked
        seen.update(x_t=x_t, t=t)
        return torch.full_like(x_t, 0.5)

    monkeypatch.setattr(flow, "velocities", constant)
    loss = flow.flow_loss(model, data, indices)
    batch = data.batch(indices)
    noise, t = flow.flow_noise(indices, tuple(batch.actions.shape))
    assert torch.equal(noise, flow.flow_noise(indices, tuple(batch.actions.shape))[0]) and ((t >= 0.001) & (t <= 1)).all()
    torch.testing.assert_close(seen["x_t"], t[:, None, None] * noise + (1 - t[:, None, None]) * batch.actions)
    kept = (noise - batch.actions)[:, :, :7][~batch.is_pad]  # [real row, 7]
    assert kept.shape == (10 + 2, 7)
    torch.testing.assert_close(loss, ((kept - 0.5) ** 2).mean())


def test_a_stopped_smolvla_run_resumes_to_the_same_weights(smolvla_demos, tmp_path):
    """Stopped after 3 of 4 steps (as a time limit stops it) and resumed into other weights, the run ends where the
    uninterrupted one does: the flow's noise and times are the batch's, not the global RNG's."""
    from dcvla.smolvla.train import flow_loss

    config = TrainConfig(steps=4, batch_size=2, lr=1e-3, warmup=1, checkpoint_every=2)
    straight, _, data = smolvla_data(smolvla_demos)  # the samples are the same for every model here
    loss = lambda m, idx: flow_loss(m, data, idx)  # noqa: E731
    assert train(straight, loss, len(data), config, tmp_path / "straight", progress=False) == 4
    assert train(smolvla_data(smolvla_demos)[0], loss, len(data), config, tmp_path / "resumed", progress=False,
                 stop_after=3) == 3
    resumed = smolvla_data(smolvla_demos, seed=1)[0]  # other weights: the checkpoint must replace them
    assert train(resumed, loss, len(data), config, tmp_path / "resumed", progress=False) == 4
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


def test_smolvla_fits_a_batch_and_ships_lerobots_layout_that_loads_strictly(smolvla_demos, tmp_path):
    """A few steps on one batch lower the loss; the policy saves lerobot's files (bfloat16 weights, config.json, the
    normaliser steps' statistics) and its tokenizer, which `SmolVLAPolicy.from_pretrained` loads strictly with no
    preset given, to the same weights and statistics, and whose reuse modes run."""
    from dcvla.normalization import ACTION, STATE
    from dcvla.prefix_reuse import ReuseConfig
    from dcvla.smolvla import SmolVLAPolicy
    from dcvla.smolvla.train import flow_loss

    with pytest.raises(ValueError, match="'smolvla-tiny' is not a preset, or the model differs from it"):
        smolvla_data(smolvla_demos)[1].save_pretrained(tmp_path / "off-preset")  # its 1024 token rows are not tiny's
    model, policy, data = smolvla_data(smolvla_demos, "smolvla-micro")
    config = TrainConfig(steps=8, batch_size=4, lr=3e-3, warmup=1, checkpoint_every=8)
    train(model, lambda m, idx: flow_loss(m, data, np.arange(4)), len(data), config, tmp_path / "work", progress=False)
    losses = [float(r["loss"]) for r in csv.DictReader((tmp_path / "work" / LOSS_FILE).open())]
    assert losses[-1] < 0.7 * losses[0], losses
    policy.save_pretrained(tmp_path / "ckpt")
    assert {p.name for p in (tmp_path / "ckpt").iterdir()} >= {
        "model.safetensors", "config.json", "policy_preprocessor.json", "policy_postprocessor.json",
        "policy_preprocessor_step_0_normalizer_processor.safetensors",
        "policy_postprocessor_step_0_unnormalizer_processor.safetensors", "tokenizer.json"}
    loaded = SmolVLAPolicy.from_pretrained(tmp_path / "ckpt", config=ReuseConfig(mode="full", threshold=-1.0))
    assert loaded.model.config == model.config and loaded.model.dtype == torch.float32
    for (name, a), b in zip(model.state_dict().items(), loaded.model.state_dict().values()):
        assert torch.equal(a.to(torch.bfloat16).float(), b), name
    for feature in (STATE, ACTION):
        assert loaded.model.normalization.modes[feature] == "MEAN_STD"
        for stat, values in model.normalization.stats[feature].items():
            np.testing.assert_array_equal(loaded.model.normalization.stats[feature][stat], values)
    demo = smolvla_demos[0]
    for f in (0, 1):
        chunk = loaded.step(data.frames(f), demo.instruction, demo.states[f])
    assert chunk.shape == (10, 7) and loaded.last.gate and loaded.last.reuse_fraction > 0


def test_train_micro_script_trains_smolvla_micro_and_writes_lerobots_layout(tmp_path, capsys):
    """scripts/train_micro.py smolvla-micro end to end at two steps: the checkpoint the policy loads with no preset
    given, the loss curve; a rerun resumes at the end and trains nothing more."""
    import shutil

    from dcvla.libero.episodes import list_episodes
    from dcvla.smolvla import SmolVLAPolicy

    root = tmp_path / "demos"
    root.mkdir()
    shutil.copy(list_episodes(suite="libero_goal")[0], root)
    args = ["smolvla-micro", "--demos", str(root), "--out", str(tmp_path / "ckpt"), "--work", str(tmp_path / "work"),
            "--figure", str(tmp_path / "loss.png"), "--steps", "2", "--batch-size", "2", "--checkpoint-every", "1"]
    assert SCRIPT.main(args) == 0
    out = capsys.readouterr().out
    assert "demonstrations: libero_goal task 8: 1\n" in out and "smolvla-micro: 3.3 M parameters" in out
    policy = SmolVLAPolicy.from_pretrained(tmp_path / "ckpt")
    assert policy.model.config.name == "smolvla-micro" and (tmp_path / "loss.png").stat().st_size > 0
    assert SCRIPT.main(args) == 0
    assert len(list(csv.DictReader((tmp_path / "work" / LOSS_FILE).open()))) == 2
