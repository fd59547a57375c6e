"""Checkpoints in OpenVLA's exact key layout, mapped onto dcvla's transformers modules.

OpenVLA stores its towers under timm's names (`vision_backbone.featurizer.blocks.3.attn.qkv.weight`, LayerScale
as `ls1.scale_factor`, `pos_embed` covering patches only). dcvla's towers are transformers modules, so loading
splits the fused qkv into q/k/v, renames LayerScale, gives the DINOv2 cls slot a zero position embedding and
drops what the model never runs (the last block of each tower, DINOv2's final norm, SigLIP's norm and
attention-pool head). Saving does the inverse, so a saved checkpoint is a valid OpenVLA-layout checkpoint.

Loading is lean at 7B: the key and shape check reads the safetensors headers only; the model is built on the meta
device, cast there and allocated once on the target device in the target dtype; then each shard's tensors are
read one at a time (plain reads, no memory map) and copied into their parameters. Neither float32 weights nor the
whole state dict ever exist in host memory.

Only safetensors are read: pickle checkpoints (`.bin`, `.pt`, `.pth`, `.ckpt`) can run code when loaded.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch

from ..devices import (INDEX_FILE, CheckpointError, checkpoint_files, misfit_message, parse_dtype, place, read_headers,
                       resolve_checkpoint_dir, stream_tensors, write_shards)
from ..io import atomic_path
from ..vision import ViTConfig
from .config import OpenVLAConfig, get_preset
from .model import OpenVLA

DCVLA_CONFIG_FILE = "dcvla_config.json"
STATS_FILE = "dataset_statistics.json"
TOWER_PREFIX = {"dino": "vision_backbone.featurizer.", "siglip": "vision_backbone.fused_featurizer."}
# The modules the safetensors shards hold; a family's extra modules (OpenVLA-OFT's heads) load from their own files.
BACKBONE_PREFIXES = ("vision_backbone.", "projector.", "language_model.")

# timm module -> transformers module inside one block, per tower (the fused qkv is split separately).
_BLOCK_MODULES = {
    "dino": {"norm1": "norm1", "norm2": "norm2", "attn.proj": "attention.o_proj", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"},
    "siglip": {"norm1": "layer_norm1", "norm2": "layer_norm2", "attn.proj": "self_attn.out_proj",
               "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"},
}
_ATTN = {"dino": "attention", "siglip": "self_attn"}


def _block_params(tower: str) -> dict[str, str]:
    """timm parameter name -> transformers parameter name inside one block (qkv excluded)."""
    params = {f"{t}.{p}": f"{h}.{p}" for t, h in _BLOCK_MODULES[tower].items() for p in ("weight", "bias")}
    if tower == "dino":  # LayerScale, renamed `gamma` -> `scale_factor` by OpenVLA
        params |= {"ls1.scale_factor": "layer_scale1.lambda1", "ls2.scale_factor": "layer_scale2.lambda1"}
    return params


_BLOCK_PARAMS = {tower: _block_params(tower) for tower in _BLOCK_MODULES}
_EMBED_PARAMS = {
    "dino": {"cls_token": "embeddings.cls_token", "reg_token": "embeddings.register_tokens",
             "patch_embed.proj.weight": "embeddings.patch_embeddings.projection.weight",
             "patch_embed.proj.bias": "embeddings.patch_embeddings.projection.bias"},
    "siglip": {"patch_embed.proj.weight": "embeddings.patch_embedding.weight",
               "patch_embed.proj.bias": "embeddings.patch_embedding.bias"},
}
# Present in OpenVLA checkpoints, never used by the model (features come from the second-to-last block).
_UNUSED_TOWER_KEYS = re.compile(r"^(norm\.|attn_pool\.|head\.|fc_norm\.)")
# In dcvla's model, not in OpenVLA checkpoints (DINOv2's masked-pretraining token): left at zero.
_MODEL_ONLY_KEYS = {"vision_backbone.featurizer.embeddings.mask_token"}


# ----------------------------------------------------------------------------------------------- key mapping
# A checkpoint tensor goes to one or more model tensors: (dcvla key, part), where part says how: "" as stored;
# "q", "k", "v" a third of a fused qkv; "cls_slot" DINOv2's pos_embed after a zero cls slot; "rows" SigLIP's
# [1, patches, width] pos_embed as the [patches, width] embedding table.
Target = tuple[str, str]


def _tower_targets(cfg: ViTConfig, local: str) -> list[Target] | None:
    """timm tower key (tower-relative) -> its targets in dcvla's tower, or None for a part never run."""
    block = re.match(r"^blocks\.(\d+)\.(.+)$", local)
    if block:
        index, rest = int(block.group(1)), block.group(2)
        if index >= cfg.num_layers_run:
            return None  # the last block: its output is never used
        if rest in ("attn.qkv.weight", "attn.qkv.bias"):
            kind = rest.rsplit(".", 1)[1]
            return [(f"blocks.{index}.{_ATTN[cfg.name]}.{p}_proj.{kind}", p) for p in "qkv"]
        return [(f"blocks.{index}.{_BLOCK_PARAMS[cfg.name].get(rest, rest)}", "")]  # unknown: reported as unexpected
    if local == "pos_embed":  # transformers' DINOv2 has a cls slot; timm's no_embed_class pos_embed does not
        return [("embeddings.position_embeddings", "cls_slot")] if cfg.name == "dino" else [("embeddings.position_embedding.weight", "rows")]
    if local in _EMBED_PARAMS[cfg.name]:
        return [(_EMBED_PARAMS[cfg.name][local], "")]
    return None if _UNUSED_TOWER_KEYS.match(local) else [(local, "")]


def map_openvla_key(key: str, config: OpenVLAConfig) -> list[Target] | None:
    """One OpenVLA-layout key -> [(dcvla key, part)], or None when the model never runs that part."""
    for name, prefix in TOWER_PREFIX.items():
        if key.startswith(prefix):
            targets = _tower_targets(config.dino if name == "dino" else config.siglip, key[len(prefix):])
            return None if targets is None else [(prefix + target, part) for target, part in targets]
    return [(key, "")]


def convert(value: torch.Tensor, part: str) -> torch.Tensor:
    """A checkpoint tensor -> the model tensor `part` names (see `Target`)."""
    if part in ("q", "k", "v"):
        return value.chunk(3, dim=0)["qkv".index(part)]
    if part == "cls_slot":
        return torch.cat([value.new_zeros(1, 1, value.shape[-1]), value], dim=1)
    if part == "rows":
        return value.reshape(-1, value.shape[-1])
    return value


def stored_shape(model_shape: tuple[int, ...], part: str) -> tuple[int, ...]:
    """The checkpoint shape that maps onto a model tensor of `model_shape` through `part` (`convert`'s inverse)."""
    if part in ("q", "k", "v"):
        return (3 * model_shape[0], *model_shape[1:])
    if part == "cls_slot":
        return (model_shape[0], model_shape[1] - 1, *model_shape[2:])
    if part == "rows":
        return (1, *model_shape)
    return tuple(model_shape)


def from_openvla_layout(state_dict: dict[str, torch.Tensor], config: OpenVLAConfig) -> tuple[dict[str, tuple[str, torch.Tensor]], list[str]]:
    """OpenVLA-layout state dict -> ({dcvla key: (checkpoint key, tensor)}, checkpoint keys known to be unused)."""
    routes, unused = _routes(state_dict, config)
    return {t: (key, convert(state_dict[key], part)) for key, targets in routes.items() for t, part in targets}, unused


def _routes(keys, config: OpenVLAConfig) -> tuple[dict[str, list[Target]], list[str]]:
    routes: dict[str, list[Target]] = {}
    unused: list[str] = []
    for key in keys:
        targets = map_openvla_key(key, config)
        if targets is None:
            unused.append(key)
        else:
            routes[key] = targets
    return routes, unused


def backbone_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The entries of `model.state_dict()` that the shards hold: towers, projector, Llama."""
    return {key: value for key, value in model.state_dict().items() if key.startswith(BACKBONE_PREFIXES)}


def check_fit(model: torch.nn.Module, shapes: dict[str, tuple[int, ...]]) -> tuple[dict[str, list[Target]], list[str]]:
    """Check checkpoint keys and shapes {key: shape} against `model`'s backbone (the model may be on the meta device).

    Returns:
        (routes {checkpoint key: targets}, checkpoint keys present but unused by design).
    Raises:
        CheckpointError: naming every missing key, unexpected key and shape mismatch (in checkpoint names).
    """
    routes, unused = _routes(shapes, model.config)
    expected = {key: tuple(value.shape) for key, value in backbone_state(model).items()}
    mapped = {target: key for key, targets in routes.items() for target, _ in targets}
    missing = [key for key in expected if key not in mapped and key not in _MODEL_ONLY_KEYS]
    unexpected = sorted({source for target, source in mapped.items() if target not in expected})
    misshapen = sorted({  # one entry per checkpoint key, in checkpoint terms (a fused qkv as a whole)
        f"{key}: checkpoint {tuple(shapes[key])}, model expects {stored_shape(expected[target], part)}"
        for key, targets in routes.items() for target, part in targets
        if target in expected and stored_shape(expected[target], part) != tuple(shapes[key])
    })
    problems = misfit_message(missing, unexpected, misshapen)
    if problems:
        raise CheckpointError(f"checkpoint does not fit preset {model.config.name!r}: " + problems)
    return routes, unused


def to_openvla_layout(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """dcvla model -> its backbone's state dict in OpenVLA's key layout (the blocks that run; unused parts are not
    invented)."""
    out: dict[str, torch.Tensor] = {}
    inverse = {tower: {h: t for t, h in _EMBED_PARAMS[tower].items()} for tower in TOWER_PREFIX}
    inverse_block = {tower: {h: t for t, h in _BLOCK_PARAMS[tower].items()} for tower in TOWER_PREFIX}
    state = backbone_state(model)
    for key, value in state.items():
        if key in _MODEL_ONLY_KEYS:
            continue
        tower = next((name for name, prefix in TOWER_PREFIX.items() if key.startswith(prefix)), None)
        if tower is None:
            out[key] = value
            continue
        prefix, local, attn = TOWER_PREFIX[tower], key[len(TOWER_PREFIX[tower]):], _ATTN[tower]
        block = re.match(r"^blocks\.(\d+)\.(.+)$", local)
        if local == "embeddings.position_embeddings":
            out[prefix + "pos_embed"] = value[:, 1:]  # drop the cls slot (zero in OpenVLA's model)
        elif local == "embeddings.position_embedding.weight":
            out[prefix + "pos_embed"] = value[None]
        elif local in inverse[tower]:
            out[prefix + inverse[tower][local]] = value
        elif block and block.group(2).startswith(f"{attn}.q_proj."):  # fuse q, k, v into timm's qkv, once
            index, kind = block.group(1), block.group(2).rsplit(".", 1)[1]
            parts = [state[f"{prefix}blocks.{index}.{attn}.{p}_proj.{kind}"] for p in "qkv"]
            out[f"{prefix}blocks.{index}.attn.qkv.{kind}"] = torch.cat(parts, dim=0)
        elif block and block.group(2) in inverse_block[tower]:
            out[f"{prefix}blocks.{block.group(1)}.{inverse_block[tower][block.group(2)]}"] = value
        elif not (block and re.match(rf"^{attn}\.[kv]_proj\.", block.group(2))):
            raise AssertionError(f"no OpenVLA name for model parameter {key}")
    return out


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """All tensors of a (sharded) safetensors checkpoint, on the CPU in their stored dtype."""
    return dict(stream_tensors(read_headers(checkpoint_files(path))))


def _copy_in(model: torch.nn.Module, tensors, routes: dict[str, list[Target]]) -> None:
    params = model.state_dict()
    with torch.no_grad():
        for key, value in tensors:
            for target, part in routes[key]:
                params[target].copy_(convert(value, part))  # casts to the parameter's dtype and device


def load_openvla_state_dict(model: OpenVLA, state_dict: dict[str, torch.Tensor]) -> list[str]:
    """Copy an OpenVLA-layout state dict into `model`, strictly (see `check_fit`).

    Returns:
        The checkpoint keys that were present but are unused by design (last blocks, final norms, pool head).
    """
    routes, unused = check_fit(model, {key: tuple(value.shape) for key, value in state_dict.items()})
    _copy_in(model, ((key, state_dict[key]) for key in routes), routes)
    return unused


OFT_HEADS = ("action_head", "proprio_projector")  # OpenVLA-OFT's heads: `{name}--<step>_checkpoint.pt` beside the backbone
OFT_PATTERNS = tuple(f"{name}--*" for name in OFT_HEADS)  # what a hub download of an OFT checkpoint must fetch too


def is_oft_checkpoint(directory: str | os.PathLike) -> bool:
    """The checkpoint directory holds OpenVLA-OFT's heads (`action_head--*.pt` or `proprio_projector--*.pt`), as the
    published `moojink/openvla-7b-oft-finetuned-libero-*` do: its backbone alone is not the model."""
    directory = Path(directory)
    return directory.is_dir() and any(any(directory.glob(f"{name}--*.pt")) for name in OFT_HEADS)


def read_norm_stats(directory: Path) -> dict:
    """`dataset_statistics.json`, or the `norm_stats` of an OpenVLA `config.json`; {} when neither exists."""
    if (directory / STATS_FILE).exists():
        return json.loads((directory / STATS_FILE).read_text())
    config = directory / "config.json"
    if config.exists():
        return json.loads(config.read_text()).get("norm_stats") or {}
    return {}


def detect_preset(directory: Path) -> str:
    """The preset a checkpoint was saved from: dcvla's own record, else OpenVLA's config, else an error."""
    if (directory / DCVLA_CONFIG_FILE).exists():
        return json.loads((directory / DCVLA_CONFIG_FILE).read_text())["preset"]
    config = directory / "config.json"
    if config.exists() and "dinosiglip" in json.loads(config.read_text()).get("vision_backbone_id", ""):
        return "openvla-7b"
    raise CheckpointError(f"cannot tell which preset {directory} holds; pass preset= (e.g. 'openvla-7b')")


def load_pretrained(
    path_or_id: str | os.PathLike,
    preset: str | OpenVLAConfig | None = None,
    dtype: torch.dtype | str = torch.float32,
    device: str | torch.device = "cpu",
    attn_implementation: str = "sdpa",
) -> OpenVLA:
    """Build the model for `preset` and load an OpenVLA-layout safetensors checkpoint into it.

    The keys and shapes are checked from the headers before any weight is allocated; the model is cast on the
    meta device, allocated once on `device` in `dtype` and filled tensor by tensor (see the module docstring).

    Args:
        path_or_id: a checkpoint directory or .safetensors file, or a hub id (fetched only when online).
        preset: a preset name or config; None reads it from the checkpoint (dcvla_config.json or config.json).
        dtype, device: where the weights end up (checkpoints are usually bfloat16 on disk); RoPE stays float32.
        attn_implementation: transformers attention backend.
    Returns:
        The model in eval mode, with `model.norm_stats` from dataset_statistics.json.
    """
    directory = resolve_checkpoint_dir(path_or_id)
    folder = directory if directory.is_dir() else directory.parent
    config = preset if isinstance(preset, OpenVLAConfig) else get_preset(preset or detect_preset(folder))
    dtype = parse_dtype(dtype)
    with torch.device("meta"):
        model = OpenVLA(config, attn_implementation)
    model = materialize(model, dtype, device, *plan_backbone(model, directory))
    model.norm_stats = read_norm_stats(folder)
    return model.eval()


def plan_backbone(model: torch.nn.Module, path: Path) -> tuple[dict, dict[str, list[Target]]]:
    """The safetensors headers of the checkpoint at `path` and their routes into `model`'s backbone, checked strictly
    (`check_fit`) from the headers alone, so a misfit fails before any weight is allocated."""
    headers = read_headers(checkpoint_files(path))
    return headers, check_fit(model, {key: e.shape for entries in headers.values() for key, e in entries.items()})[0]


def materialize(model: torch.nn.Module, dtype: torch.dtype, device: str | torch.device, headers: dict,
                routes: dict[str, list[Target]]) -> torch.nn.Module:
    """Allocate a model built on the meta device, once, on `device` in `dtype`; give the buffers no checkpoint carries
    their values; copy the shards' tensors in one at a time (`plan_backbone`). Modules outside the backbone are left
    uninitialised for their own loader."""
    model = model.to(dtype).to_empty(device=device)  # the only allocation of weights: target dtype and device
    _init_buffers(model)
    _copy_in(model, stream_tensors(headers, routes), routes)
    return model


def _init_buffers(model: torch.nn.Module) -> None:
    """Give a model built on the meta device the tensors no checkpoint carries.

    `to_empty` leaves non-persistent buffers uninitialised: RoPE's inverse frequencies (rebuilt in float32 by
    `place`, as transformers keeps them) and SigLIP's position ids. DINOv2's unused mask token is zeroed.
    """
    place(model)
    with torch.no_grad():
        model.vision_backbone.featurizer.embeddings.mask_token.zero_()
        ids = model.vision_backbone.fused_featurizer.embeddings.position_ids
        ids.copy_(torch.arange(ids.shape[-1], device=ids.device)[None])


def write_checkpoint(directory: str | os.PathLike, specs: dict[str, tuple[tuple[int, ...], torch.dtype]], make,
                     norm_stats: dict, preset: str, max_shard_bytes: int = 2 * 1024**3) -> Path:
    """An OpenVLA-layout checkpoint: shards + index (`dcvla.devices.write_shards`: `make(key)` is called one shard at
    a time, so the 7B benchmark writes random weights without a model), dataset statistics, preset; all atomic."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    write_shards(directory, specs, make, max_shard_bytes)
    for name, content in {STATS_FILE: norm_stats, DCVLA_CONFIG_FILE: {"preset": preset}}.items():
        with atomic_path(directory / name) as tmp:
            tmp.write_text(json.dumps(content, indent=2))
    return directory


def save_pretrained(model: torch.nn.Module, directory: str | os.PathLike, max_shard_bytes: int = 2 * 1024**3, dtype: torch.dtype | None = torch.bfloat16) -> Path:
    """Write `model` as an OpenVLA-layout checkpoint (see `write_checkpoint`).

    `dtype` (default bfloat16, as published) of None keeps the model's.
    """
    state = to_openvla_layout(model)
    cast = {key: dtype if dtype is not None and value.is_floating_point() else value.dtype for key, value in state.items()}
    specs = {key: (tuple(value.shape), cast[key]) for key, value in state.items()}
    return write_checkpoint(directory, specs, lambda key: state[key].detach().to("cpu", cast[key]), model.norm_stats,
                            model.config.name, max_shard_bytes)
