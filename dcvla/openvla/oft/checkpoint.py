"""OpenVLA-OFT checkpoints in the published layout, loaded strictly.

A published OFT directory (moojink/openvla-7b-oft-finetuned-libero-*) holds:
- the merged backbone in OpenVLA's layout (safetensors shards + index), read by `dcvla.openvla.checkpoint`;
- `action_head--<step>_checkpoint.pt` and `proprio_projector--<step>_checkpoint.pt`: plain state dicts saved from
  DDP-wrapped modules, so every key starts with `module.`. They are read as upstream's `load_component_state_dict`
  reads them, with `torch.load(..., weights_only=True)`, which unpickles tensors and containers only; a file that
  needs the full unpickler (it could run code) is refused;
- `dataset_statistics.json`: per dataset key, `action` and `proprio` statistics (q01, q99, mask, ...).

Everything is checked before weights are allocated: backbone keys and shapes from the safetensors headers, each
head's keys and shapes (named with its file), the statistics' dims.
"""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import torch
from torch import nn

from ...devices import CheckpointError, misfit_message, parse_dtype
from ...io import atomic_path
from ...tokenizer import load_tokenizer
from ..checkpoint import OFT_HEADS, OFT_PATTERNS, STATS_FILE, detect_preset, materialize, plan_backbone, resolve_checkpoint_dir
from ..checkpoint import save_pretrained as save_backbone
from .config import FROM_OPENVLA_PRESET, OFTConfig, get_preset
from .model import OpenVLAOFT
from .processing import OFTProcessor

COMPONENTS = OFT_HEADS  # module name = file name prefix, as upstream's finder matches
DDP_PREFIX = "module."


def component_file(directory: Path, name: str) -> Path:
    """The one `{name}--*checkpoint.pt` in `directory` (upstream's `find_checkpoint_file` wants exactly one)."""
    found = sorted(p for p in directory.glob(f"{name}--*.pt") if "checkpoint" in p.name)
    if len(found) != 1:
        listed = f": {', '.join(p.name for p in found)}" if found else ""
        raise CheckpointError(f"expected exactly one {name}--<step>_checkpoint.pt in {directory}, found {len(found)}{listed}")
    return found[0]


def read_component(path: Path) -> dict[str, torch.Tensor]:
    """A head's state dict as upstream loads it: `torch.load(weights_only=True)`, `module.` stripped.

    Raises:
        CheckpointError: naming the file when it needs the full unpickler, is unreadable or holds no state dict.
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"refusing to load {path}: it is not a plain state dict (torch.load(weights_only=True) fails: "
            f"{str(err).splitlines()[0]}); loading it would need the full unpickler, which can run code") from err
    except Exception as err:  # torch's zip reader and unpickler errors name no file
        raise CheckpointError(f"{path} is not a readable torch checkpoint (truncated or corrupt): {err}") from err
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise CheckpointError(f"{path} holds a {type(state).__name__}, not a state dict of tensors")
    stripped = {key.removeprefix(DDP_PREFIX): value for key, value in state.items()}
    if len(stripped) != len(state):
        raise CheckpointError(f"{path} holds keys both with and without the {DDP_PREFIX!r} prefix")
    return stripped


def check_component(module: nn.Module, state: dict[str, torch.Tensor], path: Path, preset: str) -> None:
    """Every key of `module` present in `state` with its shape, and nothing else; a CheckpointError naming `path`."""
    expected = {key: tuple(value.shape) for key, value in module.state_dict().items()}
    missing = [key for key in expected if key not in state]
    unexpected = sorted(key for key in state if key not in expected)
    misshapen = sorted(f"{key}: checkpoint {tuple(value.shape)}, model expects {expected[key]}"
                       for key, value in state.items() if key in expected and tuple(value.shape) != expected[key])
    problems = misfit_message(missing, unexpected, misshapen)
    if problems:
        raise CheckpointError(f"{path.name} does not fit preset {preset!r}: {problems} (in {path.parent})")


def read_stats(directory: Path, config: OFTConfig) -> dict:
    """`dataset_statistics.json`, every entry checked for `action` and `proprio` q01/q99 of the model's dims."""
    path = directory / STATS_FILE
    if not path.exists():
        raise CheckpointError(f"{directory} has no {STATS_FILE}; OpenVLA-OFT normalises the state and un-normalises "
                              "actions with it")
    try:
        stats = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path} is not valid JSON ({err})") from err
    if not isinstance(stats, dict) or not stats:
        raise CheckpointError(f"{path} has no dataset entries")
    dims = {"action": config.action_dim, "proprio": config.proprio_dim}
    for key, entry in stats.items():
        for part, n in dims.items():
            block = entry.get(part) if isinstance(entry, dict) else None
            if not isinstance(block, dict) or any(len(block.get(q) or ()) != n for q in ("q01", "q99")):
                raise CheckpointError(f"{path}: entry {key!r} needs {part!r} statistics with q01 and q99 of {n} values")
    return stats


def _config(folder: Path, preset: str | OFTConfig | None) -> OFTConfig:
    if isinstance(preset, OFTConfig):
        return preset
    name = preset or detect_preset(folder)  # an OpenVLA-layout record names the OpenVLA preset
    return get_preset(FROM_OPENVLA_PRESET.get(name, name))


def load_pretrained(path_or_id: str | os.PathLike, preset: str | OFTConfig | None = None,
                    dtype: torch.dtype | str = torch.float32, device: str | torch.device = "cpu",
                    attn_implementation: str = "sdpa") -> OpenVLAOFT:
    """Build the model for `preset` and load a published-layout OpenVLA-OFT checkpoint into it, strictly.

    Args:
        path_or_id: a checkpoint directory, or a hub id (fetched only when online).
        preset: an OFT preset name or config; None reads it from the checkpoint (dcvla_config.json or config.json).
        dtype, device: where every weight ends up (the files are bfloat16, the proprio projector maybe float32).
        attn_implementation: transformers attention backend.
    Returns:
        The model in eval mode, with `model.norm_stats` from dataset_statistics.json.
    Raises:
        CheckpointError: naming the file and every missing, unexpected or misshapen key, a refused pickle, a missing
            or ill-formed statistics file.
    """
    directory = resolve_checkpoint_dir(path_or_id, extra_patterns=OFT_PATTERNS)
    if not directory.is_dir():
        raise CheckpointError(f"{directory} is not a directory; an OpenVLA-OFT checkpoint is the backbone's shards plus "
                              f"{' and '.join(f'{name}--*.pt' for name in COMPONENTS)} and {STATS_FILE}")
    config = _config(directory, preset)
    with torch.device("meta"):
        model = OpenVLAOFT(config, attn_implementation)
    plan = plan_backbone(model, directory)
    heads = {}
    for name in COMPONENTS:
        path = component_file(directory, name)
        heads[name] = read_component(path)
        check_component(getattr(model, name), heads[name], path, config.name)
    stats = read_stats(directory, config)
    model = materialize(model, parse_dtype(dtype), device, *plan)
    with torch.no_grad():
        for name, state in heads.items():
            params = getattr(model, name).state_dict()
            for key, value in state.items():
                params[key].copy_(value)  # casts to the parameter's dtype and device
    model.norm_stats = stats
    return model.eval()


def load_processor(path: str | os.PathLike, config: OFTConfig) -> OFTProcessor:
    """The checkpoint's own tokenizer if it ships one; dcvla's offline one only for the small random-weight presets."""
    folder = Path(path)
    has_tokenizer = any((folder / f).exists() for f in ("tokenizer.json", "tokenizer.model"))
    if config.name == "openvla-oft-7b" and not has_tokenizer:
        raise FileNotFoundError(f"{folder} has no Llama-2 tokenizer (tokenizer.json or tokenizer.model)")
    return OFTProcessor(load_tokenizer(folder if has_tokenizer else None), config)


def save_pretrained(model: OpenVLAOFT, directory: str | os.PathLike, step: int = 0,
                    dtype: torch.dtype | None = torch.bfloat16) -> Path:
    """Write `model` in the published layout: the backbone's shards, both heads as `module.`-prefixed state dicts
    (`{name}--{step}_checkpoint.pt`), dataset statistics and the preset. `dtype` None keeps the model's."""
    directory = save_backbone(model, directory, dtype=dtype)
    for name in COMPONENTS:
        state = {DDP_PREFIX + key: value.detach().to("cpu", dtype or value.dtype).clone()
                 for key, value in getattr(model, name).state_dict().items()}
        with atomic_path(directory / f"{name}--{step}_checkpoint.pt") as tmp:
            torch.save(state, tmp)
    return directory
