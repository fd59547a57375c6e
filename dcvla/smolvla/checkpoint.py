"""SmolVLA checkpoints in lerobot's layout (`lerobot/smolvla_base` and its fine-tunes), loaded strictly, with the
normalisation each checkpoint declares (MEAN_STD for the state and the action, unless a fine-tune chose otherwise).

Keys are lerobot's (`SmolVLAPolicy.save_pretrained`): the policy's `model.` then `VLAFlowMatching`'s tree, which
`dcvla.smolvla.model.SmolVLAModel` mirrors. lerobot loads them with `strict=False`; dcvla names every missing,
unexpected or misshapen key, and accepts and ignores only these (`IGNORED`):
- `model.vlm_with_expert.vlm.lm_head.weight`: SmolVLM2's text head (untied in SmolVLM2-500M), which SmolVLA never
  decodes with (it reads the text layers' K/V only); 49280 x 960 weights not allocated.
A checkpoint holds only the kept text layers (`num_vlm_layers`; lerobot cuts the rest before saving): a text layer
beyond the preset's depth is unexpected, one missing is missing. The VLM's dims are not in lerobot's `config.json`
(lerobot fetches them from the hub by `vlm_model_name`): they come from the preset, `smolvla` for SmolVLM2-500M.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..devices import CheckpointError, place
from ..lerobot_checkpoint import CONFIG_FILE, load_model, read_lerobot_config
from .config import VLM_MODEL, SmolVLAConfig, get_preset, with_dims
from .model import SmolVLAModel

IGNORED = {
    "vlm_with_expert.vlm.lm_head.weight": "SmolVLM2's text head: SmolVLA never decodes text (it reads the text "
                                          "layers' K/V only)",
}


def model_key(key: str) -> str | None:
    """The model parameter a checkpoint key loads into, or None for a key accepted and ignored (`IGNORED`)."""
    key = key.removeprefix("model.")
    return None if key in IGNORED else key


def config_for(folder: Path, preset: str | SmolVLAConfig | None) -> SmolVLAConfig:
    """The model config: `preset` (a name or a config; default `smolvla`, the published dims) with, for a preset name,
    the checkpoint's own chunk size, state/action widths, Euler steps, prompt length, image size, kept text layers and
    expert geometry from lerobot's `config.json`, whose options dcvla does not build are refused, naming them."""
    lerobot = read_lerobot_config(folder)
    kind = lerobot.get("type")
    if kind is not None and kind != "smolvla":
        raise CheckpointError(f"{folder / CONFIG_FILE} says type {kind!r}; this loader reads smolvla checkpoints")
    if isinstance(preset, SmolVLAConfig):
        return preset  # a config object is taken as given
    config = get_preset(preset or "smolvla")
    unsupported = {"attention_mode": "cross_attn", "add_image_special_tokens": False, "adapt_to_pi_aloha": False}
    wrong = [f"{k}={lerobot[k]!r} (dcvla builds {v!r})" for k, v in unsupported.items() if k in lerobot and lerobot[k] != v]
    if lerobot.get("num_expert_layers", -1) not in (-1, 0, lerobot.get("num_vlm_layers", config.text.depth)):
        wrong.append(f"num_expert_layers={lerobot['num_expert_layers']} (dcvla builds an expert as deep as the kept VLM)")
    if (lerobot.get("prefix_length") or -1) > 0:
        wrong.append(f"prefix_length={lerobot['prefix_length']} (dcvla never pads the prefix)")
    if wrong:
        raise CheckpointError(f"{folder / CONFIG_FILE}: options dcvla does not build: {'; '.join(wrong)}")
    if preset is None and lerobot.get("vlm_model_name", VLM_MODEL) != VLM_MODEL:
        raise CheckpointError(f"{folder / CONFIG_FILE} names the VLM {lerobot['vlm_model_name']!r}; dcvla knows "
                              f"{VLM_MODEL}'s dims only: pass preset= a SmolVLAConfig of that VLM")
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
            raise CheckpointError(f"{folder / CONFIG_FILE}: resize_imgs_with_padding={size}; dcvla pads to a square")
        changes["vision"] = with_dims(config.vision, image_size=int(size[0]))
    for name in ("min_period", "max_period"):
        if name in lerobot:
            changes[name] = float(lerobot[name])
    return with_dims(config, **changes) if changes else config


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
