"""The LLM side of cross-frame caching: a prefill that reuses static vision tokens' K/V (and Q) per layer.

`prefill` is the one custom decoder loop: it runs transformers' own Llama submodules on the rows each layer
carries. A row absent from a layer is not computed at all; its K/V come from the store. Other tokens read a token
only through its K and V, so a static vision token whose K and V come from the store at EVERY layer is never read
through its own hidden state, and the fast path drops it from the first layer (hypothesis H1 of the design tests
this against computing it with a cached or a fresh Q). That holds under causal attention (OpenVLA) and under
bidirectional attention (OpenVLA-OFT, `causal=False`) alike; what bidirectional attention changes is that every
token's K/V, BOS's too, depend on tokens after it, so only the policy decides what may stay cached. Rows keep their
absolute positions: RoPE rotates fresh Q/K at the same positions the cached keys were rotated at, and the causal
mask compares absolute positions.

OpenVLA decodes its action tokens after the prefill: the filled K/V of every position go into a transformers
`DynamicCache`, so decoding is the plain transformers forward, and the prefill returns the last position's logits.
OpenVLA-OFT decodes nothing: the prefill returns the final-norm hidden states of the positions its head reads
(`PrefillRequest.readout`) and keeps no `DynamicCache`.

The loop never reads the device: each plan holds its rows on the host (counts, which rows are stored, which are
text) and its index tensors, made once per plan, so a layer costs no host-device synchronisation on a GPU.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from transformers import DynamicCache, LlamaForCausalLM

from ..attention import attend, gather_kv, project_qkv
from ..flops import LayerWork
from ..kv_store import KVStore, LayerPlan
from .vla_cache import attention_entropy


@dataclass
class PrefillOutput:
    logits: torch.Tensor | None          # [1, vocab]: at the last position (set when the prefill ends; no readout)
    cache: DynamicCache | None           # K/V of every position, every layer, for decoding (None: not kept)
    work: list[LayerWork]                # per layer
    text_probs: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [head, text, seq] float32
    entropy: dict[int, torch.Tensor] = field(default_factory=dict)     # layer -> mean attention entropy (0-dim,
                                                                       # on the device: read with the frame's other values)
    hidden: torch.Tensor | None = None   # [1, readout position, hidden]: final-norm states (`PrefillRequest.readout`)


def new_llm_store(lm: LlamaForCausalLM, num_slots: int, store_queries: bool) -> KVStore:
    """A store for slots 0..num_slots-1 (BOS + vision tokens), every layer."""
    cfg = lm.config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    weight = lm.model.embed_tokens.weight
    return KVStore(cfg.num_hidden_layers, num_slots, cfg.num_attention_heads, cfg.num_key_value_heads, head_dim,
                   weight.dtype, weight.device, store_queries)


@dataclass
class PrefillRequest:
    """What a prefill reads and writes besides the embeddings: the store, what to capture, who observes."""

    store: KVStore | None                                 # BOS + vision slots (None: every position fresh, none kept)
    frame: int                                            # this frame's index (recorded with each fresh K/V)
    text_start: int                                       # first prompt position (1 + number of vision tokens)
    prob_layers: frozenset[int] = frozenset()             # layers whose text-row attention probabilities to return
    entropy_layers: frozenset[int] = frozenset()          # layers whose mean attention entropy to return (VLA-Cache)
    entropy_dtype: torch.dtype = torch.float32            # the dtype the entropy is computed in (upstream: the model's)
    observer: object | None = None                        # `on_layer("llm", layer, rows, q, keys, values)` receiver
    causal: bool = True                                   # False: every position attends to every other (OFT)
    readout: slice | None = None                          # positions whose final-norm states to return instead of the
                                                          # last position's logits (OFT's action head input)
    keep_cache: bool = True                               # fill a DynamicCache for decoding (OpenVLA)


def vla_cache_plans(num_layers: int, seq_len: int, num_vision: int, llm_skip: torch.Tensor | None,
                    device: torch.device) -> tuple[list[LayerPlan], torch.Tensor]:
    """VLA-Cache: a layer's skipped vision rows are dropped (no Q, no K/V, no MLP); their K/V are the store's.

    Made on the host from the host-side schedule `llm_skip` ([layer, vision] bool, None: nothing skipped); a layer
    whose rows are the previous layer's shares its plan. Returns (plans, llm_skip as [layer, vision] bool)."""
    skip = llm_skip.numpy() if llm_skip is not None else np.zeros((num_layers, num_vision), dtype=bool)
    plans: list[LayerPlan] = []
    for layer in range(num_layers):
        if layer and np.array_equal(skip[layer], skip[layer - 1]):
            plans.append(plans[-1])
            continue
        keep = np.ones(seq_len, dtype=bool)
        keep[1 : 1 + num_vision] = ~skip[layer]
        rows = np.flatnonzero(keep)
        ones = np.ones(len(rows), dtype=bool)
        plans.append(LayerPlan.from_host(rows, ones, ones, device))
    return plans, torch.from_numpy(skip)


def mask_plans(llm_method: str, num_layers: int, seq_len: int, num_vision: int, static: np.ndarray | None,
               bos_static: bool, faithful: bool, device: torch.device) -> tuple[list[LayerPlan], torch.Tensor]:
    """One mask at every layer: static vision tokens' K/V ("kv") or Q/K/V ("kqv") from the store; "full": nothing.

    One plan, made on the host from the selectors' host-side mask `static` ([vision] bool, None: nothing static),
    serves every layer. With "kqv" the static rows are dropped unless `faithful` (then their Q comes from the
    store). `bos_static`: BOS's K/V come from the store too (only when static tokens do). Returns (plans, [layer,
    vision] bool reuse)."""
    reuse = np.zeros((num_layers, num_vision), dtype=bool)  # [layer, vision]
    slot_static = np.zeros(seq_len, dtype=bool)  # [seq]: K/V from the store
    if llm_method in ("kqv", "kv") and static is not None and static.any():
        reuse[:] = static
        slot_static[1 : 1 + num_vision] = static
        slot_static[0] = bos_static
    drop = llm_method == "kqv" and not faithful
    rows = np.flatnonzero(~slot_static) if drop else np.arange(seq_len)
    kv_fresh = ~slot_static[rows]
    q_fresh = kv_fresh.copy() if llm_method == "kqv" else np.ones_like(kv_fresh)
    return [LayerPlan.from_host(rows, kv_fresh, q_fresh, device)] * num_layers, torch.from_numpy(reuse)


@torch.inference_mode()
def prefill(lm: LlamaForCausalLM, embeds: torch.Tensor, seq_len: int, plans: list[LayerPlan],
            request: PrefillRequest) -> PrefillOutput:
    """Run the Llama prefill under per-layer plans.

    Args:
        embeds: [1, row, hidden] input embeddings of the rows the first layer carries (plans[0].rows, sorted
            absolute positions).
        seq_len: the full sequence length (OpenVLA: BOS + vision + prompt); the last position must be carried
            everywhere.
        plans: one per layer; each layer's rows are a subset of the previous layer's (dropped rows stay dropped).
        request: the store, the frame, what to capture (text-row probabilities, VLA-Cache's entropy: it needs the
            full probability matrix, as upstream's eager attention gives it) and the observer.
    """
    model = lm.model
    if len(plans) != len(model.layers):
        raise ValueError(f"{len(plans)} layer plans for {len(model.layers)} layers")
    last_rows = plans[-1].host[0]
    if not len(last_rows) or int(last_rows[-1]) != seq_len - 1:
        raise ValueError("the last position must be computed at every layer (its logits choose the first action token)")
    hidden, rows = embeds, plans[0].rows  # [1, row, hidden], [row]
    mask = rows[:, None] >= torch.arange(seq_len, device=embeds.device)[None, :] if request.causal else None  # [row, seq]
    out = PrefillOutput(None, DynamicCache(config=lm.config) if request.keep_cache else None, [])
    for layer, (block, plan) in enumerate(zip(model.layers, plans)):
        if plan.rows.numel() != rows.numel():  # rows dropped from this layer on (a subset of the previous rows)
            kept = torch.searchsorted(rows, plan.rows)  # [row]: where this layer's rows sit among the previous'
            hidden, rows = hidden[:, kept], plan.rows
            mask = None if mask is None else mask[kept]
        hidden = _layer(lm, layer, block, plan, hidden, mask, seq_len, request, out)
    if request.readout is None:
        out.logits = lm.lm_head(model.norm(hidden[:, -1:]))[:, -1].float()  # [1, vocab]
    else:
        out.hidden = model.norm(hidden[:, _readout_rows(plans[-1], request.readout)])  # [1, readout position, hidden]
    return out


def _readout_rows(plan: LayerPlan, positions: slice) -> slice:
    """The last layer's rows of `positions` (a range every layer carries; rows are sorted, so they are a slice)."""
    start, stop = plan.count_below(positions.start), plan.count_below(positions.stop)
    if stop - start != positions.stop - positions.start:
        raise ValueError(f"the readout positions {positions.start}..{positions.stop - 1} must be computed at every layer")
    return slice(start, stop)


def _layer(lm: LlamaForCausalLM, layer: int, block, plan: LayerPlan, hidden: torch.Tensor, mask: torch.Tensor,
           seq_len: int, request: PrefillRequest, out: PrefillOutput) -> torch.Tensor:
    """One decoder layer on the plan's rows: hidden [1, row, hidden] -> the layer's output for the same rows."""
    cfg, rows, attn_mod = lm.config, plan.rows, block.self_attn
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim = cfg.hidden_size // heads
    x = block.input_layernorm(hidden)  # [1, row, hidden]
    cos, sin = lm.model.rotary_emb(x, rows[None])  # [1, row, head_dim]
    q_fresh, k, v = project_qkv(attn_mod, x, plan.q_index, plan.kv_index, cos, sin, heads, kv_heads, head_dim)
    q = q_fresh if plan.q_index is None else _with_cached_queries(q_fresh, plan, request.store, layer)
    keys, values = gather_kv(request.store, layer, seq_len, plan.kv_slots, k, v)  # [1, kv_head, seq, head_dim]
    if request.store is not None:
        _write_back(request.store, layer, plan, q_fresh, k, v, request.frame)
    if out.cache is not None:
        out.cache.update(keys, values, layer)
    if request.observer is not None:
        request.observer.on_layer("llm", layer, rows, q, keys, values)
    prob_rows = _prob_rows(layer, plan, request)
    attn, probs = attend(q, keys, values, attn_mod.scaling, mask, prob_rows)
    _capture(layer, plan, probs, request, out)
    hidden = hidden + attn_mod.o_proj(attn)
    out.work.append(plan.work(seq_len))
    return hidden + block.mlp(block.post_attention_layernorm(hidden))


def _with_cached_queries(q: torch.Tensor, plan: LayerPlan, store: KVStore, layer: int) -> torch.Tensor:
    """Q reuse: the fresh queries q [1, head, q_row, head_dim] and the store's (already rotated) ones for the
    other rows -> [1, head, row, head_dim]."""
    full = q.new_empty(1, q.shape[1], plan.rows.numel(), q.shape[-1])
    full[:, :, plan.q_index] = q
    full[0, :, plan.q_cached_index] = store.queries[layer][:, plan.q_cached_slots]
    return full


def _write_back(store: KVStore, layer: int, plan: LayerPlan, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                frame: int) -> None:
    """Keep the fresh K/V (and Q) of the BOS and vision slots for the next frame. q [1, head, q_row, head_dim] and
    k/v [1, kv_head, kv_row, head_dim] are the fresh rows only: rows are sorted, so the stored ones come first."""
    n_slots = store.num_slots
    n_stored = plan.count_below(n_slots, fresh_kv_only=True)  # fresh K/V rows at store slots
    q_new = None
    if store.queries is not None:
        rows, kv_fresh, q_fresh = plan.host
        in_store = rows < n_slots
        if not np.array_equal(q_fresh & in_store, kv_fresh & in_store):
            raise ValueError("Q reuse needs a row's Q and K/V to be fresh together")
        q_new = q[0][:, :n_stored]
    store.update(layer, plan.kv_slots[:n_stored], k[0][:, :n_stored], v[0][:, :n_stored], frame, q_new)


def _prob_rows(layer: int, plan: LayerPlan, request: PrefillRequest) -> slice | None:
    """Rows (of the plan's) whose attention probabilities this layer must return: every row for the entropy, the
    text rows (the last ones: rows are sorted) for the relevance and the recorder, none otherwise."""
    if layer in request.entropy_layers:
        return slice(None)
    if layer in request.prob_layers:
        return slice(plan.count_below(request.text_start), None)
    return None


def _capture(layer: int, plan: LayerPlan, probs: torch.Tensor | None, request: PrefillRequest,
             out: PrefillOutput) -> None:
    if layer in request.entropy_layers:
        out.entropy[layer] = attention_entropy(probs, on_host=False, dtype=request.entropy_dtype)
        probs = probs[:, plan.count_below(request.text_start):].contiguous()
    if layer in request.prob_layers:
        out.text_probs[layer] = probs  # [head, text, seq]
