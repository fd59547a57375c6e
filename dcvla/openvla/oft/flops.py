"""OpenVLA-OFT's FLOPs per stage, from the shapes computed (DESIGN section 6; the towers', projector's and Llama
layers' counts are OpenVLA's, `dcvla.openvla.flops`).

One bidirectional pass and no decode: every row of a layer attends to every position (keys = the sequence length,
as a causal prefill is counted too), no lm_head runs (the head reads final-norm states), and the proprio projector
and the L1 head add their matrix products. Both images run both towers: a tower's count is the sum over images.
"""

from __future__ import annotations

from ...flops import LayerWork, vit_flops
from ..flops import llm_flops, projector_flops
from .config import OFTConfig


def proprio_flops(config: OFTConfig) -> int:
    """fc1 (proprio_dim -> llm) and fc2 (llm -> llm) on the one state token."""
    d = config.llm.hidden_size
    return 2 * (config.proprio_dim * d + d * d)


def head_flops(config: OFTConfig) -> int:
    """The L1 head's MLPResNet on `chunk_size` rows: fc1, the residual blocks' linears, fc2 (norms ignored)."""
    d_in, hidden, d_out = config.head_dims
    return 2 * config.chunk_size * (d_in * hidden + config.head_blocks * hidden * hidden + hidden * d_out)


def stage_flops(config: OFTConfig, vit_work: dict[str, list[LayerWork]], projector_rows: int,
                llm_work: list[LayerWork]) -> dict[str, int]:
    """FLOPs per stage of one step: dino, siglip (every image), projector (+ proprio), llm_prefill, head.

    Args:
        vit_work: per tower and image ("third-person/dino", "wrist/siglip", ...): what each block computed.
        projector_rows: vision tokens the projector computed (both images).
        llm_work: per Llama layer.
    """
    towers = {"dino": config.dino, "siglip": config.siglip}
    out = {name: sum(vit_flops(cfg, work) for key, work in vit_work.items() if key.rsplit("/", 1)[-1] == name)
           for name, cfg in towers.items()}
    return out | {
        "projector": projector_flops(config, projector_rows) + proprio_flops(config),
        "llm_prefill": llm_flops(config.llm, llm_work, logits_rows=0),
        "head": head_flops(config),
    }


def vanilla_stage_flops(config: OFTConfig, seq_len: int) -> dict[str, int]:
    """FLOPs per stage of one full OpenVLA-OFT step over a sequence of `seq_len` positions."""
    def full(cfg) -> list[LayerWork]:
        tokens = cfg.num_prefix_tokens + cfg.num_patches
        return [LayerWork(tokens, tokens, tokens)] * cfg.num_layers_run

    vit = {f"{i}/{name}": full(cfg) for i in range(config.num_images)
           for name, cfg in (("dino", config.dino), ("siglip", config.siglip))}
    llm = [LayerWork(seq_len, seq_len, seq_len)] * config.llm.num_layers
    return stage_flops(config, vit, config.num_vision_tokens, llm)
