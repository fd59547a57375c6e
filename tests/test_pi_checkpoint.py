"""The pi0 / pi0.5 loader (`dcvla.pi0.published.load_pretrained`) on lerobot's layout: the published variants of
the key names load to the same model, a misfit names every key at fault and the file, nothing but safetensors is
read, the dtype and device are the asked ones, and the checkpoint's own config sets the chunk."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from dcvla.devices import CheckpointError
from dcvla.pi0 import get_preset, load_pretrained, random_model
from dcvla.pi0.checkpoint import EMBED, TIED_HEAD

from dcvla.pi0.config import with_dims

FIXTURES = Path(__file__).parent / "fixtures"
TINY = {name: with_dims(get_preset(name), vocab_size=320) for name in ("pi0-tiny", "pi05-tiny")}  # the fixtures' vocabulary


def copy(name: str, tmp_path: Path) -> Path:
    return Path(shutil.copytree(FIXTURES / name, tmp_path / name))


def rewrite(folder: Path, edit) -> None:
    state = load_file(folder / "model.safetensors")
    save_file(edit(state), folder / "model.safetensors")


def same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("name, preset", [("pi0_tiny", TINY["pi0-tiny"]), ("pi05_tiny", TINY["pi05-tiny"])])
def test_lerobot_saved_variants_of_the_names_load_the_same_model(name, preset, tmp_path):
    reference = load_pretrained(FIXTURES / name, preset=preset)
    folder = copy(name, tmp_path)
    rename = ("action_time_mlp_", "time_mlp_") if preset.variant == "pi0" else ("time_mlp_", "action_time_mlp_")

    def lerobot_saved(state):  # a fine-tune saved by lerobot: `model.` prefix, both embedding keys, the other MLP name
        out = {"model." + k.replace(*rename) if k.startswith(rename[0]) else "model." + k: v for k, v in state.items()}
        out["model." + EMBED] = state[TIED_HEAD].clone()
        return out

    rewrite(folder, lerobot_saved)
    assert same_weights(load_pretrained(folder, preset=preset), reference)


def test_a_misfit_names_missing_unexpected_and_misshapen_keys_and_the_file(tmp_path):
    folder = copy("pi0_tiny", tmp_path)

    def damage(state):
        del state["state_proj.weight"]
        state["action_out_proj.weight"] = state["action_out_proj.weight"][:, :-1].contiguous()
        state["paligemma_with_expert.extra.weight"] = torch.zeros(2)
        return state

    rewrite(folder, damage)
    with pytest.raises(CheckpointError) as err:
        load_pretrained(folder, preset=TINY["pi0-tiny"])
    message = str(err.value)
    assert str(folder / "model.safetensors") in message
    assert "1 missing keys: state_proj.weight" in message
    assert "1 unexpected keys: paligemma_with_expert.extra.weight" in message
    assert "action_out_proj.weight: checkpoint [32, 47], model [32, 48]" in message


def test_a_pi0_checkpoint_is_not_a_pi05_one(tmp_path):
    with pytest.raises(CheckpointError, match="says type 'pi0', but preset 'pi05-tiny' is pi05"):
        load_pretrained(FIXTURES / "pi0_tiny", preset=TINY["pi05-tiny"])
    folder = copy("pi0_tiny", tmp_path)
    (folder / "config.json").write_text(json.dumps({"type": "pi05"}))
    with pytest.raises(CheckpointError, match="missing keys: .*input_layernorm.dense.bias.*unexpected keys: "
                                              ".*input_layernorm.weight.*action_time_mlp_in.weight \\(read as "
                                              "time_mlp_in.weight\\): checkpoint \\[48, 96\\], model \\[48, 48\\]"):
        load_pretrained(folder, preset=TINY["pi05-tiny"])


def test_only_safetensors_are_read_and_the_processor_files_are_not_weights(tmp_path):
    folder = copy("pi0_tiny", tmp_path)
    (folder / "model.safetensors").unlink()
    torch.save({"x": torch.zeros(1)}, folder / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="refusing to load .*pytorch_model.bin: pickle checkpoints can execute code"):
        load_pretrained(folder, preset=TINY["pi0-tiny"])
    (folder / "pytorch_model.bin").unlink()
    with pytest.raises(CheckpointError, match=f"no model.safetensors \\(nor model.safetensors.index.json\\) in {folder}"):
        load_pretrained(folder, preset=TINY["pi0-tiny"])  # the normalizer's safetensors are not taken for weights


def test_the_checkpoint_config_sets_the_chunk_and_the_variant(tmp_path):
    folder = copy("pi05_tiny", tmp_path)
    config = json.loads((folder / "config.json").read_text())
    assert config["type"] == "pi05" and config["chunk_size"] == 10
    model = load_pretrained(folder, preset=TINY["pi05-tiny"], dtype="bfloat16")
    assert model.config.pi05 and model.config.chunk_size == 10 and model.dtype == torch.bfloat16
    inv_freq = [b for n, b in model.named_buffers() if n.endswith("inv_freq")]
    assert inv_freq and all(b.dtype == torch.float32 for b in inv_freq)
    scale = model.language_model.embed_tokens.embed_scale
    assert float(scale) == pytest.approx(model.config.lm.width ** 0.5)
    with pytest.raises(CheckpointError, match="cannot tell which model .* has type 'act'"):
        (folder / "config.json").write_text(json.dumps({"type": "act"}))
        load_pretrained(folder)


def test_a_missing_statistics_file_is_named(tmp_path):
    folder = copy("pi0_tiny", tmp_path)
    stats = next(folder.glob("policy_preprocessor_step_*_normalizer_processor.safetensors"))
    stats.unlink()
    with pytest.raises(CheckpointError, match=f"statistics file '{stats.name}' is not in"):
        load_pretrained(folder, preset=TINY["pi0-tiny"])


def test_a_random_model_round_trips_through_the_published_layout(tmp_path):
    """What random presets build is what the loader reads: the key set of the published layout, less the ignored
    expert head."""
    model = random_model(TINY["pi05-tiny"], seed=4)
    state = {k: v for k, v in model.state_dict().items()}
    state[TIED_HEAD] = state.pop(EMBED)
    state["paligemma_with_expert.gemma_expert.lm_head.weight"] = torch.zeros(320, 48)
    folder = tmp_path / "ckpt"
    folder.mkdir()
    save_file(state, folder / "model.safetensors")
    assert same_weights(load_pretrained(folder, preset=TINY["pi05-tiny"]), model)


def test_relative_actions_and_the_checkpoints_own_sizes_come_from_its_config(tmp_path):
    """A fine-tune trained on actions relative to the state (lerobot `use_relative_actions`, the gripper excluded)
    gets the state added back to its other dims; its chunk and prompt length override the preset's."""
    from dcvla.pi0.checkpoint import config_for

    folder = copy("pi0_tiny", tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config.update(use_relative_actions=True, chunk_size=7, tokenizer_max_length=64)
    (folder / "config.json").write_text(json.dumps(config))
    got = config_for(folder, "pi0-tiny")
    assert (got.delta_action_dims, got.chunk_size, got.max_token_len) == (6, 7, 64)
    config["relative_exclude_joints"] = []
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"relative actions excluding \[\] on an action of 7 dims"):
        config_for(folder, "pi0-tiny")
