"""The attention pieces every family's custom layer loop shares: Q/K/V projection of chosen rows, gathering
fresh and stored K/V into one sequence, and the attention core.

A layer loop runs transformers' own submodules (projections, norms, MLPs) but only on the rows a `LayerPlan`
carries; these helpers are where those rows meet the store.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from .kv_store import KVStore


def project_qkv(attn_mod, x: torch.Tensor, q_rows: torch.Tensor, kv_rows: torch.Tensor, cos: torch.Tensor,
                sin: torch.Tensor, heads: int, kv_heads: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q of `q_rows` and K/V of `kv_rows` of x [1, row, width], RoPE-rotated (cos/sin [1, row, head_dim]), with a
    Llama/Gemma attention module's projections. Returns q [1, head, q_row, head_dim], k/v [1, kv_head, kv_row, head_dim]."""
    q = attn_mod.q_proj(x[:, q_rows]).view(1, -1, heads, head_dim).transpose(1, 2)
    k = attn_mod.k_proj(x[:, kv_rows]).view(1, -1, kv_heads, head_dim).transpose(1, 2)
    v = attn_mod.v_proj(x[:, kv_rows]).view(1, -1, kv_heads, head_dim).transpose(1, 2)
    q, _ = apply_rotary_pos_emb(q, q, cos[:, q_rows], sin[:, q_rows])
    _, k = apply_rotary_pos_emb(k, k, cos[:, kv_rows], sin[:, kv_rows])
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
           prob_rows: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scaled dot-product attention of q [1, head, row, head_dim] over k/v [1, kv_head, key, head_dim].

    Args:
        mask: [row, key] bool, True where a query may attend (None: all).
        prob_rows: indices into `row` whose attention probabilities to return as well (recording).
    Returns:
        output [1, row, head * head_dim] and, if asked, probabilities [head, len(prob_rows), key] (float32).
    """
    groups = q.shape[1] // k.shape[1]
    if groups > 1:  # grouped K/V heads
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)  # [1, head, row, head_dim]
    probs = None
    if prob_rows is not None and prob_rows.numel():
        scores = (q[0, :, prob_rows].float() @ k[0].float().transpose(-1, -2)) * scale  # [head, prob_row, key]
        if mask is not None:
            scores = scores.masked_fill(~mask[prob_rows], float("-inf"))
        probs = scores.softmax(-1)
    return out.transpose(1, 2).reshape(1, q.shape[2], q.shape[1] * q.shape[3]), probs  # rows may be 0
