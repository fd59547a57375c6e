"""What the ViT and LLM caches share: the per-episode K/V store, the per-layer row plan, the attention core.

A cross-frame cache keeps, per layer and token slot, the K and V (and, for Q reuse, Q) last computed fresh, and
the frame that computed them. A layer plan says which rows a layer carries and, for each, whether its Q and K/V
are projected now or taken from the store. Rows a layer does not carry are neither projected nor updated:
their K/V come from the store, and that skipped work is the saving.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from .flops import LayerWork


class KVStore:
    """Per-episode K/V(/Q) buffers for `num_slots` token slots of every layer, with one mutator, `update`.

    Shapes: keys/values [layer, kv_head, slot, head_dim]; queries [layer, head, slot, head_dim] (optional);
    computed_at [layer, slot] = frame index of the last fresh computation (-1: never).
    """

    def __init__(self, num_layers: int, num_slots: int, num_heads: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device, store_queries: bool = False) -> None:
        self.keys = torch.zeros(num_layers, num_kv_heads, num_slots, head_dim, dtype=dtype, device=device)
        self.values = torch.zeros_like(self.keys)
        self.queries = (torch.zeros(num_layers, num_heads, num_slots, head_dim, dtype=dtype, device=device)
                        if store_queries else None)
        self.computed_at = torch.full((num_layers, num_slots), -1, dtype=torch.long, device=device)

    @property
    def num_slots(self) -> int:
        return self.keys.shape[2]

    def update(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor, frame: int,
               q: torch.Tensor | None = None) -> None:
        """Store fresh k/v [kv_head, len(slots), head_dim] (and q [head, len(slots), head_dim]) for `slots`."""
        if slots.numel() == 0:
            return
        self.keys[layer, :, slots] = k
        self.values[layer, :, slots] = v
        if self.queries is not None and q is not None:
            self.queries[layer, :, slots] = q
        self.computed_at[layer, slots] = frame

    def is_filled(self, layer: int, slots: torch.Tensor) -> bool:
        return bool((self.computed_at[layer, slots] >= 0).all())

    def staleness(self, frame: int) -> torch.Tensor:
        """[layer, slot]: frames since each slot's K/V were last computed (frame + 1 if never)."""
        return frame - self.computed_at


@dataclass
class LayerPlan:
    """Which rows one layer carries (token slots, sorted) and which of them project Q and K/V now."""

    rows: torch.Tensor      # [row] long: token slots whose hidden states this layer computes
    kv_fresh: torch.Tensor  # [row] bool: project K/V now (else take them from the store)
    q_fresh: torch.Tensor   # [row] bool: project Q now (else take it from the store: Q reuse)

    @classmethod
    def full(cls, num_tokens: int, device: torch.device | None = None) -> "LayerPlan":
        rows = torch.arange(num_tokens, device=device)
        ones = torch.ones(num_tokens, dtype=torch.bool, device=device)
        return cls(rows, ones, ones.clone())

    def work(self, num_keys: int) -> LayerWork:
        return LayerWork(q_rows=int(self.rows.numel()), kv_rows=int(self.kv_fresh.sum()), keys=num_keys)


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
