"""OpenVLA-OFT: presets, the sequence it runs, bf16 on CPU, input errors, and the strict loader's every error."""

import json
import os
import shutil
from dataclasses import replace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from dcvla.devices import CheckpointError, place
from dcvla.openvla.config import get_preset as openvla_preset
from dcvla.openvla.model import OpenVLA
from dcvla.openvla.oft import (OFTConfig, OFTProcessor, OpenVLAOFT, get_preset, load_pretrained, load_processor,
                               normalize_proprio, random_model, save_pretrained)
from dcvla.openvla.oft.model import identity_stats
from dcvla.tokenizer import load_tokenizer

TINY = get_preset("oft-tiny")
RNG = np.random.default_rng(3)
IMAGES = [RNG.integers(0, 256, (224, 224, 3), dtype=np.uint8) for _ in range(2)]
STATE = RNG.uniform(-1.0, 1.0, 8)
MODEL = random_model(TINY, seed=0)
PROCESSOR = OFTProcessor(load_tokenizer(), TINY)


def test_presets_add_the_oft_modules_to_the_openvla_presets():
    for oft, base in (("openvla-oft-7b", "openvla-7b"), ("oft-small", "small"), ("oft-tiny", "tiny"),
                      ("oft-micro", "openvla-micro")):
        cfg, vla = get_preset(oft), openvla_preset(base)
        patch = 28 if oft == "oft-micro" else 14  # oft-micro: openvla-micro's towers in 28 px patches (an 8 x 8 grid)
        assert (cfg.dino, cfg.siglip) == (replace(vla.dino, patch_size=patch), replace(vla.siglip, patch_size=patch))
        assert (cfg.llm, cfg.projector_dims) == (vla.llm, vla.projector_dims)
        assert (cfg.num_images, cfg.num_vision_tokens, cfg.proprio_dim, cfg.chunk_size, cfg.num_action_slots) == \
            (2, 2 * (224 // patch) ** 2, 8, 8, 56)
        assert cfg.head_dims == (7 * vla.llm.hidden_size, vla.llm.hidden_size, 7)
    with pytest.raises(ValueError, match="unknown OpenVLA-OFT preset 'tiny'; known presets: oft-micro, oft-small, oft-tiny, openvla-oft-7b"):
        get_preset("tiny")
    with pytest.raises(ValueError, match="OFTConfig.chunk_size=0 must be >= 1"):
        replace(TINY, chunk_size=0)


def test_openvla_oft_7b_on_meta_has_the_published_heads():
    """OpenVLA's 7,498,158,752 (see test_model) + the L1 head (MLPResNet 28672 -> 4096 -> 7, two 4096 blocks)
    151,117,831 + the proprio projector (8 -> 4096 -> 4096) 16,818,176."""
    with torch.device("meta"):
        model = OpenVLAOFT(get_preset("openvla-oft-7b"))

    def count(module):
        return sum(p.numel() for p in module.parameters())

    head = model.action_head.model
    assert head.layer_norm1.weight.shape == (28672,) and head.fc1.weight.shape == (4096, 28672)
    assert len(head.mlp_resnet_blocks) == 2 and head.fc2.weight.shape == (7, 4096)
    assert model.proprio_projector.fc1.weight.shape == (4096, 8) and model.proprio_projector.fc2.weight.shape == (4096, 4096)
    assert (count(model.action_head), count(model.proprio_projector)) == (151_117_831, 16_818_176)
    assert count(model) == 7_498_158_752 + 151_117_831 + 16_818_176


@torch.no_grad()
def test_the_sequence_is_bos_patches_proprio_prompt_zero_slots_stop():
    input_ids, pixel_values = PROCESSOR(IMAGES, "put the bowl on the plate")
    patches = MODEL.embed_images(pixel_values)
    proprio = MODEL.embed_proprio(torch.tensor(STATE))
    embeds = MODEL.sequence_embeddings(input_ids, patches, proprio)
    n = input_ids.shape[1]
    assert embeds.shape == (1, 1 + 512 + 1 + (n - 1) + 56 + 1, TINY.llm.hidden_size)
    table = MODEL.language_model.get_input_embeddings().weight
    assert torch.equal(embeds[0, 0], table[1]) and torch.equal(embeds[0, 1:513], patches[0])
    assert torch.equal(embeds[0, 513], proprio[0, 0]) and torch.equal(embeds[0, 514 : 513 + n], table[input_ids[0, 1:]])
    assert not embeds[0, 513 + n : 513 + n + 56].any() and torch.equal(embeds[0, -1], table[2])
    window = MODEL.action_slice(n)
    assert (window.start, window.stop) == (513 + n - 1, 513 + n + 55)  # the last prompt token, then slots 0..54


def test_predict_returns_the_unnormalised_chunk():
    proprio_stats = {"q01": [-0.5] * 8, "q99": [0.5] * 8}
    MODEL.norm_stats = {"libero_spatial_no_noops": {
        "action": {"q01": [-2.0] * 7, "q99": [2.0] * 7, "mask": [True] * 6 + [False]}, "proprio": proprio_stats}}
    try:
        chunk = MODEL.predict(IMAGES, STATE, "put the bowl on the plate", processor=PROCESSOR, unnorm_key="libero_spatial")
        input_ids, pixel_values = PROCESSOR(IMAGES, "put the bowl on the plate")
        proprio = torch.tensor(normalize_proprio(STATE, proprio_stats))
        normalized = MODEL.reference_forward(input_ids, pixel_values, proprio).normalized.numpy()
    finally:
        MODEL.norm_stats = identity_stats(TINY)
    np.testing.assert_allclose(proprio.numpy(), np.clip(2 * STATE, -1, 1), atol=1e-7)
    assert chunk.shape == (8, 7) and chunk.dtype == np.float64
    np.testing.assert_allclose(chunk[:, :6], 2 * normalized[:, :6], rtol=1e-6, atol=1e-6)  # 0.5 (a + 1) 4 - 2
    np.testing.assert_array_equal(chunk[:, 6], normalized[:, 6])  # the gripper passes through


def test_bf16_on_cpu_keeps_rope_in_float32_and_stays_close():
    model = random_model(TINY, seed=0)
    input_ids, pixel_values = PROCESSOR(IMAGES, "put the bowl on the plate")
    reference = model.reference_forward(input_ids, pixel_values, torch.tensor(STATE))
    place(model, dtype="bfloat16")
    out = model.reference_forward(input_ids, pixel_values, torch.tensor(STATE))
    assert model.language_model.model.rotary_emb.inv_freq.dtype == torch.float32
    assert out.action_hidden.dtype == torch.bfloat16 and out.normalized.dtype == torch.float32
    assert (out.normalized - reference.normalized).abs().max() < 0.1


def test_bad_inputs_say_what_is_wrong():
    with pytest.raises(ValueError, match=r"takes 2 images per step \(third-person, wrist\); got 1"):
        MODEL.predict(IMAGES[:1], STATE, "pick it up", processor=PROCESSOR)
    with pytest.raises(TypeError, match="images must be a list of 2 images"):
        MODEL.predict(IMAGES[0], STATE, "pick it up", processor=PROCESSOR)
    with pytest.raises(ValueError, match=r"image 1 \(wrist\): image must have 3 channels"):
        MODEL.predict([IMAGES[0], IMAGES[1].transpose(2, 0, 1)], STATE, "pick it up", processor=PROCESSOR)
    with pytest.raises(ValueError, match=r"state must be 8 numbers .* got shape \(7,\)"):
        MODEL.predict(IMAGES, STATE[:7], "pick it up", processor=PROCESSOR)
    with pytest.raises(ValueError, match="state has NaN"):
        MODEL.predict(IMAGES, np.full(8, np.nan), "pick it up", processor=PROCESSOR)
    with pytest.raises(KeyError, match="unnorm_key 'bridge_orig' not found; available: random"):
        MODEL.predict(IMAGES, STATE, "pick it up", processor=PROCESSOR, unnorm_key="bridge_orig")
    with pytest.raises(ValueError, match=r"pixel_values must be \[1, 12, H, W\]"):
        MODEL.reference_forward(torch.ones(1, 4, dtype=torch.long), torch.zeros(1, 6, 224, 224), torch.zeros(8))
    with pytest.raises(ValueError, match=r"1 BOS \+ 512 vision \+ 1 proprio \+ \d+ prompt \+ 56 action slot \+ 1 stop"):
        PROCESSOR.encode_prompt("pick up the bowl " * 600)


# ------------------------------------------------------------------------------------------------- the loader
@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """The tiny random model in the published layout, float32 (so loading it back is exact)."""
    model = random_model(TINY, seed=1)
    return save_pretrained(model, tmp_path_factory.mktemp("oft") / "ckpt", step=150000, dtype=None), model


def checkpoint_copy(saved, tmp_path):
    """The saved checkpoint as links; a test replaces the file it breaks."""
    directory = tmp_path / "ckpt"
    shutil.copytree(saved[0], directory, copy_function=os.symlink)
    return directory


def replace_file(path, write):
    path.unlink()
    write(path)


def test_save_and_load_round_trip_exactly(saved):
    directory, model = saved
    assert sorted(p.name for p in directory.glob("*.pt")) == ["action_head--150000_checkpoint.pt",
                                                               "proprio_projector--150000_checkpoint.pt"]
    assert all(k.startswith("module.") for k in torch.load(directory / "action_head--150000_checkpoint.pt", weights_only=True))
    loaded = load_pretrained(directory)  # the preset comes from dcvla_config.json
    assert loaded.config == TINY and loaded.norm_stats == model.norm_stats
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    assert isinstance(load_processor(directory, loaded.config), OFTProcessor)
    bf16 = load_pretrained(directory, dtype="bfloat16")
    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16}


@pytest.mark.parametrize("name", ["action_head", "proprio_projector"])
def test_a_missing_or_doubled_head_file_is_named(saved, tmp_path, name):
    directory = checkpoint_copy(saved, tmp_path)
    path = directory / f"{name}--150000_checkpoint.pt"
    os.symlink(os.readlink(path), directory / f"{name}--latest_checkpoint.pt")
    with pytest.raises(CheckpointError, match=rf"exactly one {name}--<step>_checkpoint.pt in .*found 2: {name}--150000"):
        load_pretrained(directory)
    path.unlink()
    (directory / f"{name}--latest_checkpoint.pt").unlink()
    with pytest.raises(CheckpointError, match=rf"exactly one {name}--<step>_checkpoint.pt in .*found 0"):
        load_pretrained(directory)


def test_head_files_that_need_the_full_unpickler_or_are_broken_are_refused(saved, tmp_path):
    directory = checkpoint_copy(saved, tmp_path)
    path = directory / "proprio_projector--150000_checkpoint.pt"
    replace_file(path, lambda p: torch.save(torch.nn.Linear(8, 32), p))  # a whole module: needs the unpickler
    with pytest.raises(CheckpointError, match=r"refusing to load .*proprio_projector--150000_checkpoint.pt: it is not a "
                                              r"plain state dict .*full unpickler"):
        load_pretrained(directory)
    replace_file(path, lambda p: p.write_bytes(b"PK\x03\x04 truncated"))
    with pytest.raises(CheckpointError, match=r"proprio_projector--150000_checkpoint.pt is not a readable torch checkpoint"):
        load_pretrained(directory)
    replace_file(path, lambda p: torch.save([torch.zeros(2)], p))
    with pytest.raises(CheckpointError, match=r"proprio_projector--150000_checkpoint.pt holds a list, not a state dict"):
        load_pretrained(directory)


def test_head_keys_missing_unexpected_or_misshapen_are_named_with_the_file(saved, tmp_path):
    directory = checkpoint_copy(saved, tmp_path)
    path = directory / "action_head--150000_checkpoint.pt"
    state = torch.load(path, weights_only=True)
    broken = {k: v for k, v in state.items() if k != "module.model.fc2.bias"}
    broken["module.model.extra.weight"] = torch.zeros(3)
    broken["module.model.fc1.weight"] = torch.zeros(5, 5)
    replace_file(path, lambda p: torch.save(broken, p))
    with pytest.raises(CheckpointError, match=r"action_head--150000_checkpoint.pt does not fit preset 'oft-tiny': "
                                              r"1 missing keys: model.fc2.bias \| 1 unexpected keys: model.extra.weight \| "
                                              r"1 shape mismatches: model.fc1.weight: checkpoint \(5, 5\), model expects \(32, 224\)"):
        load_pretrained(directory)
    replace_file(path, lambda p: torch.save({k.removeprefix("module."): v for k, v in state.items()}, p))
    assert torch.equal(load_pretrained(directory).action_head.model.fc2.bias, saved[1].action_head.model.fc2.bias)


def test_backbone_keys_are_checked_as_for_openvla(saved, tmp_path):
    directory = checkpoint_copy(saved, tmp_path)
    shard = next(p for p in sorted(directory.glob("model-*.safetensors")) if "language_model.model.norm.weight" in load_file(str(p)))
    tensors = load_file(str(shard))
    tensors.pop("language_model.model.norm.weight")
    replace_file(shard, lambda p: save_file(tensors, str(p)))
    with pytest.raises(CheckpointError, match=r"does not fit preset 'oft-tiny': 1 missing keys: language_model.model.norm.weight"):
        load_pretrained(directory)


def test_statistics_need_action_and_proprio_of_the_model_dims(saved, tmp_path):
    directory = checkpoint_copy(saved, tmp_path)
    stats_file = directory / "dataset_statistics.json"
    good = json.loads(stats_file.read_text())
    stats_file.unlink()
    with pytest.raises(CheckpointError, match="has no dataset_statistics.json"):
        load_pretrained(directory)
    no_proprio = {"libero_10_no_noops": {"action": good["random"]["action"]}}
    short_proprio = {"random": good["random"] | {"proprio": {"q01": [-1.0] * 7, "q99": [1.0] * 8}}}
    for broken, key in ((no_proprio, "libero_10_no_noops"), (short_proprio, "random")):
        stats_file.write_text(json.dumps(broken))
        with pytest.raises(CheckpointError, match=rf"dataset_statistics.json: entry '{key}' needs 'proprio' statistics "
                                                  r"with q01 and q99 of 8 values"):
            load_pretrained(directory)


def test_a_file_is_not_an_oft_checkpoint(saved):
    with pytest.raises(CheckpointError, match="is not a directory; an OpenVLA-OFT checkpoint is the backbone's shards plus"):
        load_pretrained(next(saved[0].glob("model-*.safetensors")))


def test_openvla_models_are_unchanged_by_the_shared_base():
    assert not any(name.startswith(("action_head", "proprio_projector")) for name in OpenVLA(openvla_preset("tiny")).state_dict())
    assert isinstance(TINY, OFTConfig) and TINY.name == "oft-tiny"


def test_a_published_config_json_is_read_as_openvla_oft_7b():
    """The fixture was saved by upstream's `save_pretrained` (config.json: dinosiglip-vit-so-224px), so without a preset
    the loader picks openvla-oft-7b, which its tiny shards do not fit."""
    from pathlib import Path

    with pytest.raises(CheckpointError, match="checkpoint does not fit preset 'openvla-oft-7b'"):
        load_pretrained(Path(__file__).parent / "fixtures" / "oft_tiny")
