"""lerobot policy directories (pi0, pi0.5, SmolVLA): finding the weights, reading lerobot's `config.json`, matching
every stored tensor to the model strictly, and filling a model built on the meta device.

A lerobot policy directory holds `model.safetensors` (or shards with an index), lerobot's `config.json` (its
`"type"`, chunk size, state/action widths, image resolution) and its processors (`dcvla.normalization`). Each family
maps a checkpoint key to its model's key (or to None: accepted and ignored, for a reason the family tables); anything
else missing, unexpected or misshapen is named in one error with the file. Only safetensors are read. `save_model`
writes a model trained here in that layout.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from .devices import (INDEX_FILE, PICKLE_SUFFIXES, CheckpointError, checkpoint_files, misfit_message, parse_dtype,
                      read_headers, refuse_pickle, resolve_checkpoint_dir, stream_tensors)
from .io import atomic_path
from .normalization import read_normalization

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


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


def read_lerobot_config(folder: Path) -> dict:
    """lerobot's `config.json` of the directory ({} without one)."""
    path = folder / CONFIG_FILE
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path} is not valid JSON ({err})") from err


def plan(model: nn.Module, headers: dict, model_key: Callable[[str], str | None], label: str) -> dict[str, str]:
    """checkpoint key -> model key for every stored tensor that loads; a CheckpointError naming every missing,
    unexpected and misshapen key (and the files) unless the checkpoint fits exactly. Two stored keys for one model
    key (a tied table stored twice) load from the one named as the model names it."""
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    stored = {key: entry.shape for entries in headers.values() for key, entry in entries.items()}
    routes, unexpected, misshapen, misfit_targets = {}, [], [], set()
    for key, shape in stored.items():
        target = model_key(key)
        if target is None:
            continue
        if target not in expected:
            unexpected.append(key)
        elif shape != expected[target]:
            named = key if target == key.removeprefix("model.") else f"{key} (read as {target})"
            misshapen.append(f"{named}: checkpoint {list(shape)}, model {list(expected[target])}")
            misfit_targets.add(target)
        else:
            routes[key] = target
    by_target: dict[str, list[str]] = {}
    for key, target in routes.items():
        by_target.setdefault(target, []).append(key)
    for target, keys in by_target.items():
        if len(keys) > 1:  # keep the key spelled as the target
            for key in keys:
                if key.removeprefix("model.") != target:
                    del routes[key]
    missing = sorted(set(expected) - set(routes.values()) - misfit_targets)
    problem = misfit_message(missing, sorted(unexpected), misshapen)
    if problem:
        files = ", ".join(str(f) for f in headers)
        raise CheckpointError(f"{files} does not fit {label}: {problem}")
    return routes


def load_model(path_or_id, config_for: Callable[[Path], Any], build: Callable[[Any], nn.Module],
               model_key: Callable[[str, Any], str | None], label: Callable[[Any], str], dtype, device,
               init_buffers: Callable[[nn.Module], None]) -> nn.Module:
    """A family's model from a lerobot directory (or hub id): its config (`config_for(folder)`), the model built on
    the meta device (`build(config)`), checked against the safetensors headers alone (`plan`, strict, with the
    family's `model_key(key, config)`; errors name the model as `label(config)`) before any weight is allocated,
    then filled (`fill`)."""
    folder = resolve_checkpoint_dir(path_or_id)
    folder = folder if folder.is_dir() else folder.parent
    config = config_for(folder)
    headers = read_headers(weights_files(folder))
    with torch.device("meta"):
        model = build(config)
    routes = plan(model, headers, lambda key: model_key(key, config), label(config))
    return fill(model, folder, headers, routes, dtype, device, init_buffers)


def fill(meta_model: nn.Module, folder: Path, headers: dict, routes: dict[str, str], dtype, device,
         init_buffers: Callable[[nn.Module], None]) -> nn.Module:
    """The model built on the meta device, allocated in `dtype` on `device` and filled shard by shard from the
    checkpoint (`routes` from `plan`), its non-persistent buffers set by `init_buffers`, the checkpoint's
    normalisation in `model.normalization`; in eval mode."""
    model = meta_model.to(parse_dtype(dtype)).to_empty(device=device)
    init_buffers(model)
    params = model.state_dict()
    with torch.no_grad():
        for key, tensor in stream_tensors(headers, routes):
            params[routes[key]].copy_(tensor)
    model.normalization = read_normalization(folder)
    return model.eval()


def save_model(directory: str | Path, model: nn.Module, config: dict, dtype: torch.dtype | None = torch.bfloat16) -> Path:
    """`model` as a lerobot policy saves it: `model.safetensors` (every state-dict key under the policy's `model.`,
    floating tensors in `dtype`, None: as they are) and lerobot's `config.json` (`config`), each written atomically.
    The processors' statistics are `dcvla.normalization.write_normalization`'s."""
    from safetensors.torch import save

    directory = Path(directory)
    state = {f"model.{key}": value.detach().to("cpu", dtype if dtype is not None and value.is_floating_point()
                                               else value.dtype).contiguous()
             for key, value in model.state_dict().items()}
    with atomic_path(directory / WEIGHTS_FILE) as tmp:
        tmp.write_bytes(save(state, metadata={"format": "pt"}))
    with atomic_path(directory / CONFIG_FILE) as tmp:
        tmp.write_text(json.dumps(config, indent=4) + "\n")
    return directory


def lerobot_type(folder: Path, known: tuple[str, ...]) -> str | None:
    """The policy type lerobot's `config.json` names, checked against the family's `known` ones (None: no file)."""
    kind = read_lerobot_config(folder).get("type")
    if kind is not None and kind not in known:
        raise CheckpointError(f"{folder / CONFIG_FILE} says type {kind!r}; this loader reads {', '.join(known)}")
    return kind
