"""The LLM side of cross-frame caching: a prefill that reuses static vision tokens' K/V (and Q) per layer.

`prefill` is the one custom decoder loop: it runs transformers' own Llama submodules on the rows each layer
carries. A row absent from a layer is not computed at all; its K/V come from the store. Because attention is
causal, a static vision token whose K and V come from the store at EVERY layer is never read through its own
hidden state, so the fast path drops it from the first layer (hypothesis H1 of the design tests this against
computing it with a cached or a fresh Q). Rows keep their absolute positions: RoPE rotates fresh Q/K at the same
positions the cached keys were rotated at, and the causal mask compares absolute positions.

The filled K/V of every position go into a transformers `DynamicCache`, so decoding the action tokens is the
plain transformers forward.

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
    logits: torch.Tensor | None          # [1, vocab]: at the last position (set when the prefill ends)
    cache: DynamicCache                  # K/V of every position, every layer, for decoding
    work: list[LayerWork]                # per layer
    text_probs: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [head, text, seq] float32
    entropy: dict[int, torch.Tensor] = field(default_factory=dict)     # layer -> mean attention entropy (0-dim,
                                                                       # on the device: read with the frame's other values)


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


@torch.inference_mode()
def prefill(lm: LlamaForCausalLM, embeds: torch.Tensor, seq_len: int, plans: list[LayerPlan],
            request: PrefillRequest) -> PrefillOutput:
    """Run the Llama prefill under per-layer plans.

    Args:
        embeds: [1, row, hidden] input embeddings of the rows the first layer carries (plans[0].rows, sorted
            absolute positions).
        seq_len: the full sequence length (BOS + vision + prompt); the last position must be carried everywhere.
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
    positions = torch.arange(seq_len, device=embeds.device)
    hidden, rows = embeds, plans[0].rows  # [1, row, hidden], [row]
    mask = rows[:, None] >= positions[None, :]  # [row, seq]: causal by absolute position
    out = PrefillOutput(None, DynamicCache(config=lm.config), [])
    for layer, (block, plan) in enumerate(zip(model.layers, plans)):
        if plan.rows.numel() != rows.numel():  # rows dropped from this layer on (a subset of the previous rows)
            kept = torch.searchsorted(rows, plan.rows)  # [row]: where this layer's rows sit among the previous'
            hidden, mask, rows = hidden[:, kept], mask[kept], plan.rows
        hidden = _layer(lm, layer, block, plan, hidden, mask, seq_len, request, out)
    out.logits = lm.lm_head(model.norm(hidden[:, -1:]))[:, -1].float()  # [1, vocab]
    return out


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
