"""Putting weights on a device: `place` moves a built model to a device and dtype without degrading RoPE (every
family uses it); `read_header` / `stream_tensors` / `write_shards` read and write safetensors one tensor at a time,
so a loader can fill a model allocated on its device without ever holding a whole state dict.

`model.to(dtype=torch.bfloat16)` casts every floating buffer, including the rotary embeddings' inverse
frequencies. transformers computes those in float32 and its rotary forward upcasts them to float32, but a bf16
`inv_freq` has already lost its low bits: cos/sin are then off by about 0.1 within 300 positions. `place` casts
the model and then rebuilds every rotary embedding's `inv_freq` / `original_inv_freq` in float32 with the
module's own RoPE init function, as transformers does at construction; it also gives real values to these
non-persistent buffers after `to_empty` (a model built on the meta device).
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable, Container, Iterator

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from .io import atomic_path

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
ROTARY_BUFFERS = ("inv_freq", "original_inv_freq")
INDEX_FILE = "model.safetensors.index.json"


def parse_dtype(name: str | torch.dtype, what: str = "dtype") -> torch.dtype:
    """'float32' | 'bfloat16' | 'float16' (or 'torch.bfloat16', or a torch.dtype) -> the torch dtype; anything else
    raises a ValueError naming `what` and the bad value."""
    if isinstance(name, torch.dtype):
        if name in DTYPES.values():
            return name
    elif isinstance(name, str) and name.removeprefix("torch.") in DTYPES:
        return DTYPES[name.removeprefix("torch.")]
    raise ValueError(f"{what}: {name!r} is not a model dtype; expected one of {', '.join(DTYPES)}")


def rotary_modules(model: nn.Module) -> list[nn.Module]:
    """The rotary embeddings of `model`: modules holding an `inv_freq` buffer (transformers' *RotaryEmbedding)."""
    return [m for m in model.modules() if isinstance(getattr(m, "inv_freq", None), torch.Tensor)]


def float32_inv_freq(module: nn.Module) -> torch.Tensor:
    """`module`'s inverse frequencies computed afresh in float32 by its own RoPE init function (transformers'
    `compute_default_rope_parameters`, or `ROPE_INIT_FUNCTIONS[rope_type]` for scaled variants)."""
    rope_type = getattr(module, "rope_type", None)
    config = getattr(module, "config", None)
    if rope_type is None or config is None:
        raise TypeError(f"{type(module).__name__} has an inv_freq buffer but no rope_type/config to recompute it from")
    init_fn = module.compute_default_rope_parameters if rope_type == "default" else ROPE_INIT_FUNCTIONS[rope_type]
    inv_freq, _ = init_fn(config, device=torch.device("cpu"))
    return inv_freq.to(torch.float32)


def restore_rotary(model: nn.Module) -> nn.Module:
    """Reset every rotary embedding's `inv_freq` / `original_inv_freq` to float32 values, on its current device."""
    for module in rotary_modules(model):
        device = module.inv_freq.device
        inv_freq = float32_inv_freq(module).to(device)
        for name in ROTARY_BUFFERS:
            if isinstance(getattr(module, name, None), torch.Tensor):
                setattr(module, name, inv_freq.clone())  # an existing buffer stays a (non-persistent) buffer
    return model


def place(model: nn.Module, device: str | torch.device | None = None, dtype: str | torch.dtype | None = None) -> nn.Module:
    """Move `model` to `device` and cast its floating weights to `dtype` (either None: unchanged), keeping every
    rotary embedding's inverse frequencies in float32. Returns the model (moved in place, as `nn.Module.to`)."""
    dtype = None if dtype is None else parse_dtype(dtype)
    if device is not None or dtype is not None:
        model.to(device=device, dtype=dtype)
    return restore_rotary(model)


# ------------------------------------------------------------------------------ safetensors, one tensor at a time
class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model: names the file or every key at fault."""


def misfit_message(missing: list[str], unexpected: list[str], misshapen: list[str]) -> str:
    """'2 missing keys: a, b | 1 shape mismatches: c: ...' (at most 20 names each); '' when all three are empty."""
    problems = []
    for label, names, sep in (("missing keys", missing, ", "), ("unexpected keys", unexpected, ", "), ("shape mismatches", misshapen, "; ")):
        if names:
            problems.append(f"{len(names)} {label}: {sep.join(names[:20])}{' ...' if len(names) > 20 else ''}")
    return " | ".join(problems)


SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool}


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a safetensors file, from its header: dtype, shape and absolute byte range in the file."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    end: int


def read_header(file: Path) -> dict[str, TensorEntry]:
    """The tensors of a safetensors file from its header alone. safetensors checks the file first (header, and
    data offsets that cover the file exactly), so a truncated or corrupt file raises a CheckpointError naming it."""
    try:
        with safe_open(file, framework="pt") as f:
            keys = list(f.keys())
        with open(file, "rb") as fh:
            size = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(size))
    except Exception as err:  # safetensors' own errors name no file
        raise CheckpointError(f"{file} is not a readable safetensors file (truncated or corrupt): {err}") from err
    entries = {}
    for key in keys:
        dtype, shape, (begin, end) = header[key]["dtype"], header[key]["shape"], header[key]["data_offsets"]
        if dtype not in SAFETENSORS_DTYPES:
            raise CheckpointError(f"{file}: tensor {key} has dtype {dtype}, which dcvla does not read")
        entries[key] = TensorEntry(SAFETENSORS_DTYPES[dtype], tuple(shape), 8 + size + begin, 8 + size + end)
    return entries


def read_headers(files: list[Path]) -> dict[Path, dict[str, TensorEntry]]:
    """{file: its tensors} for the files of one checkpoint; a key stored in two files is an error."""
    headers: dict[Path, dict[str, TensorEntry]] = {}
    seen: dict[str, Path] = {}
    for file in files:
        headers[file] = read_header(file)
        for key in headers[file]:
            if key in seen:
                raise CheckpointError(f"key {key} appears in two shards ({seen[key].name} and {file.name})")
            seen[key] = file
    return headers


def read_tensor(fh: BinaryIO, file: Path, key: str, entry: TensorEntry) -> torch.Tensor:
    """One tensor's bytes, read (not memory-mapped: no page of the file stays in this process) into a fresh CPU
    tensor of the stored dtype."""
    buf = torch.empty(entry.end - entry.start, dtype=torch.uint8)
    view, done = memoryview(buf.numpy()), 0
    fh.seek(entry.start)
    while done < len(view):
        n = fh.readinto(view[done:])
        if not n:
            raise CheckpointError(f"{file}: tensor {key} ends past the end of the file (truncated while loading?)")
        done += n
    return buf.view(entry.dtype).reshape(entry.shape)


def stream_tensors(headers: dict[Path, dict[str, TensorEntry]], keys: Container[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """(key, CPU tensor) for every stored tensor (or those in `keys`), file by file in file order, one at a time."""
    for file, entries in headers.items():
        with open(file, "rb") as fh:
            for key, entry in sorted(entries.items(), key=lambda item: item[1].start):
                if keys is None or key in keys:
                    yield key, read_tensor(fh, file, key, entry)


def write_shards(directory: Path, specs: dict[str, tuple[tuple[int, ...], torch.dtype]],
                 make: Callable[[str], torch.Tensor], max_shard_bytes: int) -> Path:
    """Sharded safetensors (`model-0000i-of-0000n.safetensors`) and their index (`model.safetensors.index.json`),
    each written atomically. `specs` gives every key's shape and dtype, for the shard plan; `make(key)` gives the
    tensor, called one shard at a time, so at most one shard is ever in memory."""
    sizes = {key: math.prod(shape) * dtype.itemsize for key, (shape, dtype) in specs.items()}
    shards: list[list[str]] = [[]]
    size = 0
    for key, nbytes in sizes.items():
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += nbytes
    weight_map: dict[str, str] = {}
    for i, keys in enumerate(shards, start=1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        with atomic_path(directory / name) as tmp:
            mode = tmp.stat().st_mode  # save_file replaces the file (owner-only): keep atomic_path's permissions
            save_file({key: make(key).contiguous() for key in keys}, str(tmp), metadata={"format": "pt"})
            tmp.chmod(mode)
        weight_map |= dict.fromkeys(keys, name)
    index = directory / INDEX_FILE
    with atomic_path(index) as tmp:
        tmp.write_text(json.dumps({"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map}, indent=2))
    return index


# --------------------------------------------------------------------------------------------- checkpoint files
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def refuse_pickle(path: Path) -> None:
    raise CheckpointError(
        f"refusing to load {path}: pickle checkpoints can execute code when loaded; convert it to safetensors "
        "(e.g. safetensors.torch.save_file(torch.load(f, weights_only=True), 'model.safetensors'))"
    )


def _index_shards(index: Path) -> list[str]:
    """The shard file names an index's `weight_map` lists; a CheckpointError naming the index when it is broken."""
    try:
        content = json.loads(index.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{index} is not valid JSON ({err})") from err
    weight_map = content.get("weight_map") if isinstance(content, dict) else None
    if not isinstance(weight_map, dict) or not weight_map or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"{index} has no 'weight_map' (a non-empty object: checkpoint key -> shard file name)")
    return sorted(set(weight_map.values()))


def checkpoint_files(path: str | os.PathLike) -> list[Path]:
    """The safetensors files of a checkpoint: a single file, a directory's index shards, or model.safetensors."""
    path = Path(path)
    if path.is_file():
        if path.suffix in PICKLE_SUFFIXES:
            refuse_pickle(path)
        if path.suffix != ".safetensors":
            raise CheckpointError(f"{path} is not a .safetensors file")
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"no checkpoint at {path}")
    index = path / INDEX_FILE
    if index.exists():
        files = [path / name for name in _index_shards(index)]
        missing = [f.name for f in files if not f.exists()]
        if missing:
            raise CheckpointError(f"{index} lists shards that are not in {path}: {', '.join(missing)}")
        return files
    shards = sorted(path.glob("*.safetensors"))
    if shards:
        return shards
    pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        refuse_pickle(path / pickles[0])
    raise CheckpointError(f"no .safetensors weights in {path}")


def resolve_checkpoint_dir(path_or_id: str | os.PathLike, extra_patterns: tuple[str, ...] = ()) -> Path:
    """A local directory as is; otherwise a hub id, downloaded (safetensors, json and `extra_patterns` only) unless
    offline."""
    path = Path(path_or_id)
    if path.exists():
        return path
    name = str(path_or_id)
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", name):
        raise FileNotFoundError(f"no checkpoint at {name} (neither a local path nor a hub id like 'openvla/openvla-7b')")
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        raise FileNotFoundError(f"{name} is not a local directory and hub access is off (HF_HUB_OFFLINE=1); download it first")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(name, allow_patterns=["*.safetensors", "*.json", "tokenizer.model", *extra_patterns]))
    except Exception as err:  # network, auth, missing repo: say which id failed and why
        raise FileNotFoundError(f"could not fetch {name} from the hub: {type(err).__name__}: {err}") from err
