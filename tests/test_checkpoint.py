"""Loading and saving checkpoints in OpenVLA's key layout: round trips and strict, named errors."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from dcvla.openvla import checkpoint
from dcvla.openvla.checkpoint import CheckpointError, load_pretrained, read_state_dict, save_pretrained
from dcvla.openvla.config import get_preset
from dcvla.openvla.model import random_model

TINY = get_preset("tiny")
INPUT_IDS = torch.tensor([[1, 323, 324, 290]])


@pytest.fixture(scope="module")
def tiny():
    return random_model(TINY, seed=3)


@pytest.fixture
def fixture_copy(parity_dir, tmp_path):
    return shutil.copytree(parity_dir, tmp_path / "ckpt")


def _rewrite_shard(directory, edit):
    """Apply `edit(state_dict)` to the vision shard of a copied fixture and keep the index in sync."""
    shard = directory / "model-00001-of-00002.safetensors"
    state = load_file(str(shard))
    edit(state)
    save_file(state, str(shard))
    index = json.loads((directory / checkpoint.INDEX_FILE).read_text())
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if v != shard.name} | {k: shard.name for k in state}
    (directory / checkpoint.INDEX_FILE).write_text(json.dumps(index))


def test_round_trip_is_exact(tiny, tmp_path):
    save_pretrained(tiny, tmp_path, max_shard_bytes=1_000_000, dtype=None)
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1  # sharded
    loaded = load_pretrained(tmp_path)  # preset read back from dcvla_config.json
    for key, value in tiny.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key
    pixel_values = torch.randn(1, 6, 224, 224)
    a, b = tiny.reference_action(INPUT_IDS, pixel_values), loaded.reference_action(INPUT_IDS, pixel_values)
    assert torch.equal(a.token_ids, b.token_ids) and torch.equal(a.logits, b.logits)
    assert loaded.norm_stats == tiny.norm_stats


def test_saved_layout_is_openvla(tiny, tmp_path):
    save_pretrained(tiny, tmp_path)
    keys = set(read_state_dict(tmp_path))
    assert "vision_backbone.featurizer.blocks.0.attn.qkv.weight" in keys
    assert "vision_backbone.featurizer.blocks.0.ls1.scale_factor" in keys
    assert "vision_backbone.fused_featurizer.blocks.0.attn.proj.weight" in keys
    assert "language_model.lm_head.weight" in keys
    assert not any("q_proj" in k and "vision" in k for k in keys)
    assert read_state_dict(tmp_path)["projector.fc1.weight"].dtype == torch.bfloat16  # as published


def test_fixture_ignores_only_the_known_unused_keys(parity_dir):
    state = read_state_dict(parity_dir)
    model = random_model(TINY)
    unused = checkpoint.load_openvla_state_dict(model, state)
    assert sorted({k.split(".")[1] for k in unused}) == ["featurizer", "fused_featurizer"]
    assert all(".blocks.3." in k or ".norm." in k or ".attn_pool." in k for k in unused), unused


def test_missing_key_is_named(fixture_copy):
    _rewrite_shard(fixture_copy, lambda sd: sd.pop("vision_backbone.featurizer.blocks.1.attn.qkv.weight"))
    with pytest.raises(CheckpointError, match=r"missing keys: .*featurizer\.blocks\.1\.attention\.q_proj\.weight"):
        load_pretrained(fixture_copy, preset="tiny")


def test_unexpected_key_is_named(fixture_copy):
    _rewrite_shard(fixture_copy, lambda sd: sd.__setitem__("projector.fc4.weight", torch.zeros(2, 2)))
    with pytest.raises(CheckpointError, match=r"unexpected keys: projector\.fc4\.weight"):
        load_pretrained(fixture_copy, preset="tiny")


def test_misshapen_key_is_named(fixture_copy):
    _rewrite_shard(fixture_copy, lambda sd: sd.__setitem__("projector.fc2.bias", torch.zeros(31)))
    with pytest.raises(CheckpointError, match=r"projector\.fc2\.bias: checkpoint \(31,\), model expects \(32,\)"):
        load_pretrained(fixture_copy, preset="tiny")


def test_wrong_preset_reports_shape_mismatches(parity_dir):
    with pytest.raises(CheckpointError, match="does not fit preset 'small'.*shape mismatches"):
        load_pretrained(parity_dir, preset="small")


def test_preset_must_be_known(parity_dir):
    with pytest.raises(CheckpointError, match="cannot tell which preset"):
        load_pretrained(parity_dir)
    with pytest.raises(ValueError, match="unknown preset 'huge'; known presets: openvla-7b, openvla-micro, small, tiny"):
        load_pretrained(parity_dir, preset="huge")


@pytest.mark.parametrize("name", ["pytorch_model.bin", "model.pt"])
def test_pickle_checkpoints_are_refused(tmp_path, name):
    torch.save({"w": torch.zeros(1)}, tmp_path / name)
    with pytest.raises(CheckpointError, match="refusing to load .*pickle"):
        load_pretrained(tmp_path, preset="tiny")
    with pytest.raises(CheckpointError, match="refusing to load"):
        checkpoint.checkpoint_files(tmp_path / name)


def test_index_naming_a_missing_shard(fixture_copy):
    (fixture_copy / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="lists shards that are not in .*model-00002-of-00002"):
        load_pretrained(fixture_copy, preset="tiny")


def test_hub_id_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="openvla/openvla-7b is not a local directory and hub access is off"):
        load_pretrained("openvla/openvla-7b")


def test_hub_id_online_downloads_safetensors_only(monkeypatch, parity_dir):
    calls = {}

    def fake_snapshot_download(repo_id, allow_patterns):
        calls.update(repo_id=repo_id, allow_patterns=allow_patterns)
        return str(parity_dir)

    import huggingface_hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    model = load_pretrained("someone/tiny-openvla", preset="tiny")
    assert calls["repo_id"] == "someone/tiny-openvla"
    assert not any(p.endswith((".bin", ".pt")) for p in calls["allow_patterns"])
    assert "libero_spatial_no_noops" in model.norm_stats


def test_hub_failure_names_the_id(monkeypatch):
    import huggingface_hub

    def broken(repo_id, allow_patterns):
        raise ConnectionError("no route to host")

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", broken)
    with pytest.raises(FileNotFoundError, match="could not fetch nobody/nothing from the hub: ConnectionError"):
        load_pretrained("nobody/nothing", preset="tiny")


# ------------------------------------------------------------------------------- broken files, streaming load
@pytest.mark.parametrize("content, problem", [
    ('{"weight_map": {"a": ', "is not valid JSON"),
    ('{"metadata": {}}', "has no 'weight_map'"),
    ('{"weight_map": {}}', "has no 'weight_map'"),
    ('[1, 2]', "has no 'weight_map'"),
])
def test_broken_index_is_named(fixture_copy, content, problem):
    (fixture_copy / checkpoint.INDEX_FILE).write_text(content)
    with pytest.raises(CheckpointError, match=rf"model\.safetensors\.index\.json {problem}"):
        load_pretrained(fixture_copy, preset="tiny")


@pytest.mark.parametrize("cut", [lambda data: data[: len(data) - 100], lambda data: data[:6], lambda data: b"\x00" * 64])
def test_truncated_or_corrupt_shard_is_named(fixture_copy, cut):
    shard = fixture_copy / "model-00002-of-00002.safetensors"
    shard.write_bytes(cut(shard.read_bytes()))
    with pytest.raises(CheckpointError, match=r"model-00002-of-00002\.safetensors is not a readable safetensors file "
                                              r"\(truncated or corrupt\)"):
        load_pretrained(fixture_copy, preset="tiny")
    with pytest.raises(CheckpointError, match="model-00002-of-00002.safetensors is not a readable"):
        read_state_dict(fixture_copy)


def test_a_key_in_two_shards_is_named(fixture_copy):
    _rewrite_shard(fixture_copy, lambda sd: sd.__setitem__("language_model.model.norm.weight", torch.zeros(32)))
    with pytest.raises(CheckpointError, match=r"key language_model\.model\.norm\.weight appears in two shards "
                                              r"\(model-00001-of-00002\.safetensors and model-00002-of-00002"):
        load_pretrained(fixture_copy, preset="tiny")


def test_misfit_is_found_from_the_headers_alone(fixture_copy, monkeypatch):
    """The strict check reads no tensor data: a misfit fails before any weight is read or allocated."""
    _rewrite_shard(fixture_copy, lambda sd: sd.__setitem__("projector.fc2.bias", torch.zeros(31)))

    def no_data(*args):
        raise AssertionError("tensor data read before the key/shape check")

    monkeypatch.setattr("dcvla.devices.read_tensor", no_data)
    with pytest.raises(CheckpointError, match=r"projector\.fc2\.bias: checkpoint \(31,\)"):
        load_pretrained(fixture_copy, preset="tiny")


def test_streaming_load_matches_the_state_dict_path(parity_dir, monkeypatch):
    """load_pretrained streams tensor by tensor (never the whole state dict) into a model allocated in the target
    dtype; it gives what copying `read_state_dict` into a float32 model and casting gives, exactly."""
    reference = random_model(TINY)
    checkpoint.load_openvla_state_dict(reference, read_state_dict(parity_dir))
    monkeypatch.setattr(checkpoint, "read_state_dict", lambda path: pytest.fail("load_pretrained read a whole state dict"))
    for dtype in (torch.float32, torch.bfloat16, "bfloat16"):
        loaded = load_pretrained(parity_dir, preset="tiny", dtype=dtype)
        state = loaded.state_dict()
        for key, value in reference.state_dict().items():
            assert state[key].dtype == checkpoint.parse_dtype(dtype) and state[key].device.type == "cpu", key
            assert torch.equal(state[key], value.to(state[key].dtype)), key
    with pytest.raises(ValueError, match="dtype: 'fp8' is not a model dtype"):
        load_pretrained(parity_dir, preset="tiny", dtype="fp8")


def test_single_key_mapping():
    """The per-tensor form of the mapping: the fused qkv goes to three targets, unused parts to none."""
    dino = "vision_backbone.featurizer."
    assert checkpoint.map_openvla_key(dino + "blocks.0.attn.qkv.weight", TINY) == [
        (dino + f"blocks.0.attention.{p}_proj.weight", p) for p in "qkv"]
    assert checkpoint.map_openvla_key(dino + f"blocks.{TINY.dino.depth - 1}.mlp.fc1.weight", TINY) is None
    assert checkpoint.map_openvla_key(dino + "pos_embed", TINY) == [(dino + "embeddings.position_embeddings", "cls_slot")]
    pos = torch.randn(1, 256, 32)
    assert torch.equal(checkpoint.convert(pos, "cls_slot")[:, 1:], pos) and not checkpoint.convert(pos, "cls_slot")[:, 0].any()
    assert checkpoint.map_openvla_key("projector.fc1.weight", TINY) == [("projector.fc1.weight", "")]


def test_misshapen_fused_qkv_is_named_once_in_checkpoint_terms(fixture_copy):
    key = "vision_backbone.featurizer.blocks.0.attn.qkv.weight"
    _rewrite_shard(fixture_copy, lambda sd: sd.__setitem__(key, torch.zeros(95, 32)))
    with pytest.raises(CheckpointError, match=r"1 shape mismatches: vision_backbone\.featurizer\.blocks\.0\.attn\.qkv"
                                              r"\.weight: checkpoint \(95, 32\), model expects \(96, 32\)$"):
        load_pretrained(fixture_copy, preset="tiny")
