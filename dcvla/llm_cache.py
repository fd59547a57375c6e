"""The LLM side of cross-frame caching: a prefill that reuses static vision tokens' K/V (and Q) per layer.

`prefill` is the one custom decoder loop: it runs transformers' own Llama submodules on the rows each layer
carries. A row absent from a layer is not computed at all; its K/V come from the store. Because attention is
causal, a static vision token whose K and V come from the store at EVERY layer is never read through its own
hidden state, so the fast path drops it from the first layer (hypothesis H1 of the design tests this against
computing it with a cached or a fresh Q). Rows keep their absolute positions: RoPE rotates fresh Q/K at the same
positions the cached keys were rotated at, and the causal mask compares absolute positions.

The filled K/V of every position go into a transformers `DynamicCache`, so decoding the action tokens is the
plain transformers forward.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import DynamicCache, LlamaForCausalLM

from .cache import KVStore, LayerPlan, attend, gather_kv, project_qkv
from .flops import LayerWork
from .selector import attention_entropy


@dataclass
class PrefillOutput:
    logits: torch.Tensor                 # [1, vocab]: at the last position
    cache: DynamicCache                  # K/V of every position, every layer, for decoding
    work: list[LayerWork]                # per layer
    text_probs: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [head, text, seq] float32
    entropy: dict[int, torch.Tensor] = field(default_factory=dict)     # layer -> mean attention entropy (0-dim)


def new_llm_store(lm: LlamaForCausalLM, num_slots: int, store_queries: bool) -> KVStore:
    """A store for slots 0..num_slots-1 (BOS + vision tokens), every layer."""
    cfg = lm.config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    weight = lm.model.embed_tokens.weight
    return KVStore(cfg.num_hidden_layers, num_slots, cfg.num_attention_heads, cfg.num_key_value_heads, head_dim,
                   weight.dtype, weight.device, store_queries)


@torch.inference_mode()
def prefill(lm: LlamaForCausalLM, embeds: torch.Tensor, seq_len: int, plans: list[LayerPlan], store: KVStore | None,
            frame: int, text_start: int, prob_layers: frozenset[int] = frozenset(),
            entropy_layers: frozenset[int] = frozenset(), observer=None) -> PrefillOutput:
    """Run the Llama prefill under per-layer plans.

    Args:
        embeds: [1, row, hidden] input embeddings of the rows the first layer carries (plans[0].rows, sorted
            absolute positions).
        seq_len: the full sequence length (BOS + vision + prompt); the last position must be carried everywhere.
        plans: one per layer; each layer's rows are a subset of the previous layer's (dropped rows stay dropped).
        store: the episode's store of BOS + vision slots (None: every position fresh, nothing kept).
        frame: this frame's index (recorded with each fresh K/V).
        text_start: the first prompt position (1 + number of vision tokens).
        prob_layers: layers whose attention probabilities from the text rows (positions >= text_start) to return.
        entropy_layers: layers whose mean attention entropy over every row computed to return (VLA-Cache's
            layer schedule; it needs the full probability matrix, as upstream's eager attention gives it).
        observer: optional `on_layer("llm", layer, rows, q, keys, values)` receiver of the Q of the rows
            computed and the full K/V attended, as used (recording, drift).
    """
    model, cfg = lm.model, lm.config
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim = cfg.hidden_size // heads
    n_slots = store.num_slots if store is not None else 0
    if len(plans) != len(model.layers):
        raise ValueError(f"{len(plans)} layer plans for {len(model.layers)} layers")
    positions = torch.arange(seq_len, device=embeds.device)
    hidden, rows = embeds, plans[0].rows  # [1, row, hidden], [row]
    cache, work, text_probs, entropy = DynamicCache(config=cfg), [], {}, {}
    mask = rows[:, None] >= positions[None, :]  # [row, seq]: causal by absolute position
    for layer, (block, plan) in enumerate(zip(model.layers, plans)):
        if plan.rows.numel() != rows.numel():  # rows dropped from this layer on
            hidden, mask, rows = hidden[:, torch.isin(rows, plan.rows)], mask[torch.isin(rows, plan.rows)], plan.rows
        attn_mod = block.self_attn
        x = block.input_layernorm(hidden)  # [1, row, hidden]
        cos, sin = model.rotary_emb(x, rows[None])  # [1, row, head_dim]
        q_rows, kv_rows = plan.q_fresh.nonzero().squeeze(1), plan.kv_fresh.nonzero().squeeze(1)
        q, k, v = project_qkv(attn_mod, x, q_rows, kv_rows, cos, sin, heads, kv_heads, head_dim)
        if q_rows.numel() != rows.numel():  # Q reuse: cached (already rotated) queries for the other rows
            full_q = q.new_empty(1, heads, rows.numel(), head_dim)
            full_q[:, :, q_rows] = q
            full_q[0, :, ~plan.q_fresh] = store.queries[layer][:, rows[~plan.q_fresh]]
            q = full_q
        keys, values = gather_kv(store, layer, seq_len, rows[kv_rows], k, v)  # [1, kv_head, seq, head_dim]
        if store is not None:  # keep the fresh K/V (and Q) of BOS and vision slots for the next frame
            stored = plan.kv_fresh & (rows < n_slots)  # [row]
            q_new = None
            if store.queries is not None:
                if not torch.equal(plan.q_fresh & (rows < n_slots), stored):
                    raise ValueError("Q reuse needs a row's Q and K/V to be fresh together")
                q_new = q[0][:, stored]
            in_store = rows[kv_rows] < n_slots  # [kv_row]
            store.update(layer, rows[stored], k[0][:, in_store], v[0][:, in_store], frame, q_new)
        cache.update(keys, values, layer)
        if observer is not None:
            observer.on_layer("llm", layer, rows, q, keys, values)
        is_text = rows >= text_start  # [row]
        if layer in entropy_layers:
            prob_rows = torch.arange(rows.numel(), device=rows.device)
        elif layer in prob_layers:
            prob_rows = is_text.nonzero().squeeze(1)
        else:
            prob_rows = None
        attn, probs = attend(q, keys, values, attn_mod.scaling, mask, prob_rows)
        if layer in entropy_layers:
            entropy[layer] = attention_entropy(probs)
            probs = probs[:, is_text]
        if layer in prob_layers:
            text_probs[layer] = probs  # [head, text, seq]
        hidden = hidden + attn_mod.o_proj(attn)
        hidden = hidden + block.mlp(block.post_attention_layernorm(hidden))
        work.append(plan.work(seq_len))
    if int(rows[-1]) != seq_len - 1:
        raise ValueError("the last position must be computed at every layer (its logits choose the first action token)")
    logits = lm.lm_head(model.norm(hidden[:, -1:]))[:, -1].float()  # [1, vocab]
    return PrefillOutput(logits, cache, work, text_probs, entropy)
