"""Which OpenVLA-family policy a preset or a checkpoint is: OpenVLA (`CachedPolicy`) or OpenVLA-OFT
(`OFTCachedPolicy`), and the vanilla policy of either, placed on a device in a dtype (what studies and benchmarks
share every method's model through, with `with_config`).

A checkpoint is OpenVLA-OFT when its directory holds the OFT heads (`action_head--*.pt`, `proprio_projector--*.pt`),
as the published `moojink/openvla-7b-oft-finetuned-libero-*` do; otherwise it is read as OpenVLA's layout.
"""

from __future__ import annotations

import os

import torch

from ..devices import place
from .cache_policy import CachePolicyBase
from .checkpoint import OFT_PATTERNS, is_oft_checkpoint, resolve_checkpoint_dir
from .config import PRESETS as OPENVLA_PRESETS
from .methods import CacheConfig
from .oft import PRESETS as OFT_PRESETS
from .oft import OFTCachedPolicy
from .policy import CachedPolicy

PRESETS = (*OPENVLA_PRESETS, *OFT_PRESETS)  # every OpenVLA-family preset name


def check_preset(name: str) -> None:
    """A ValueError naming the known presets of both models when `name` is none of them."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; OpenVLA presets: {', '.join(OPENVLA_PRESETS)}; "
                         f"OpenVLA-OFT presets: {', '.join(OFT_PRESETS)}")


def policy_type(preset: str = "", checkpoint: str | os.PathLike = "") -> type[CachePolicyBase]:
    """`OFTCachedPolicy` for an OpenVLA-OFT preset or checkpoint (a checkpoint is resolved, and fetched when it is a
    hub id), else `CachedPolicy`."""
    if checkpoint:
        return OFTCachedPolicy if is_oft_checkpoint(resolve_checkpoint_dir(checkpoint, OFT_PATTERNS)) else CachedPolicy
    check_preset(preset)
    return OFTCachedPolicy if preset in OFT_PRESETS else CachedPolicy


def vanilla_policy(preset: str = "small", checkpoint: str | os.PathLike = "", unnorm_key: str | None = None,
                   seed: int = 0, dtype: torch.dtype = torch.float32, device: str = "cpu") -> CachePolicyBase:
    """The `vanilla` policy of a checkpoint (loaded strictly in `dtype` on `device`), or of a preset's random
    weights (seeded; RoPE's inverse frequencies stay float32 when placed). Other methods: `with_config`."""
    if checkpoint:
        directory = resolve_checkpoint_dir(checkpoint, OFT_PATTERNS)  # once: a hub id is fetched here, not twice
        cls = policy_type(checkpoint=directory)
        return cls.from_pretrained(directory, CacheConfig("vanilla", unnorm_key=unnorm_key), dtype=dtype, device=device)
    policy = policy_type(preset).from_preset(preset, seed=seed, config=CacheConfig("vanilla", unnorm_key=unnorm_key))
    place(policy.model, device, dtype)
    return policy
