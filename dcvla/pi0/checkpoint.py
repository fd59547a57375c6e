"""pi0 / pi0.5 checkpoints in lerobot's layout (`lerobot/pi0_base`, `lerobot/pi05_base` and their LIBERO fine-tunes),
loaded strictly, with the normalisation each checkpoint declares.

A lerobot policy directory holds `model.safetensors` (or shards with an index), lerobot's `config.json` (`"type":
"pi0"` or `"pi05"`, chunk size, state/action widths, image resolution) and its processors: `policy_preprocessor.json`
names a `normalizer_processor` step whose statistics are in the safetensors file it names (`<feature>.<stat>`), with
the mode per feature type (`norm_map`: pi0 MEAN_STD, pi0.5 QUANTILES, or what a fine-tune chose).

Key names are the model's (`dcvla.pi0.model.PiModel` mirrors lerobot's module tree), read as lerobot's
`_fix_pytorch_state_dict_keys` and `from_pretrained` read them:
- a leading `model.` (checkpoints lerobot saves) is dropped; the published base checkpoints have none;
- the PaliGemma embedding, tied to its LM head, is stored as `paligemma_with_expert.paligemma.lm_head.weight`: it is
  the token table (`...language_model.embed_tokens.weight`); when both are stored, the table is the embedding's;
- pi0 reads `time_mlp_{in,out}` as `action_time_mlp_{in,out}`, pi0.5 the other way round;
- accepted and ignored, with their reasons (`IGNORED`): the expert's `lm_head` (pi0 never decodes text through it;
  openpi's converter saves it uninitialised) and, in pi0.5, a `state_proj` (pi0.5 has no state token; lerobot drops it).
Anything else missing, unexpected or misshapen is named in one error with the file. Only safetensors are read.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..devices import CheckpointError, place
from ..lerobot_checkpoint import CONFIG_FILE, load_model, read_lerobot_config
from .config import PiConfig, get_preset, with_dims
from .model import PiModel

EMBED = "paligemma_with_expert.paligemma.model.language_model.embed_tokens.weight"
TIED_HEAD = "paligemma_with_expert.paligemma.lm_head.weight"
IGNORED = {
    "paligemma_with_expert.gemma_expert.lm_head.weight":
        "the expert's token head: pi0 never decodes text with it (openpi's converter saves it uninitialised)",
}
IGNORED_PI05 = {"state_proj.": "pi0.5 has no state token (lerobot's loader drops it too)"}
_RENAMES = {"pi0": ("time_mlp_", "action_time_mlp_"), "pi05": ("action_time_mlp_", "time_mlp_")}


def model_key(key: str, config: PiConfig) -> str | None:
    """The model parameter a checkpoint key loads into, or None for a key accepted and ignored (`IGNORED`)."""
    key = key.removeprefix("model.")
    if key in IGNORED or (config.pi05 and any(key.startswith(p) for p in IGNORED_PI05)):
        return None
    if key == TIED_HEAD:
        return EMBED
    old, new = _RENAMES[config.variant]
    return new + key[len(old):] if key.startswith(old) else key


def config_for(folder: Path, preset: str | PiConfig | None) -> PiConfig:
    """The model config: `preset` (a name or a config) if given, else the published dims of the variant lerobot's
    `config.json` names (which must agree with the preset's); for a preset name, the checkpoint's own chunk size,
    state/action widths, image size, prompt length, Euler steps and relative actions override the preset's."""
    lerobot = read_lerobot_config(folder)
    variant = lerobot.get("type")
    if preset is None and variant not in ("pi0", "pi05"):
        raise CheckpointError(f"cannot tell which model {folder} holds: its {CONFIG_FILE} has type {variant!r} "
                              "(pi0 or pi05 expected); pass preset=")
    config = preset if isinstance(preset, PiConfig) else get_preset(preset or variant)
    if variant is not None and variant != config.variant:
        raise CheckpointError(f"{folder / CONFIG_FILE} says type {variant!r}, but preset {config.name!r} is {config.variant}")
    if isinstance(preset, PiConfig):
        return config  # a config object is taken as given
    changes = {field: lerobot[key] for key, field in (("chunk_size", "chunk_size"), ("max_state_dim", "max_state_dim"),
                                                      ("max_action_dim", "max_action_dim"),
                                                      ("num_inference_steps", "num_steps"),
                                                      ("tokenizer_max_length", "max_token_len")) if key in lerobot}
    if lerobot.get("use_relative_actions"):
        excluded, dims = lerobot.get("relative_exclude_joints") or [], _action_dims(lerobot)
        if excluded != ["gripper"] or dims is None:
            raise CheckpointError(f"{folder / CONFIG_FILE}: relative actions excluding {excluded} on an action of "
                                  f"{dims} dims; dcvla adds the state back to every dim but the last (the gripper)")
        changes["delta_action_dims"] = dims - 1
    if "image_resolution" in lerobot:
        changes["vision"] = with_dims(config.vision, image_size=int(lerobot["image_resolution"][0]))
    return with_dims(config, **changes) if changes else config


def _action_dims(lerobot: dict) -> int | None:
    shape = (lerobot.get("output_features") or {}).get("action", {}).get("shape")
    return int(shape[0]) if shape else None


def load_pretrained(path_or_id: str | os.PathLike, preset: str | PiConfig | None = None,
                    dtype: torch.dtype | str = torch.float32, device: str | torch.device = "cpu",
                    attn_implementation: str = "sdpa") -> PiModel:
    """A pi0 / pi0.5 checkpoint in lerobot's layout, checked against the model from the safetensors headers alone
    (before any weight is allocated), then built on the meta device and filled shard by shard in `dtype` on
    `device` (RoPE's inverse frequencies stay float32). `model.normalization` holds the checkpoint's statistics."""
    return load_model(path_or_id, lambda folder: config_for(folder, preset),
                      lambda config: PiModel(config, attn_implementation), model_key,
                      lambda config: f"{config.name} ({config.variant})", dtype, device, _init_buffers)


def _init_buffers(model: PiModel) -> None:
    """The non-persistent buffers `to_empty` leaves uninitialised: RoPE's inverse frequencies (float32, `place`),
    Gemma's embedding scale, SigLIP's position ids."""
    place(model)
    with torch.no_grad():
        embed = model.language_model.embed_tokens
        embed.embed_scale.fill_(embed.scalar_embed_scale)
        ids = model.paligemma_with_expert.paligemma.model.vision_tower.vision_model.embeddings.position_ids
        ids.copy_(torch.arange(ids.shape[-1], device=ids.device)[None])
