"""Model configurations: the published OpenVLA dims and two small presets of the same structure.

A preset fixes every dimension of the Prismatic "dinosiglip-vit-so-224px" + Llama-2 stack. The small
presets keep the structure (two towers, 4 DINOv2 registers with LayerScale, 256 patches, the fused
3-layer projector, a >= 16-layer Llama with the 32064-entry vocabulary whose top 256 text ids are the
action bins) and shrink widths, so random weights of the same architecture run on a CPU.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from ..vision import IMAGENET_MEAN, IMAGENET_STD, SIGLIP_MEAN, SIGLIP_STD, ViTConfig

@dataclass(frozen=True)
class LLMConfig:
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    num_kv_heads: int | None = None   # None: multi-head attention (Llama-2-7B)
    vocab_size: int = 32064           # 32000 padded to a multiple of 64, as OpenVLA does
    text_vocab_size: int = 32000      # action token ids count down from here
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_position_embeddings: int = 2048

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"LLMConfig.hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}")
        if self.vocab_size < self.text_vocab_size:
            raise ValueError(f"LLMConfig.vocab_size={self.vocab_size} < text_vocab_size={self.text_vocab_size}")


@dataclass(frozen=True)
class OpenVLAConfig:
    """A full OpenVLA (Prismatic dinosiglip-224px + Llama-2) model."""

    name: str
    dino: ViTConfig
    siglip: ViTConfig
    llm: LLMConfig
    action_dim: int = 7
    n_action_bins: int = 256          # bin edges linspace(-1, 1, 256): 255 centres
    projector_hidden: int | None = field(default=None)  # None: 4 x vision_dim, as Prismatic's fused projector

    def __post_init__(self) -> None:
        if self.dino.num_patches != self.siglip.num_patches:
            raise ValueError(
                f"the towers must see the same patch grid: dino has {self.dino.num_patches} patches, "
                f"siglip {self.siglip.num_patches}"
            )
        if self.n_action_bins > self.llm.text_vocab_size:
            raise ValueError(f"OpenVLAConfig.n_action_bins={self.n_action_bins} exceeds the text vocabulary")

    @property
    def num_patches(self) -> int:
        return self.dino.num_patches

    @property
    def vision_dim(self) -> int:
        return self.dino.hidden_size + self.siglip.hidden_size

    @property
    def projector_dims(self) -> tuple[int, int, int, int]:
        """(in, fc1 out, fc2 out, fc3 out)."""
        hidden = self.projector_hidden or 4 * self.vision_dim
        return self.vision_dim, hidden, self.llm.hidden_size, self.llm.hidden_size

    def with_llm(self, **changes) -> "OpenVLAConfig":
        return replace(self, llm=replace(self.llm, **changes))


def _dino(hidden: int, depth: int, heads: int, mlp: int) -> ViTConfig:
    return ViTConfig(
        name="dino", hidden_size=hidden, depth=depth, num_heads=heads, mlp_dim=mlp,
        num_register_tokens=4, class_token=True, layerscale=True, hidden_act="gelu",
        mean=IMAGENET_MEAN, std=IMAGENET_STD,
    )


def _siglip(hidden: int, depth: int, heads: int, mlp: int) -> ViTConfig:
    # timm's vit_so400m_patch14_siglip_224 sets no act_layer and OpenVLA overrides none, so the tower OpenVLA
    # was trained with uses timm's default exact GELU, not the tanh approximation of the original SigLIP.
    return ViTConfig(
        name="siglip", hidden_size=hidden, depth=depth, num_heads=heads, mlp_dim=mlp,
        hidden_act="gelu", mean=SIGLIP_MEAN, std=SIGLIP_STD,
    )


PRESETS: dict[str, OpenVLAConfig] = {
    # timm vit_large_patch14_reg4_dinov2 + vit_so400m_patch14_siglip_224 + Llama-2-7B.
    "openvla-7b": OpenVLAConfig(
        name="openvla-7b",
        dino=_dino(1024, 24, 16, 4096),
        siglip=_siglip(1152, 27, 16, 4304),
        llm=LLMConfig(hidden_size=4096, num_layers=32, num_heads=32, intermediate_size=11008),
    ),
    # Widths about 1/4, ViT depths as published, 16 LLM layers so attention layer 15 exists.
    "small": OpenVLAConfig(
        name="small",
        dino=_dino(256, 24, 4, 1024),
        siglip=_siglip(288, 27, 4, 1076),
        llm=LLMConfig(hidden_size=1024, num_layers=16, num_heads=16, intermediate_size=2752),
    ),
    # Trained here on the project's demonstrations (scripts/train_micro.py): small enough to train on 2 CPU cores in
    # hours and to ship under 40 MB in bfloat16 (the 32064-row embedding and head are most of it).
    "openvla-micro": OpenVLAConfig(
        name="openvla-micro",
        dino=_dino(96, 4, 3, 384),
        siglip=_siglip(96, 4, 3, 384),
        llm=LLMConfig(hidden_size=96, num_layers=16, num_heads=3, intermediate_size=256),
    ),
    # For tests: seconds per step on a CPU.
    "tiny": OpenVLAConfig(
        name="tiny",
        dino=_dino(32, 4, 2, 128),
        siglip=_siglip(48, 4, 2, 96),
        llm=LLMConfig(hidden_size=32, num_layers=16, num_heads=2, intermediate_size=88),
    ),
}


def get_preset(name: str) -> OpenVLAConfig:
    """Return the preset called `name`; an unknown name raises a ValueError listing the known ones."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; known presets: {', '.join(sorted(PRESETS))}") from None
