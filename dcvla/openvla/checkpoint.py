"""Checkpoints in OpenVLA's exact key layout, mapped onto dcvla's transformers modules.

OpenVLA stores its towers under timm's names (`vision_backbone.featurizer.blocks.3.attn.qkv.weight`, LayerScale
as `ls1.scale_factor`, `pos_embed` covering patches only). dcvla's towers are transformers modules, so loading
splits the fused qkv into q/k/v, renames LayerScale, gives the DINOv2 cls slot a zero position embedding and
drops what the model never runs (the last block of each tower, DINOv2's final norm, SigLIP's norm and
attention-pool head). Saving does the inverse, so a saved checkpoint is a valid OpenVLA-layout checkpoint.

Only safetensors are read: pickle checkpoints (`.bin`, `.pt`, `.pth`, `.ckpt`) can run code when loaded.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..io import atomic_path
from ..vision import ViTConfig
from .config import OpenVLAConfig, get_preset
from .model import OpenVLA

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
INDEX_FILE = "model.safetensors.index.json"
DCVLA_CONFIG_FILE = "dcvla_config.json"
STATS_FILE = "dataset_statistics.json"
TOWER_PREFIX = {"dino": "vision_backbone.featurizer.", "siglip": "vision_backbone.fused_featurizer."}

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


class CheckpointError(ValueError):
    """A checkpoint that does not fit the model: names every missing, unexpected or misshapen key."""


# ----------------------------------------------------------------------------------------------- key mapping
def _tower_from_openvla(cfg: ViTConfig, sd: dict[str, torch.Tensor], unused: list[str]) -> dict[str, tuple[str, torch.Tensor]]:
    """timm-layout tower state dict -> {dcvla key (tower-relative): (source key, tensor)}."""
    out: dict[str, tuple[str, torch.Tensor]] = {}
    params, attn = _BLOCK_PARAMS[cfg.name], _ATTN[cfg.name]
    for key, value in sd.items():
        block = re.match(r"^blocks\.(\d+)\.(.+)$", key)
        if block:
            index, rest = int(block.group(1)), block.group(2)
            if index >= cfg.num_layers_run:
                unused.append(key)  # the last block: its output is never used
            elif rest in ("attn.qkv.weight", "attn.qkv.bias"):
                kind = rest.rsplit(".", 1)[1]
                for name, part in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3, dim=0)):
                    out[f"blocks.{index}.{attn}.{name}.{kind}"] = (key, part)
            else:  # an unknown name passes through unchanged and is reported as unexpected
                out[f"blocks.{index}.{params.get(rest, rest)}"] = (key, value)
        elif key == "pos_embed":
            if cfg.name == "dino":  # transformers' DINOv2 has a cls slot; timm's no_embed_class pos_embed does not
                value = torch.cat([value.new_zeros(1, 1, value.shape[-1]), value], dim=1)
                out["embeddings.position_embeddings"] = (key, value)
            else:
                out["embeddings.position_embedding.weight"] = (key, value.reshape(-1, value.shape[-1]))
        elif key in _EMBED_PARAMS[cfg.name]:
            out[_EMBED_PARAMS[cfg.name][key]] = (key, value)
        elif _UNUSED_TOWER_KEYS.match(key):
            unused.append(key)
        else:
            out[key] = (key, value)  # unknown: reported as unexpected
    return out


def from_openvla_layout(state_dict: dict[str, torch.Tensor], config: OpenVLAConfig) -> tuple[dict[str, tuple[str, torch.Tensor]], list[str]]:
    """OpenVLA-layout state dict -> ({dcvla key: (checkpoint key, tensor)}, checkpoint keys known to be unused)."""
    mapped: dict[str, tuple[str, torch.Tensor]] = {}
    unused: list[str] = []
    towers: dict[str, dict[str, torch.Tensor]] = {"dino": {}, "siglip": {}}
    for key, value in state_dict.items():
        tower = next((name for name, prefix in TOWER_PREFIX.items() if key.startswith(prefix)), None)
        if tower:
            towers[tower][key[len(TOWER_PREFIX[tower]):]] = value
        else:
            mapped[key] = (key, value)
    for name, cfg in (("dino", config.dino), ("siglip", config.siglip)):
        local_unused: list[str] = []
        for key, (source, value) in _tower_from_openvla(cfg, towers[name], local_unused).items():
            mapped[TOWER_PREFIX[name] + key] = (TOWER_PREFIX[name] + source, value)
        unused += [TOWER_PREFIX[name] + key for key in local_unused]
    return mapped, unused


def to_openvla_layout(model: OpenVLA) -> dict[str, torch.Tensor]:
    """dcvla model -> state dict in OpenVLA's key layout (the blocks that run; unused parts are not invented)."""
    out: dict[str, torch.Tensor] = {}
    inverse = {tower: {h: t for t, h in _EMBED_PARAMS[tower].items()} for tower in TOWER_PREFIX}
    inverse_block = {tower: {h: t for t, h in _BLOCK_PARAMS[tower].items()} for tower in TOWER_PREFIX}
    state = model.state_dict()
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


# --------------------------------------------------------------------------------------------------- files
def _refuse_pickle(path: Path) -> None:
    raise CheckpointError(
        f"refusing to load {path}: pickle checkpoints can execute code when loaded; convert it to safetensors "
        "(e.g. safetensors.torch.save_file(torch.load(f, weights_only=True), 'model.safetensors'))"
    )


def checkpoint_files(path: str | os.PathLike) -> list[Path]:
    """The safetensors files of a checkpoint: a single file, a directory's index shards, or model.safetensors."""
    path = Path(path)
    if path.is_file():
        if path.suffix in PICKLE_SUFFIXES:
            _refuse_pickle(path)
        if path.suffix != ".safetensors":
            raise CheckpointError(f"{path} is not a .safetensors file")
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"no checkpoint at {path}")
    index = path / INDEX_FILE
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = [path / name for name in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.exists()]
        if missing:
            raise CheckpointError(f"{index} lists shards that are not in {path}: {', '.join(missing)}")
        return files
    shards = sorted(path.glob("*.safetensors"))
    if shards:
        return shards
    pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        _refuse_pickle(path / pickles[0])
    raise CheckpointError(f"no .safetensors weights in {path}")


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """All tensors of a (sharded) safetensors checkpoint, on the CPU in their stored dtype."""
    state: dict[str, torch.Tensor] = {}
    for file in checkpoint_files(path):
        with safe_open(file, framework="pt") as f:
            for key in f.keys():
                if key in state:
                    raise CheckpointError(f"key {key} appears in two shards (second: {file.name})")
                state[key] = f.get_tensor(key)
    return state


def load_openvla_state_dict(model: OpenVLA, state_dict: dict[str, torch.Tensor]) -> list[str]:
    """Copy an OpenVLA-layout state dict into `model`, strictly.

    Returns:
        The checkpoint keys that were present but are unused by design (last blocks, final norms, pool head).
    Raises:
        CheckpointError: naming every missing key, unexpected key and shape mismatch (in checkpoint names).
    """
    mapped, unused = from_openvla_layout(state_dict, model.config)
    expected = model.state_dict()
    missing = [key for key in expected if key not in mapped and key not in _MODEL_ONLY_KEYS]
    unexpected = sorted(source for key, (source, _) in mapped.items() if key not in expected)
    misshapen = sorted(
        f"{source}: checkpoint {tuple(value.shape)}, model expects {tuple(expected[key].shape)}"
        for key, (source, value) in mapped.items()
        if key in expected and value.shape != expected[key].shape
    )
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys: {', '.join(missing[:20])}{' ...' if len(missing) > 20 else ''}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys: {', '.join(unexpected[:20])}{' ...' if len(unexpected) > 20 else ''}")
    if misshapen:
        problems.append(f"{len(misshapen)} shape mismatches: {'; '.join(misshapen[:20])}")
    if problems:
        raise CheckpointError(f"checkpoint does not fit preset {model.config.name!r}: " + " | ".join(problems))
    with torch.no_grad():
        for key, (_, value) in mapped.items():
            expected[key].copy_(value.to(expected[key].dtype))
    return unused


def resolve_checkpoint_dir(path_or_id: str | os.PathLike) -> Path:
    """A local directory as is; otherwise a hub id, downloaded (safetensors and json only) unless offline."""
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
        return Path(snapshot_download(name, allow_patterns=["*.safetensors", "*.json", "tokenizer.model"]))
    except Exception as err:  # network, auth, missing repo: say which id failed and why
        raise FileNotFoundError(f"could not fetch {name} from the hub: {type(err).__name__}: {err}") from err


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
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    attn_implementation: str = "sdpa",
) -> OpenVLA:
    """Build the model for `preset` and load an OpenVLA-layout safetensors checkpoint into it.

    Args:
        path_or_id: a checkpoint directory or .safetensors file, or a hub id (fetched only when online).
        preset: a preset name or config; None reads it from the checkpoint (dcvla_config.json or config.json).
        dtype, device: where the weights end up (checkpoints are usually bfloat16 on disk).
        attn_implementation: transformers attention backend.
    Returns:
        The model in eval mode, with `model.norm_stats` from dataset_statistics.json.
    """
    directory = resolve_checkpoint_dir(path_or_id)
    folder = directory if directory.is_dir() else directory.parent
    config = preset if isinstance(preset, OpenVLAConfig) else get_preset(preset or detect_preset(folder))
    with torch.device("meta"):
        model = OpenVLA(config, attn_implementation)
    model = model.to_empty(device=device).to(dtype)
    _init_buffers(model)
    load_openvla_state_dict(model, read_state_dict(directory))
    model.norm_stats = read_norm_stats(folder)
    return model.eval()


def _init_buffers(model: OpenVLA) -> None:
    """Give a model built on the meta device the tensors no checkpoint carries.

    `to_empty` leaves non-persistent buffers uninitialised: RoPE's inverse frequencies (rebuilt in float32, as
    transformers keeps them) and SigLIP's position ids. DINOv2's unused mask token is zeroed, as at construction.
    """
    llama = model.language_model.model
    device = llama.embed_tokens.weight.device
    llama.rotary_emb = type(llama.rotary_emb)(llama.config).to(device)
    with torch.no_grad():
        model.vision_backbone.featurizer.embeddings.mask_token.zero_()
        siglip = model.vision_backbone.fused_featurizer.embeddings
        siglip.position_ids.copy_(torch.arange(siglip.position_ids.shape[-1], device=device)[None])


def save_pretrained(model: OpenVLA, directory: str | os.PathLike, max_shard_bytes: int = 2 * 1024**3, dtype: torch.dtype | None = torch.bfloat16) -> Path:
    """Write `model` as an OpenVLA-layout checkpoint: sharded safetensors + index, dataset statistics, preset.

    Every file is written atomically. `dtype` (default bfloat16, as published) of None keeps the model's.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).contiguous().cpu()
             for k, v in to_openvla_layout(model).items()}
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, value in state.items():
        nbytes = value.numel() * value.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = value
        size += nbytes
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        with atomic_path(directory / name) as tmp:
            save_file(shard, str(tmp), metadata={"format": "pt"})
        weight_map |= {key: name for key in shard}
    total = sum(v.numel() * v.element_size() for v in state.values())
    files = {
        INDEX_FILE: {"metadata": {"total_size": total}, "weight_map": weight_map},
        STATS_FILE: model.norm_stats,
        DCVLA_CONFIG_FILE: {"preset": model.config.name},
    }
    for name, content in files.items():
        with atomic_path(directory / name) as tmp:
            tmp.write_text(json.dumps(content, indent=2))
    return directory
