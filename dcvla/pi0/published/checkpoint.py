"""pi0 / pi0.5 checkpoints in lerobot's layout (`lerobot/pi0_base`, `lerobot/pi05_base` and their LIBERO fine-tunes),
loaded strictly, with the normalisation each checkpoint declares.

A lerobot policy directory holds `model.safetensors` (or shards with an index), lerobot's `config.json` (`"type":
"pi0"` or `"pi05"`, chunk size, state/action widths, image resolution) and its processors: `policy_preprocessor.json`
names a `normalizer_processor` step whose statistics are in the safetensors file it names (`<feature>.<stat>`), with
the mode per feature type (`norm_map`: pi0 MEAN_STD, pi0.5 QUANTILES, or what a fine-tune chose).

Key names are the model's (`dcvla.pi0.published.model.PiModel` mirrors lerobot's module tree), read as lerobot's
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

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ...devices import (INDEX_FILE, PICKLE_SUFFIXES, CheckpointError, checkpoint_files, misfit_message, parse_dtype, place,
                        read_headers, refuse_pickle, resolve_checkpoint_dir, stream_tensors)
from .config import PiConfig, get_preset, with_dims
from .model import PiModel

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
PREPROCESSOR_FILE = "policy_preprocessor.json"
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


def weights_files(folder: Path) -> list[Path]:
    """The model's safetensors: the index's shards, else `model.safetensors` (a lerobot directory holds its
    processors' statistics in other safetensors files, so a bare glob would be wrong)."""
    if (folder / INDEX_FILE).exists():
        return checkpoint_files(folder)  # the index's shards, checked
    if (folder / WEIGHTS_FILE).exists():
        return [folder / WEIGHTS_FILE]
    pickles = sorted(p for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        refuse_pickle(pickles[0])
    raise CheckpointError(f"no {WEIGHTS_FILE} (nor {INDEX_FILE}) in {folder}")


def plan(model: PiModel, headers: dict) -> dict[str, str]:
    """checkpoint key -> model key for every stored tensor that loads; a CheckpointError naming every missing,
    unexpected and misshapen key (and the files) unless the checkpoint fits exactly."""
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    stored = {key: entry.shape for entries in headers.values() for key, entry in entries.items()}
    routes, unexpected, misshapen, misfit_targets = {}, [], [], set()
    for key, shape in stored.items():
        target = model_key(key, model.config)
        if target is None:
            continue
        if target not in expected:
            unexpected.append(key)
        elif shape != expected[target]:
            named = key if target == key.removeprefix("model.") else f"{key} (read as {target})"
            misshapen.append(f"{named}: checkpoint {list(shape)}, model {list(expected[target])}")
            misfit_targets.add(target)
        elif target == EMBED and key == TIED_HEAD and any(model_key(k, model.config) == EMBED and k != key for k in stored):
            continue  # both stored: the embedding's own key loads it
        else:
            routes[key] = target
    missing = sorted(set(expected) - set(routes.values()) - misfit_targets)
    problem = misfit_message(missing, sorted(unexpected), misshapen)
    if problem:
        files = ", ".join(str(f) for f in headers)
        raise CheckpointError(f"{files} does not fit {model.config.name} ({model.config.variant}): {problem}")
    return routes


def read_lerobot_config(folder: Path) -> dict:
    path = folder / CONFIG_FILE
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path} is not valid JSON ({err})") from err


def config_for(folder: Path, preset: str | PiConfig | None) -> PiConfig:
    """The model config: `preset` (a name or a config) if given, else the published dims of the variant lerobot's
    `config.json` names; the checkpoint's own chunk size, state/action widths, image size, prompt length and Euler
    steps override the preset's."""
    lerobot = read_lerobot_config(folder)
    if isinstance(preset, PiConfig):
        return preset
    variant = lerobot.get("type")
    if preset is None:
        if variant not in ("pi0", "pi05"):
            raise CheckpointError(f"cannot tell which model {folder} holds: its {CONFIG_FILE} has type {variant!r} "
                                  "(pi0 or pi05 expected); pass preset=")
        preset = variant
    config = get_preset(preset)
    if variant is not None and variant != config.variant:
        raise CheckpointError(f"{folder / CONFIG_FILE} says type {variant!r}, but preset {config.name!r} is {config.variant}")
    changes = {field: lerobot[key] for key, field in (("chunk_size", "chunk_size"), ("max_state_dim", "max_state_dim"),
                                                      ("max_action_dim", "max_action_dim"),
                                                      ("num_inference_steps", "num_steps"),
                                                      ("tokenizer_max_length", "max_token_len")) if key in lerobot}
    if "image_resolution" in lerobot:
        changes["vision"] = with_dims(config.vision, image_size=int(lerobot["image_resolution"][0]))
    return with_dims(config, **changes) if changes else config


def load_pretrained(path_or_id: str | os.PathLike, preset: str | PiConfig | None = None,
                    dtype: torch.dtype | str = torch.float32, device: str | torch.device = "cpu",
                    attn_implementation: str = "sdpa") -> PiModel:
    """A pi0 / pi0.5 checkpoint in lerobot's layout, checked against the model from the safetensors headers alone
    (before any weight is allocated), then built on the meta device and filled shard by shard in `dtype` on
    `device` (RoPE's inverse frequencies stay float32). `model.normalization` holds the checkpoint's statistics."""
    folder = resolve_checkpoint_dir(path_or_id)
    folder = folder if folder.is_dir() else folder.parent
    config = config_for(folder, preset)
    headers = read_headers(weights_files(folder))
    with torch.device("meta"):
        model = PiModel(config, attn_implementation)
    routes = plan(model, headers)
    model = model.to(parse_dtype(dtype)).to_empty(device=device)
    _init_buffers(model)
    params = model.state_dict()
    with torch.no_grad():
        for key, tensor in stream_tensors(headers, routes):
            params[routes[key]].copy_(tensor)
    model.normalization = read_normalization(folder)
    return model.eval()


def _init_buffers(model: PiModel) -> None:
    """The non-persistent buffers `to_empty` leaves uninitialised: RoPE's inverse frequencies (float32, `place`),
    Gemma's embedding scale, SigLIP's position ids."""
    place(model)
    with torch.no_grad():
        embed = model.language_model.embed_tokens
        embed.embed_scale.fill_(embed.scalar_embed_scale)
        ids = model.paligemma_with_expert.paligemma.model.vision_tower.vision_model.embeddings.position_ids
        ids.copy_(torch.arange(ids.shape[-1], device=ids.device)[None])


# ------------------------------------------------------------------------------------------------ normalisation
MODES = ("IDENTITY", "MEAN_STD", "MIN_MAX", "QUANTILES", "QUANTILE10")
_STATS = {"MEAN_STD": ("mean", "std"), "MIN_MAX": ("min", "max"), "QUANTILES": ("q01", "q99"), "QUANTILE10": ("q10", "q90")}


@dataclass
class Normalization:
    """lerobot's normalizer for the state and the action (`NormalizerProcessorStep`), as a checkpoint declares it."""

    modes: dict[str, str]                     # feature -> mode ("observation.state", "action")
    stats: dict[str, dict[str, np.ndarray]]   # feature -> stat -> values
    eps: float = 1e-8

    def normalize(self, values: np.ndarray, feature: str, inverse: bool = False) -> np.ndarray:
        """lerobot's formulas in float64: MEAN_STD (x - mean) / (std + eps) (inverse x * std + mean); MIN_MAX and the
        quantile modes map [lo, hi] to [-1, 1] (a zero range becomes eps); IDENTITY leaves x."""
        mode = self.modes.get(feature, "IDENTITY")
        if mode == "IDENTITY":
            return np.asarray(values, np.float64)
        lo_name, hi_name = _STATS[mode]
        x = np.asarray(values, np.float64)
        lo, hi = self.stats[feature][lo_name], self.stats[feature][hi_name]
        if mode == "MEAN_STD":
            return x * hi + lo if inverse else (x - lo) / (hi + self.eps)
        span = np.where(hi - lo == 0, self.eps, hi - lo)
        return (x + 1.0) * span / 2.0 + lo if inverse else 2.0 * (x - lo) / span - 1.0


def read_normalization(folder: Path) -> Normalization | None:
    """The normalizer step of `policy_preprocessor.json` and its statistics; None when the directory has no
    preprocessor (a bare weights file). A step that names a missing file or stat raises, naming it."""
    from safetensors.torch import load_file

    path = folder / PREPROCESSOR_FILE
    if not path.exists():
        return None
    try:
        steps = json.loads(path.read_text())["steps"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise CheckpointError(f"{path} is not a lerobot processor config (a JSON object with 'steps'): {err}") from err
    step = next((s for s in steps if s.get("registry_name") == "normalizer_processor"), None)
    if step is None:
        return None
    config, state_file = step.get("config", {}), step.get("state_file")
    features, norm_map = config.get("features", {}), config.get("norm_map", {})
    modes = {name: norm_map.get(f.get("type"), "IDENTITY") for name, f in features.items()}
    bad = sorted({m for m in modes.values() if m not in MODES})
    if bad:
        raise CheckpointError(f"{path}: unknown normalisation mode(s) {bad}; known: {', '.join(MODES)}")
    if not state_file or not (folder / state_file).exists():
        raise CheckpointError(f"{path}: the normalizer step's statistics file {state_file!r} is not in {folder}")
    flat = load_file(folder / state_file)
    stats: dict[str, dict[str, np.ndarray]] = {}
    for key, tensor in flat.items():
        feature, _, stat = key.rpartition(".")
        stats.setdefault(feature, {})[stat] = tensor.double().numpy()
    for feature, mode in modes.items():
        needed = _STATS.get(mode, ())
        missing = [s for s in needed if s not in stats.get(feature, {})]
        if missing:
            raise CheckpointError(f"{folder / state_file}: {feature} is normalised with {mode}, which needs "
                                  f"{', '.join(missing)}; the file has {sorted(stats.get(feature, {}))}")
    return Normalization(modes, stats, float(config.get("eps", 1e-8)))
