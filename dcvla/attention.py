"""The attention pieces every family's custom layer loop shares: Q/K/V projection of chosen rows, gathering
fresh and stored K/V into one sequence, and the attention core.

A layer loop runs transformers' own submodules (projections, norms, MLPs) but only on the rows a `LayerPlan`
carries; these helpers are where those rows meet the store. None of them reads the device: row choices arrive as
index tensors (or None for every row), so a layer costs no host-device synchronisation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .kv_store import KVStore


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """transformers' Llama/Gemma `rotate_half`: (x1, x2) -> (-x2, x1) along the last dim."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE of x [1, head, row, head_dim] with cos/sin [1, row, head_dim]: transformers' `apply_rotary_pos_emb`
    for one tensor (the same operations, so the same values)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return (x * cos) + (rotate_half(x) * sin)


def _pick(t: torch.Tensor, index: torch.Tensor | None) -> torch.Tensor:
    """Rows `index` of t [1, row, ...] (None: every row, no copy)."""
    return t if index is None else t[:, index]


def project_qkv(attn_mod, x: torch.Tensor, q_rows: torch.Tensor | None, kv_rows: torch.Tensor | None, cos: torch.Tensor,
                sin: torch.Tensor, heads: int, kv_heads: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q of `q_rows` and K/V of `kv_rows` of x [sample, row, width] (one sample at inference, a batch in training),
    RoPE-rotated (cos/sin [1, row, head_dim]), with a Llama/Gemma attention module's projections. Rows are index
    tensors into x's rows, None for every row. Returns q [sample, head, q_row, head_dim], k/v [sample, kv_head,
    kv_row, head_dim]."""
    x_q = _pick(x, q_rows)
    x_kv = x_q if kv_rows is q_rows else _pick(x, kv_rows)
    samples = x.shape[0]
    q = attn_mod.q_proj(x_q).view(samples, -1, heads, head_dim).transpose(1, 2)
    k = attn_mod.k_proj(x_kv).view(samples, -1, kv_heads, head_dim).transpose(1, 2)
    v = attn_mod.v_proj(x_kv).view(samples, -1, kv_heads, head_dim).transpose(1, 2)
    q = rotate(q, _pick(cos, q_rows), _pick(sin, q_rows))
    k = rotate(k, _pick(cos, kv_rows), _pick(sin, kv_rows))
    return q, k, v


def gather_kv(store: KVStore | None, layer: int, num_tokens: int, fresh_slots: torch.Tensor,
              k_fresh: torch.Tensor, v_fresh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Full K/V [1, kv_head, num_tokens, head_dim]: fresh rows where computed, the store everywhere else.

    Slots beyond the store (the LLM's text positions) must all be fresh.
    """
    if fresh_slots.numel() == num_tokens:  # nothing reused: the fresh rows are every slot, in order
        return k_fresh, v_fresh
    n_store = store.num_slots
    keys = k_fresh.new_empty(1, k_fresh.shape[1], num_tokens, k_fresh.shape[-1])  # [1, kv_head, token, head_dim]
    values = torch.empty_like(keys)
    keys[0, :, :n_store] = store.keys[layer]
    values[0, :, :n_store] = store.values[layer]
    keys[:, :, fresh_slots] = k_fresh
    values[:, :, fresh_slots] = v_fresh
    return keys, values


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, mask: torch.Tensor | None,
           prob_rows: torch.Tensor | slice | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scaled dot-product attention of q [sample, head, row, head_dim] over k/v [sample, kv_head, key, head_dim]
    (grouped K/V heads: each serves head // kv_head consecutive query heads).

    Args:
        mask: [row, key] bool, True where a query may attend (None: all).
        prob_rows: rows (an index tensor or a slice of `row`) whose attention probabilities to return as well.
    Returns:
        output [sample, row, head * head_dim] and, if asked, the first sample's probabilities [head, len(prob_rows),
        key] (float32).
    """
    groups = q.shape[1] // k.shape[1]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=groups > 1)
    probs = None
    if prob_rows is not None and (isinstance(prob_rows, slice) or prob_rows.numel()):
        q_rows = q[0, :, prob_rows].float().contiguous()  # [head, prob_row, head_dim] (a slice: as an index copies)
        keys_t = k[0].float().transpose(-1, -2)  # [kv_head, head_dim, key]
        if groups > 1:  # each K/V head against its group of query heads, without copying K
            n = q_rows.shape[1]
            scores = (q_rows.reshape(k.shape[1], groups * n, -1) @ keys_t).view(q.shape[1], n, -1) * scale
        else:
            scores = (q_rows @ keys_t) * scale  # [head, prob_row, key]
        if mask is not None:
            scores = scores.masked_fill(~mask[prob_rows], float("-inf"))
        probs = scores.softmax(-1)
        if isinstance(prob_rows, slice) and probs.shape[1] == 0:
            probs = None
    return out.transpose(1, 2).reshape(q.shape[0], q.shape[2], q.shape[1] * q.shape[3]), probs  # rows may be 0
