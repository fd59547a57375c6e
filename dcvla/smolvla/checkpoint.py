"""SmolVLA checkpoints in lerobot's layout (`lerobot/smolvla_base` and its fine-tunes), loaded strictly, with the
normalisation each checkpoint declares (MEAN_STD for the state and the action, unless a fine-tune chose otherwise).

Keys are lerobot's (`SmolVLAPolicy.save_pretrained`): the policy's `model.` then `VLAFlowMatching`'s tree, which
`dcvla.smolvla.model.SmolVLAModel` mirrors. lerobot loads them with `strict=False`; dcvla names every missing,
unexpected or misshapen key, and accepts and ignores only these (`IGNORED`):
- `model.vlm_with_expert.vlm.lm_head.weight`: SmolVLM2's text head (untied in SmolVLM2-500M), which SmolVLA never
  decodes with (it reads the text layers' K/V only); 49280 x 960 weights not allocated.
A checkpoint holds only the kept text layers (`num_vlm_layers`; lerobot cuts the rest before saving): a text layer
beyond the preset's depth is unexpected, one missing is missing. The VLM's dims are not in lerobot's `config.json`
(lerobot fetches them from the hub by `vlm_model_name`): they come from the preset, `smolvla` for SmolVLM2-500M, or
the dcvla preset a model trained here names as `dcvla/<preset>` (`save_pretrained`, which writes that layout).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..devices import CheckpointError, place
from ..lerobot_checkpoint import CONFIG_FILE, load_model, read_lerobot_config, save_model
from ..normalization import ACTION, STATE, write_normalization
from .config import PRESETS, VLM_MODEL, SmolVLAConfig, get_preset, with_dims
from .model import SmolVLAModel

DCVLA_VLM = "dcvla/"  # `vlm_model_name` of a model trained here: dcvla/<its preset>
CAMERAS = ("observation.images.image", "observation.images.wrist_image")  # lerobot LIBERO's: agent view, wrist view
IGNORED = {
    "vlm_with_expert.vlm.lm_head.weight": "SmolVLM2's text head: SmolVLA never decodes text (it reads the text "
                                          "layers' K/V only)",
}


def model_key(key: str) -> str | None:
    """The model parameter a checkpoint key loads into, or None for a key accepted and ignored (`IGNORED`)."""
    key = key.removeprefix("model.")
    return None if key in IGNORED else key


def config_for(folder: Path, preset: str | SmolVLAConfig | None) -> SmolVLAConfig:
    """The model config of the checkpoint in `folder` (`config_from` its lerobot `config.json`)."""
    return config_from(read_lerobot_config(folder), preset, folder / CONFIG_FILE)


def config_from(lerobot: dict, preset: str | SmolVLAConfig | None, path: Path) -> SmolVLAConfig:
    """The model config: `preset` (a name or a config; default: the VLM `lerobot` names, `preset_of`) with, for a
    preset name, the checkpoint's own chunk size, state/action widths, Euler steps, prompt length, image size, kept
    text layers and expert geometry from lerobot's config (`lerobot`, read from `path`), whose options dcvla does not
    build are refused, naming them."""
    kind = lerobot.get("type")
    if kind is not None and kind != "smolvla":
        raise CheckpointError(f"{path} says type {kind!r}; this loader reads smolvla checkpoints")
    if isinstance(preset, SmolVLAConfig):
        return preset  # a config object is taken as given
    config = get_preset(preset or preset_of(path, lerobot))
    unsupported = {"attention_mode": "cross_attn", "add_image_special_tokens": False, "adapt_to_pi_aloha": False}
    wrong = [f"{k}={lerobot[k]!r} (dcvla builds {v!r})" for k, v in unsupported.items() if k in lerobot and lerobot[k] != v]
    if lerobot.get("num_expert_layers", -1) not in (-1, 0, lerobot.get("num_vlm_layers", config.text.depth)):
        wrong.append(f"num_expert_layers={lerobot['num_expert_layers']} (dcvla builds an expert as deep as the kept VLM)")
    if (lerobot.get("prefix_length") or -1) > 0:
        wrong.append(f"prefix_length={lerobot['prefix_length']} (dcvla never pads the prefix)")
    if wrong:
        raise CheckpointError(f"{path}: options dcvla does not build: {'; '.join(wrong)}")
    changes = {field: lerobot[key] for key, field in (
        ("chunk_size", "chunk_size"), ("max_state_dim", "max_state_dim"), ("max_action_dim", "max_action_dim"),
        ("num_steps", "num_steps"), ("tokenizer_max_length", "max_token_len"),
        ("expert_width_multiplier", "expert_width_multiplier"),
        ("self_attn_every_n_layers", "self_attn_every_n_layers")) if key in lerobot}
    if "num_vlm_layers" in lerobot:
        changes["text"] = with_dims(config.text, depth=int(lerobot["num_vlm_layers"]))
    if "resize_imgs_with_padding" in lerobot:
        size = lerobot["resize_imgs_with_padding"]
        if size[0] != size[1]:
            raise CheckpointError(f"{path}: resize_imgs_with_padding={size}; dcvla pads to a square")
        changes["vision"] = with_dims(config.vision, image_size=int(size[0]))
    for name in ("min_period", "max_period"):
        if name in lerobot:
            changes[name] = float(lerobot[name])
    return with_dims(config, **changes) if changes else config


def preset_of(path: Path, lerobot: dict) -> str:
    """The preset of the VLM lerobot's `config.json` names: `smolvla` for SmolVLM2-500M (also when it names none),
    the preset itself for a model trained here (`dcvla/<preset>`)."""
    name = lerobot.get("vlm_model_name", VLM_MODEL)
    if name == VLM_MODEL:
        return "smolvla"
    if name.startswith(DCVLA_VLM) and name.removeprefix(DCVLA_VLM) in PRESETS:
        return name.removeprefix(DCVLA_VLM)
    raise CheckpointError(f"{path} names the VLM {name!r}; dcvla knows {VLM_MODEL}'s dims and its own "
                          f"presets' ({DCVLA_VLM}<preset>) only: pass preset= a SmolVLAConfig of that VLM")


def load_pretrained(path_or_id: str | os.PathLike, preset: str | SmolVLAConfig | None = None,
                    dtype: torch.dtype | str = torch.float32, device: str | torch.device = "cpu",
                    attn_implementation: str = "sdpa") -> SmolVLAModel:
    """A SmolVLA checkpoint in lerobot's layout, checked against the model from the safetensors headers alone (before
    any weight is allocated), then built on the meta device and filled shard by shard in `dtype` on `device`.
    `model.normalization` holds the checkpoint's statistics."""
    return load_model(path_or_id, lambda folder: config_for(folder, preset),
                      lambda config: SmolVLAModel(config, attn_implementation), lambda key, _: model_key(key),
                      lambda config: config.name, dtype, device, _init_buffers)


def _init_buffers(model: SmolVLAModel) -> None:
    """The non-persistent buffers `to_empty` leaves uninitialised (none in SmolVLM's vision tower today; `place`
    keeps any rotary inverse frequencies in float32)."""
    place(model)


def lerobot_config(config: SmolVLAConfig, features: dict[str, dict], norm_map: dict[str, str]) -> dict:
    """lerobot's `config.json` of a model of `config`, with its input and output `features` and the normalisation
    mode per feature type (`norm_map`) before the architecture's fields (`lerobot_architecture`)."""
    return {"type": "smolvla", "n_obs_steps": 1,
            "input_features": {k: f for k, f in features.items() if f["type"] != "ACTION"},
            "output_features": {k: f for k, f in features.items() if f["type"] == "ACTION"},
            "normalization_mapping": norm_map, **lerobot_architecture(config)}


def lerobot_architecture(config: SmolVLAConfig) -> dict:
    """The fields of lerobot's `config.json` that `config_from` reads back into `config`, with lerobot's names: the VLM
    named by its preset (`dcvla/<preset>`: its dims are not in the file), trained whole (nothing frozen)."""
    return {
        "chunk_size": config.chunk_size, "n_action_steps": config.chunk_size,
        "max_state_dim": config.max_state_dim, "max_action_dim": config.max_action_dim,
        "resize_imgs_with_padding": [config.image_size, config.image_size], "empty_cameras": 0,
        "adapt_to_pi_aloha": False, "use_delta_joint_actions_aloha": False,
        "tokenizer_max_length": config.max_token_len, "num_steps": config.num_steps, "use_cache": True,
        "freeze_vision_encoder": False, "train_expert_only": False, "train_state_proj": True,
        "vlm_model_name": VLM_MODEL if config.name == "smolvla" else DCVLA_VLM + config.name,
        "load_vlm_weights": False, "add_image_special_tokens": False, "attention_mode": "cross_attn",
        "prefix_length": -1, "pad_language_to": "longest", "num_expert_layers": -1, "num_vlm_layers": config.text.depth,
        "self_attn_every_n_layers": config.self_attn_every_n_layers,
        "expert_width_multiplier": config.expert_width_multiplier, "min_period": config.min_period,
        "max_period": config.max_period,
    }


def save_pretrained(model: SmolVLAModel, directory: str | os.PathLike, dtype: torch.dtype | None = torch.bfloat16) -> Path:
    """`model` in lerobot's SmolVLA layout, loadable by `load_pretrained` (strict): `model.safetensors` (in `dtype`,
    bfloat16 as published), `config.json` (`lerobot_config`) and its normalisation as lerobot's processor files
    (`dcvla.normalization.write_normalization`): the state and the action as wide as their statistics, two cameras
    (agent view, wrist view) at the model's image size."""
    norm, directory = model.normalization, Path(directory)
    if norm is None or any(not norm.stats.get(feature) for feature in (STATE, ACTION)):
        raise ValueError("the model has no statistics of the state and the action to save (set model.normalization)")
    config = model.config
    if config.name not in PRESETS or config_from(lerobot_architecture(config), None, directory / CONFIG_FILE) != config:
        raise ValueError(f"{config.name!r} is not a preset, or the model differs from it beyond what lerobot's "
                         f"config.json holds (the VLM's dims): its checkpoint would not load as this model ({config})")
    width = {feature: len(next(iter(norm.stats[feature].values()))) for feature in (STATE, ACTION)}
    size = config.image_size
    features = {STATE: {"type": "STATE", "shape": [width[STATE]]},
                **{camera: {"type": "VISUAL", "shape": [3, size, size]} for camera in CAMERAS},
                ACTION: {"type": "ACTION", "shape": [width[ACTION]]}}
    norm_map = write_normalization(directory, norm, features)
    return save_model(directory, model, lerobot_config(config, features, norm_map), dtype)
