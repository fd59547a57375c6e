"""SmolVLA (`dcvla.smolvla`) beyond parity: the published sizes on the meta device, where its spans are, the state
token that nobody else in the prefix attends to, the strict loader on lerobot's layout, bfloat16 on CPU, recording."""

import copy
import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from dcvla.devices import CheckpointError, place
from dcvla.prefix_reuse import ReuseConfig
from dcvla.recording import recorder_for
from dcvla.smolvla import SmolVLAModel, SmolVLAPolicy, get_preset, load_pretrained
from dcvla.smolvla.config import with_dims

FIXTURE = Path(__file__).parent / "fixtures" / "smolvla_tiny"
TINY = with_dims(get_preset("smolvla-tiny"), vocab_size=320)  # the fixture's vocabulary


def count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_the_published_sizes_on_meta():
    """smolvla is lerobot/smolvla_base: SmolVLM2-500M's SigLIP-B/16 at 512 px (86.4M), the pixel-shuffle connector
    (12,288 -> 960), 16 of SmolLM2's 32 layers with the 49,280-token table (204.6M), the 720-wide expert with its
    2048 MLP and 320 -> 320 cross-attention K/V (98.2M): 402.7M, 450.1M with the text head dcvla leaves out."""
    with torch.device("meta"):
        model = SmolVLAModel(get_preset("smolvla"))
    assert (count(model.parts.vision_model), count(model.text_model), count(model.expert)) == (86_433_024, 204_626_880,
                                                                                               98_245_840)
    assert model.parts.connector.modality_projection.proj.weight.shape == (960, 12288)
    assert model.config.tokens_per_image == 64 and model.config.expert_mlp_dim == 2048
    expert = model.expert.layers
    assert expert[0].self_attn.q_proj.weight.shape == (960, 720) and expert[0].self_attn.k_proj.weight.shape == (320, 720)
    assert expert[1].self_attn.k_proj.weight.shape == (320, 320) and expert[1].self_attn.v_proj.weight.shape == (320, 320)
    assert count(model) == 402_737_376 and count(model) + 49280 * 960 == 450_046_176


def test_the_spans_and_the_prompt(smolvla, pi0_clip):
    """The image tokens first, then the prompt (the task and "\\n", no state bins), the state token last."""
    frames, states, instruction = pi0_clip
    smolvla.reset()
    smolvla.step(frames[0], instruction, states[0])
    spans, n = smolvla.last.spans, smolvla.store.num_slots
    n_vision = 2 * smolvla.model.config.tokens_per_image
    assert np.array_equal(spans["vision"], np.arange(n_vision)) and np.array_equal(spans["state"], [n - 1])
    assert np.array_equal(spans["text"], np.arange(n_vision, n - 1))
    ids, words, bins = smolvla.encode_prompt(instruction, smolvla.normalize_state(states[0]))
    assert len(bins) == 0 and len(words) == len(ids) == n - 1 - n_vision
    assert smolvla.tokenizer.decode(ids, skip_special_tokens=True).strip() == instruction.strip()
    assert smolvla.prompt("pick it up\n", np.zeros(8))[0] == "pick it up\n"  # one newline, as lerobot's step


def test_nobody_in_the_prefix_attends_to_the_state_token(smolvla, pi0_clip):
    """Two states: every image and prompt K/V is bit for bit the same, the state token's differ at every layer (so
    reusing the image and prompt K/V while the state moves is exact)."""
    frames, states, instruction = pi0_clip
    stores = []
    for state in (states[0], states[0] + np.array([0.2, -0.2, 0.1, 0, 0, 0, 0.01, -0.01])):
        smolvla.reset()
        smolvla.step(frames[0], instruction, state)
        stores.append(smolvla.store)
    rest = slice(0, stores[0].num_slots - 1)
    assert torch.equal(stores[0].keys[:, :, rest], stores[1].keys[:, :, rest])
    assert torch.equal(stores[0].values[:, :, rest], stores[1].values[:, :, rest])
    assert all((stores[0].keys[layer, :, -1] != stores[1].keys[layer, :, -1]).any() for layer in range(4))


def copy_fixture(tmp_path: Path) -> Path:
    return Path(shutil.copytree(FIXTURE, tmp_path / "smolvla_tiny"))


def test_a_misfit_names_missing_unexpected_and_misshapen_keys_and_the_file(tmp_path):
    folder = copy_fixture(tmp_path)
    state = load_file(folder / "model.safetensors")
    del state["model.state_proj.weight"]
    state["model.action_out_proj.weight"] = state["model.action_out_proj.weight"][:, :-1].contiguous()
    state["model.vlm_with_expert.vlm.model.text_model.layers.4.mlp.up_proj.weight"] = torch.zeros(2)  # a 5th layer
    save_file(state, folder / "model.safetensors")
    with pytest.raises(CheckpointError) as err:
        load_pretrained(folder, preset=TINY)
    message = str(err.value)
    assert str(folder / "model.safetensors") in message and "does not fit smolvla-tiny" in message
    assert "1 missing keys: state_proj.weight" in message
    assert "unexpected keys: model.vlm_with_expert.vlm.model.text_model.layers.4.mlp.up_proj.weight" in message
    assert "model.action_out_proj.weight: checkpoint [32, 47], model [32, 48]" in message


def test_the_text_head_is_the_only_key_ignored(tmp_path):
    folder = copy_fixture(tmp_path)
    state = load_file(folder / "model.safetensors")
    assert "model.vlm_with_expert.vlm.lm_head.weight" in state  # lerobot saves it; dcvla does not allocate it
    del state["model.vlm_with_expert.vlm.lm_head.weight"]
    save_file(state, folder / "model.safetensors")
    reference = load_pretrained(FIXTURE, preset=TINY)
    loaded = load_pretrained(folder, preset=TINY)
    assert all(torch.equal(a, b) for a, b in zip(reference.state_dict().values(), loaded.state_dict().values()))


@pytest.mark.parametrize("change, match", [
    ({"type": "pi0"}, "says type 'pi0'; this loader reads smolvla"),
    ({"attention_mode": "self_attn"}, r"attention_mode='self_attn' \(dcvla builds 'cross_attn'\)"),
    ({"num_expert_layers": 2}, "num_expert_layers=2"),
    ({"resize_imgs_with_padding": [64, 32]}, r"resize_imgs_with_padding=\[64, 32\]"),
    ({"num_vlm_layers": 3}, r"unexpected keys: .*text_model\.layers\.3\."),
])
def test_the_checkpoints_config_is_read_and_what_dcvla_does_not_build_is_named(tmp_path, change, match):
    folder = copy_fixture(tmp_path)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(CheckpointError, match=match):
        load_pretrained(folder, preset="smolvla-tiny")


def test_a_preset_name_takes_the_checkpoints_chunk_and_a_pickle_is_refused(tmp_path):
    folder = copy_fixture(tmp_path)
    config = json.loads((folder / "config.json").read_text())
    assert load_pretrained(folder, preset=TINY).config.chunk_size == config["chunk_size"] == 10
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pytorch_model.bin"):
        load_pretrained(folder, preset=TINY)


def test_bfloat16_on_cpu_follows_float32(smolvla, pi0_clip):
    """The lean path: the same weights in bfloat16 run the policy (reusing), the chunk close to float32's; the
    fixture's tokenizer-free vocabulary refuses the offline tokenizer's ids by name."""
    frames, states, instruction = pi0_clip
    chunks = []
    for dtype in (torch.float32, torch.bfloat16):
        model = place(copy.deepcopy(smolvla.model), "cpu", dtype)
        assert model.dtype == dtype and model.text_model.layers[0].self_attn.q_proj.weight.dtype == dtype
        pol = SmolVLAPolicy(model, smolvla.tokenizer, ReuseConfig(mode="full", threshold=-1), seed=0)
        chunks.append([pol.step(frames[k], instruction, states[k]) for k in range(2)])
        assert pol.last.gate
    for a, b in zip(*chunks):
        assert np.abs(a - b).max() < 0.1 * max(1.0, np.abs(a).max())
    small = SmolVLAPolicy(load_pretrained(FIXTURE, preset=TINY), smolvla.tokenizer)
    with pytest.raises(ValueError, match="past the model's vocabulary of 320: is it the checkpoint's tokenizer"):
        small.step(frames[0], instruction, states[0])


def test_recording_with_drift(smolvla, pi0_clip, record):
    """`recorder_for` finds the flow recorder; reusing every span drifts the actions and the image K/V."""
    frames, states, instruction = pi0_clip
    pol = smolvla.with_config(ReuseConfig(mode="full", threshold=-1.0))
    pol.reset()
    with recorder_for(pol, drift=True) as rec:
        for frame, state in zip(frames[:3], states[:3]):
            pol.step(frame, instruction, state)
    ds = rec.to_dataset()
    assert ds.attrs["family"] == "smolvla" and ds.attrs["variant"] == "smolvla"
    assert ds.span_reuse.values[1:].all() and (ds.action_drift.values[1:] > 0).all() and ds.action_drift.values[0] == 0
    assert (ds.k_drift.sel(span="vision").values[1:] > 0).all()


def test_a_config_object_is_taken_as_given(tmp_path):
    other = replace(TINY, num_steps=3)
    assert load_pretrained(FIXTURE, preset=other).config.num_steps == 3
