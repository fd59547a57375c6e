"""OpenVLA's FLOPs per stage (projector, Llama prefill and decode), from the shapes computed; the towers' and
the per-layer count are the engine's (`dcvla.flops`)."""

from __future__ import annotations

from ..flops import LayerWork, attention_layer_flops, vit_flops
from .config import LLMConfig, OpenVLAConfig


def projector_flops(config: OpenVLAConfig, rows: int | None = None) -> int:
    rows = config.num_patches if rows is None else rows
    d_in, d_hidden, d_llm, d_out = config.projector_dims
    return 2 * rows * (d_in * d_hidden + d_hidden * d_llm + d_llm * d_out)


def llm_flops(cfg: LLMConfig, layers: list[LayerWork], logits_rows: int = 1) -> int:
    """Llama layers (gated MLP, grouped K/V) plus the lm_head on `logits_rows` positions."""
    d_kv = cfg.hidden_size * (cfg.num_kv_heads or cfg.num_heads) // cfg.num_heads
    body = sum(attention_layer_flops(w, cfg.hidden_size, d_kv, cfg.intermediate_size, 3) for w in layers)
    return body + 2 * logits_rows * cfg.hidden_size * cfg.vocab_size


def prefill_flops(config: OpenVLAConfig, seq_len: int, layers: list[LayerWork] | None = None) -> int:
    """The prefill of `seq_len` tokens (BOS + vision + prompt), logits for the last position only."""
    layers = layers or [LayerWork(seq_len, seq_len, seq_len)] * config.llm.num_layers
    return llm_flops(config.llm, layers)


def decode_flops(config: OpenVLAConfig, seq_len: int) -> int:
    """The action_dim - 1 single-token decode steps after a prefill of `seq_len` tokens."""
    return sum(
        llm_flops(config.llm, [LayerWork(1, 1, seq_len + i + 1)] * config.llm.num_layers)
        for i in range(config.action_dim - 1)
    )


def vanilla_stage_flops(config: OpenVLAConfig, seq_len: int) -> dict[str, int]:
    """FLOPs per stage of one full OpenVLA step: dino, siglip, projector, llm_prefill, llm_decode."""
    return {
        "dino": vit_flops(config.dino),
        "siglip": vit_flops(config.siglip),
        "projector": projector_flops(config),
        "llm_prefill": prefill_flops(config, seq_len),
        "llm_decode": decode_flops(config, seq_len),
    }
