"""The per-episode K/V store and the per-layer row plan that every family's cache shares.

A cross-frame cache keeps, per layer and token slot, the K and V (and, for Q reuse, Q) last computed fresh, and
the frame that computed them. A layer plan says which rows a layer carries and, for each, whether its Q and K/V
are projected now or taken from the store. Rows a layer does not carry are neither projected nor updated:
their K/V come from the store, and that skipped work is the saving.

A plan keeps a host copy of its rows and masks beside the device tensors, so that a layer loop decides shapes
(how many rows project K/V, which are stored) without reading the device, and its index tensors are made once
per plan, not per layer: on a GPU every such read is a host-device synchronisation.
"""

from __future__ import annotations

import numpy as np
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

    def put(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor, frame: int) -> None:
        """`update` from the projections' layout: k/v [1, kv_head, len(slots), head_dim] of the one sample."""
        if k.shape[0] != 1:
            raise ValueError(f"a KVStore holds one sequence; got K/V of {k.shape[0]} samples (training: BatchKV)")
        self.update(layer, slots, k[0], v[0], frame)

    def layer_kv(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer `layer`'s K and V [1, kv_head, slot, head_dim] (views of the store)."""
        return self.keys[layer][None], self.values[layer][None]

    def is_filled(self, layer: int, slots: torch.Tensor) -> bool:
        return bool((self.computed_at[layer, slots] >= 0).all())

    def staleness(self, frame: int) -> torch.Tensor:
        """[layer, slot]: frames since each slot's K/V were last computed (frame + 1 if never)."""
        return frame - self.computed_at


class BatchKV:
    """A prefix's K/V for a batch of samples that reuse nothing (training): every layer's post-RoPE K and V
    [sample, kv_head, slot, head_dim] as the layer projected them, kept by reference (no copy into a buffer, so
    gradients flow straight to the projections). It answers the `put` / `layer_kv` / `num_slots` that a prefix pass
    and the expert ask of a `KVStore`."""

    def __init__(self, num_layers: int, num_slots: int) -> None:
        self.num_slots = num_slots
        self.layers: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * num_layers

    def put(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor, frame: int) -> None:
        """Keep k/v [sample, kv_head, slot, head_dim] of every slot (a batch computes every row of its prefix)."""
        if k.shape[2] != self.num_slots or v.shape != k.shape:
            raise ValueError(f"BatchKV keeps every slot's K/V: got K {tuple(k.shape)}, V {tuple(v.shape)} for "
                             f"{self.num_slots} slots")
        self.layers[layer] = (k, v)

    def layer_kv(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer `layer`'s K and V [sample, kv_head, slot, head_dim]."""
        kv = self.layers[layer]
        if kv is None:
            raise ValueError(f"layer {layer}'s K/V were never put: run the prefix first")
        return kv


def to_device(array: np.ndarray, device: torch.device | str | None) -> torch.Tensor:
    """A host array as a tensor on `device`; to a GPU through pinned memory without blocking (a plain copy of
    pageable memory would wait for every kernel queued before it)."""
    tensor = torch.from_numpy(np.ascontiguousarray(array))
    device = torch.device("cpu") if device is None else torch.device(device)
    if device.type == "cpu":
        return tensor
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


class LayerPlan:
    """Which rows one layer carries (token slots, sorted) and which of them project Q and K/V now.

    Attributes:
        rows: [row] long: token slots whose hidden states this layer computes.
        kv_fresh: [row] bool: project K/V now (else take them from the store).
        q_fresh: [row] bool: project Q now (else take it from the store: Q reuse).
    The plan's host copy (`host`) and its index tensors (`kv_index`, ...) serve the layer loops. A plan built from
    host arrays (`from_host`, `full`) has them without reading the device; one built from device tensors reads them
    once, on first use.
    """

    def __init__(self, rows: torch.Tensor, kv_fresh: torch.Tensor, q_fresh: torch.Tensor,
                 host: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None) -> None:
        self.rows, self.kv_fresh, self.q_fresh = rows, kv_fresh, q_fresh
        self._host = host
        self._index: dict[str, torch.Tensor | None] | None = None

    def __repr__(self) -> str:
        return f"LayerPlan(rows={self.rows.numel()}, kv_fresh={self.n_kv}, q_fresh={self.n_q})"

    @classmethod
    def full(cls, num_tokens: int, device: torch.device | None = None) -> "LayerPlan":
        rows = torch.arange(num_tokens, device=device)
        ones = torch.ones(num_tokens, dtype=torch.bool, device=device)
        host_ones = np.ones(num_tokens, dtype=bool)
        return cls(rows, ones, ones.clone(), host=(np.arange(num_tokens), host_ones, host_ones))

    @classmethod
    def from_host(cls, rows: np.ndarray, kv_fresh: np.ndarray, q_fresh: np.ndarray,
                  device: torch.device | str | None) -> "LayerPlan":
        """A plan decided on the host: the rows, both masks and every index tensor reach `device` in one copy."""
        rows = np.asarray(rows, dtype=np.int64)
        kv_fresh, q_fresh = np.asarray(kv_fresh, dtype=bool), np.asarray(q_fresh, dtype=bool)
        host = (rows, kv_fresh, q_fresh)
        index = _host_indices(*host)
        parts = [rows, kv_fresh, q_fresh, *(a for a in index.values() if a is not None)]
        flat = to_device(np.concatenate([a.astype(np.int64) for a in parts]), device)  # [sum of lengths]
        views = iter(torch.split(flat, [len(a) for a in parts]))
        plan = cls(next(views), next(views).bool(), next(views).bool(), host=host)
        plan._index = {name: None if a is None else next(views) for name, a in index.items()}
        return plan

    # ----------------------------------------------------------------------------------- host-side facts
    @property
    def host(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(rows, kv_fresh, q_fresh) as numpy arrays (read from the device once for a plan built there)."""
        if self._host is None:
            packed = torch.stack([self.rows.long(), self.kv_fresh.long(), self.q_fresh.long()]).cpu().numpy()
            self._host = (packed[0], packed[1].astype(bool), packed[2].astype(bool))
        return self._host

    @property
    def n_kv(self) -> int:
        """Rows that project K/V now."""
        return int(self.host[1].sum())

    @property
    def n_q(self) -> int:
        """Rows that project Q now."""
        return int(self.host[2].sum())

    def count_below(self, slot: int, fresh_kv_only: bool = False) -> int:
        """Rows (of the K/V-fresh rows, with `fresh_kv_only`) at token slots below `slot`."""
        rows, kv_fresh, _ = self.host
        return int(np.searchsorted(rows[kv_fresh] if fresh_kv_only else rows, slot))

    # ------------------------------------------------------------------------------------ index tensors
    def _indices(self) -> dict[str, torch.Tensor | None]:
        if self._index is None:
            device = self.rows.device
            self._index = {name: None if a is None else to_device(a, device)
                           for name, a in _host_indices(*self.host).items()}
        return self._index

    @property
    def kv_index(self) -> torch.Tensor | None:
        """[kv_row] long: positions in `rows` that project K/V (None: every row)."""
        return self._indices()["kv_index"]

    @property
    def kv_slots(self) -> torch.Tensor:
        """[kv_row] long: token slots that project K/V, ascending."""
        slots = self._indices()["kv_slots"]
        return self.rows if slots is None else slots

    @property
    def q_index(self) -> torch.Tensor | None:
        """[q_row] long: positions in `rows` that project Q (None: every row)."""
        return self._indices()["q_index"]

    @property
    def q_cached_index(self) -> torch.Tensor | None:
        """Positions in `rows` whose Q comes from the store (None: none)."""
        return self._indices()["q_cached_index"]

    @property
    def q_cached_slots(self) -> torch.Tensor | None:
        """Token slots whose Q comes from the store (None: none)."""
        return self._indices()["q_cached_slots"]

    def work(self, num_keys: int) -> LayerWork:
        return LayerWork(q_rows=int(self.rows.numel()), kv_rows=self.n_kv, keys=num_keys)


def _host_indices(rows: np.ndarray, kv_fresh: np.ndarray, q_fresh: np.ndarray) -> dict[str, np.ndarray | None]:
    """The index arrays of a plan; None where a mask is all True (every row: no index needed)."""
    kv_all, q_all = bool(kv_fresh.all()), bool(q_fresh.all())
    return {
        "kv_index": None if kv_all else np.flatnonzero(kv_fresh),
        "kv_slots": None if kv_all else rows[kv_fresh],
        "q_index": None if q_all else np.flatnonzero(q_fresh),
        "q_cached_index": None if q_all else np.flatnonzero(~q_fresh),
        "q_cached_slots": None if q_all else rows[~q_fresh],
    }
