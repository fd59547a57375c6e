"""SmolVLA as lerobot builds it (`policies/smolvla/`): dims, presets and the constants of its computation.

Facts from lerobot 0.6.1 (`configuration_smolvla.py`, `smolvlm_with_expert.py`, `modeling_smolvla.py`), checked
against lerobot's own modules by `tests/test_smolvla_parity.py`. The SmolVLM2-500M dims of the `smolvla` preset are
SmolVLM2-500M-Video-Instruct's (the README's SmolVLA section says where each was read).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from ..prefix_reuse import REPLAN_STEPS, SPANS  # noqa: F401 (the family's names for them)

VLM_MODEL = "HuggingFaceTB/SmolVLM2-500M-Video-Instruct"


@dataclass(frozen=True)
class VisionDims:
    """SmolVLM's SigLIP tower (`SmolVLMVisionTransformer`: every block, then the post-layernorm)."""

    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    image_size: int = 512
    patch_size: int = 16
    layer_norm_eps: float = 1e-6

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


@dataclass(frozen=True)
class TextDims:
    """The SmolLM2 (Llama) layers SmolVLA keeps: the first `depth` (`num_vlm_layers`) of the VLM's text model."""

    width: int = 960
    depth: int = 16
    mlp_dim: int = 2560
    num_heads: int = 15
    num_kv_heads: int = 5
    head_dim: int = 64
    rms_norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"TextDims.num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")


def expert_intermediate_size(width: int, ffn_dim_multiplier: int = 4, multiple_of: int = 256) -> int:
    """lerobot's `get_intermediate_size`: the expert's MLP width (720 -> 2048)."""
    hidden = int(ffn_dim_multiplier * int(2 * width / 3))
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


@dataclass(frozen=True)
class SmolVLAConfig:
    """A SmolVLA model.

    Prefix: [64 image tokens per camera (SigLIP -> pixel shuffle x scale_factor -> linear, x sqrt(width)) | the
    prompt (x sqrt(width)) | one state token (`state_proj`)]; the image and prompt tokens attend to each other, the
    state token to all of them (nobody in the prefix attends to it). Expert: `expert_width_multiplier` of the width,
    as deep as the kept text layers; every `self_attn_every_n_layers`-th layer (0, 2, ...) attends jointly over
    [prefix | actions] with the VLM's head geometry, the others cross-attend from the actions to the prefix's K/V
    through the expert's own K/V projections. The actions are causal among themselves.
    """

    name: str
    vision: VisionDims = field(default_factory=VisionDims)
    text: TextDims = field(default_factory=TextDims)
    scale_factor: int = 4               # the connector's pixel shuffle: scale_factor**2 patches per token
    vocab_size: int = 49280
    expert_width_multiplier: float = 0.75
    self_attn_every_n_layers: int = 2
    num_image_slots: int = 3            # lerobot's SmolVLA takes the cameras its config names; missing ones are absent
    max_state_dim: int = 32             # the state is normalised, then zero-padded to this
    max_action_dim: int = 32
    chunk_size: int = 50
    num_steps: int = 10                 # Euler steps from t = 1 to t = 0
    max_token_len: int = 48             # tokenizer_max_length
    min_period: float = 4e-3            # the sinusoidal time embedding's periods
    max_period: float = 4.0
    rope_max_wavelength: float = 10_000.0  # SmolVLA's own RoPE (the VLM's rope_theta is not used)
    delta_action_dims: int = 0
    variant: str = "smolvla"
    state_token: str = "prefix"         # where the robot state enters (dcvla.flow_policy)

    def __post_init__(self) -> None:
        v = self.vision
        side = v.image_size // v.patch_size
        if v.image_size % v.patch_size or side % self.scale_factor:
            raise ValueError(f"the pixel shuffle needs patches per side ({v.image_size} / {v.patch_size}) divisible "
                             f"by scale_factor {self.scale_factor}")
        if self.self_attn_every_n_layers < 1:
            raise ValueError("self_attn_every_n_layers must be >= 1 (lerobot's cross_attn mode; 1: every layer joint)")
        if self.num_steps < 1 or self.chunk_size < 1:
            raise ValueError(f"SmolVLAConfig.num_steps and chunk_size must be >= 1, got {self.num_steps}, {self.chunk_size}")
        if (self.expert_width % 2) or self.expert_width < 2:
            raise ValueError(f"the expert's width ({self.expert_width}) must be even (the time embedding is sin | cos)")

    @property
    def expert_width(self) -> int:
        return int(self.text.width * self.expert_width_multiplier)

    @property
    def expert_mlp_dim(self) -> int:
        return expert_intermediate_size(self.expert_width)

    @property
    def tokens_per_image(self) -> int:
        return self.vision.num_patches // self.scale_factor**2

    @property
    def image_size(self) -> int:
        return self.vision.image_size

    @property
    def prefix_depth(self) -> int:
        return self.text.depth

    def is_cross_layer(self, layer: int) -> bool:
        """Layers the expert cross-attends to the prefix (lerobot: `layer % self_attn_every_n_layers != 0`)."""
        return layer % self.self_attn_every_n_layers != 0


_SMALL = dict(vision=VisionDims(hidden_size=192, num_layers=12, num_heads=3, intermediate_size=768, image_size=256),
              text=TextDims(width=240, depth=16, mlp_dim=640, num_heads=15, num_kv_heads=5, head_dim=16),
              scale_factor=2, vocab_size=32000, chunk_size=10)
_MICRO = dict(vision=VisionDims(hidden_size=96, num_layers=4, num_heads=3, intermediate_size=384, image_size=224,
                                patch_size=28),
              text=TextDims(width=128, depth=8, mlp_dim=384, num_heads=4, num_kv_heads=2, head_dim=32),
              scale_factor=2, vocab_size=1024, chunk_size=10)
_TINY = dict(vision=VisionDims(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, image_size=64, patch_size=8),
             text=TextDims(width=64, depth=4, mlp_dim=128, num_heads=4, num_kv_heads=2, head_dim=16),
             vocab_size=32000, chunk_size=10)

PRESETS: dict[str, SmolVLAConfig] = {
    # published: lerobot/smolvla_base (SmolVLM2-500M's SigLIP-B/16 at 512 and its first 16 text layers, expert 720)
    "smolvla": SmolVLAConfig("smolvla"),
    # CPU studies: the published depth and heads (16 layers, 15 heads to 5 K/V heads) at 1/4 width, a 12-block
    # SigLIP of width 192 at 256 px with a x2 pixel shuffle (64 tokens per camera, as published), 10 actions
    "smolvla-small": SmolVLAConfig("smolvla-small", **_SMALL),
    # trained here on the project's demonstrations (scripts/train_micro.py, dcvla.smolvla.train): 8 text layers at
    # width 128 (4 heads to 2 K/V heads), expert 96; SigLIP 96 wide, 4 blocks, at 224 px (LIBERO's frames, so the
    # policy's resize-with-pad is the identity) in 28 px patches, x2 pixel shuffle: 16 tokens per camera; 1024 token
    # rows hold dcvla's offline tokenizer (589 tokens; a 32,000-row table would be most of the weights and of a
    # training step's time). 3.3M parameters, 6.7 MB in bfloat16; a training step of 16 took 0.34 s (median) on
    # the 2 cores of an Intel machine, the batch's prefixes run together
    "smolvla-micro": SmolVLAConfig("smolvla-micro", **_MICRO),
    # tests: the parity fixture's dims (tests/fixtures/smolvla_tiny; its vocabulary is 320)
    "smolvla-tiny": SmolVLAConfig("smolvla-tiny", **_TINY),
}


def get_preset(name: str) -> SmolVLAConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown SmolVLA preset {name!r}; known: {', '.join(PRESETS)}") from None


def with_dims(config, **changes):
    """A config (SmolVLAConfig, VisionDims, TextDims) with other fields (e.g. a checkpoint's chunk size)."""
    return replace(config, **changes)
