"""FLOPs from the shapes actually computed (DESIGN section 6): multiply-adds count 2, norms and softmax ignored.

Per transformer layer, with r query rows computed, m rows whose K/V are projected, n keys attended, width d:
Q and output projections 2*r*d^2 each, K and V projections 2*m*d_kv*d each, attention 4*r*n*d (scores and
weighted sum), MLP 2*r*d*d_ff per matrix (two in a ViT, three in Llama's gated MLP). A cache lowers r and m;
the vanilla model has r = m = n = tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

from .vision import ViTConfig


@dataclass(frozen=True)
class LayerWork:
    """What one attention layer computed: rows queried, rows projected to K/V, keys attended."""

    q_rows: int
    kv_rows: int
    keys: int


def attention_layer_flops(work: LayerWork, d: int, d_kv: int, d_ff: int, mlp_mats: int, d_attn: int | None = None) -> int:
    """One layer; `d_attn` = heads x head_dim where it differs from the width d (Gemma's action expert)."""
    r, m, n = work.q_rows, work.kv_rows, work.keys
    d_attn = d if d_attn is None else d_attn
    projections = 2 * r * d * d_attn * 2 + 2 * m * d * d_kv * 2  # Q and O; K and V
    attention = 4 * r * n * d_attn
    mlp = 2 * r * d * d_ff * mlp_mats
    return projections + attention + mlp


def vit_flops(cfg: ViTConfig, layers: list[LayerWork] | None = None) -> int:
    """A tower's patch embedding + the blocks that run; `layers=None` is the full recompute."""
    tokens = cfg.num_prefix_tokens + cfg.num_patches
    layers = layers or [LayerWork(tokens, tokens, tokens)] * cfg.num_layers_run
    patch_embed = 2 * cfg.num_patches * 3 * cfg.patch_size**2 * cfg.hidden_size
    return patch_embed + sum(attention_layer_flops(w, cfg.hidden_size, cfg.hidden_size, cfg.mlp_dim, 2) for w in layers)
