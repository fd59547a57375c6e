"""The ViT K/V cache: static patches attend with K and V from the store; Q is always projected fresh.

`run_tower` is the one custom block loop for both towers; it runs transformers' own submodules of each
DINOv2/SigLIP layer, but only on the rows a plan carries, and projects K/V only for the rows that need them.
When nothing downstream reads the static patches' outputs (the LLM takes those tokens from its own cache at
every layer), the plan drops them altogether: each layer then computes only prefix + dynamic rows.

The plan is decided on the host and its index tensors are made once per frame, so the block loop never reads
the device (no host-device synchronisation per block on a GPU).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..attention import attend, gather_kv
from ..flops import LayerWork
from ..kv_store import KVStore, LayerPlan
from .model import VisionTower


@dataclass
class TowerOutput:
    features: torch.Tensor      # [1, row, hidden]: patch tokens of the patches computed (no prefix)
    patches: torch.Tensor       # [row] long: which patches (0..255) those rows are
    work: list[LayerWork]       # per block: rows queried, rows projected to K/V, keys attended


def _block_parts(block: nn.Module) -> tuple:
    """(norm1, q, k, v, out, layer_scale1, norm2, mlp, layer_scale2) for a DINOv2 or SigLIP layer."""
    if hasattr(block, "attention"):  # Dinov2WithRegistersLayer
        a = block.attention
        return block.norm1, a.q_proj, a.k_proj, a.v_proj, a.o_proj, block.layer_scale1, block.norm2, block.mlp, block.layer_scale2
    a = block.self_attn  # SiglipEncoderLayer
    return block.layer_norm1, a.q_proj, a.k_proj, a.v_proj, a.out_proj, None, block.layer_norm2, block.mlp, None


def new_tower_store(tower: VisionTower, dtype: torch.dtype, device: torch.device) -> KVStore:
    cfg = tower.cfg
    head_dim = cfg.hidden_size // cfg.num_heads
    tokens = cfg.num_prefix_tokens + cfg.num_patches
    return KVStore(cfg.num_layers_run, tokens, cfg.num_heads, cfg.num_heads, head_dim, dtype, device)


def tower_plan(tower: VisionTower, static: torch.Tensor | np.ndarray | None, keep_static_rows: bool,
               device: torch.device | str | None = None) -> LayerPlan:
    """The plan for one frame: prefix and dynamic patches fresh; static patches take K/V from the store.

    Decided on the host: `static` is the selector's host-side mask, and the plan reaches the device in one copy.

    Args:
        static: [patch] bool on the host (a CPU tensor or an array), True = reuse cached K/V (None: everything
            fresh).
        keep_static_rows: compute the static patches' rows anyway (their outputs are read downstream, or
            `faithful` asks for the literal computation); otherwise they are dropped.
        device: where the plan's tensors go (default: `static`'s device, else the CPU).
    """
    prefix, patches = tower.num_prefix_tokens, tower.cfg.num_patches
    tokens = prefix + patches
    if device is None and isinstance(static, torch.Tensor):
        device = static.device
    if isinstance(static, torch.Tensor):
        static = (static if static.device.type == "cpu" else static.cpu()).numpy()  # the engine passes a host mask
    static = None if static is None else np.asarray(static, dtype=bool)
    if static is None or not static.any():
        return LayerPlan.full(tokens, device)
    fresh = np.concatenate([np.ones(prefix, dtype=bool), ~static])  # [token]
    rows = np.arange(tokens) if keep_static_rows else np.flatnonzero(fresh)
    kv_fresh = fresh[rows]
    return LayerPlan.from_host(rows, kv_fresh, np.ones_like(kv_fresh), device)


@torch.inference_mode()
def run_tower(tower: VisionTower, pixel_values: torch.Tensor, plan: LayerPlan, store: KVStore | None, frame: int,
              observer=None) -> TowerOutput:
    """Run every block of `tower` under `plan`, reading and refreshing `store`.

    Args:
        pixel_values: [1, 3, H, W] this tower's normalised pixels.
        plan: rows to compute and which of them project K/V (the same at every block).
        store: the episode's K/V store (None: nothing reused and nothing kept).
        frame: this frame's index in the episode (recorded with each fresh K/V).
        observer: optional `on_layer(component, layer, rows, q, keys, values)` receiver of the Q of the rows
            computed and the full K/V attended ([1, head, row|token, head_dim]), as used (recording, drift).
    """
    cfg = tower.cfg
    heads, head_dim = cfg.num_heads, cfg.hidden_size // cfg.num_heads
    prefix = tower.num_prefix_tokens
    hidden = tower.embed(pixel_values)  # [1, token, hidden]
    tokens = hidden.shape[1]
    hidden = hidden if plan.rows.numel() == tokens else hidden[:, plan.rows]  # [1, row, hidden]
    kv_index, fresh_rows = plan.kv_index, plan.kv_slots  # [kv_row]: into the rows (None: all), token slots
    if store is None and plan.n_kv != tokens:
        raise ValueError("a plan that reuses K/V needs a store")
    if plan.count_below(prefix) != prefix:
        raise ValueError(f"a tower plan must carry the {prefix} prefix tokens (its features are the rows after them)")
    work = []
    for layer, block in enumerate(tower.blocks):
        norm1, q_proj, k_proj, v_proj, out_proj, ls1, norm2, mlp, ls2 = _block_parts(block)
        x = norm1(hidden)  # [1, row, hidden]
        q = q_proj(x).view(1, -1, heads, head_dim).transpose(1, 2)  # [1, head, row, head_dim]
        x_kv = x if kv_index is None else x[:, kv_index]  # [1, kv_row, hidden]
        k = k_proj(x_kv).view(1, -1, heads, head_dim).transpose(1, 2)  # [1, head, kv_row, head_dim]
        v = v_proj(x_kv).view(1, -1, heads, head_dim).transpose(1, 2)
        keys, values = gather_kv(store, layer, tokens, fresh_rows, k, v)  # [1, head, token, head_dim]
        if store is not None:
            store.update(layer, fresh_rows, k[0], v[0], frame)
        if observer is not None:
            observer.on_layer(cfg.name, layer, plan.rows, q, keys, values)
        attn, _ = attend(q, keys, values, head_dim**-0.5, None)  # [1, row, hidden]
        attn = out_proj(attn)
        hidden = hidden + (ls1(attn) if ls1 is not None else attn)
        mlp_out = mlp(norm2(hidden))
        hidden = hidden + (ls2(mlp_out) if ls2 is not None else mlp_out)
        work.append(plan.work(tokens))
    # rows are sorted and carry every prefix token: the patch rows are the ones after them
    return TowerOutput(hidden[:, prefix:], plan.rows[prefix:] - prefix, work)
