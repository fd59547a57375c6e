"""The per-episode K/V store and the per-layer row plan that every family's cache shares.

A cross-frame cache keeps, per layer and token slot, the K and V (and, for Q reuse, Q) last computed fresh, and
the frame that computed them. A layer plan says which rows a layer carries and, for each, whether its Q and K/V
are projected now or taken from the store. Rows a layer does not carry are neither projected nor updated:
their K/V come from the store, and that skipped work is the saving.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

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
