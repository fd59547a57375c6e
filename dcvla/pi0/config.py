"""The Pi0-style family's configuration: the Gemma stacks, the presets, the prefix spans and the closed-loop
constants."""

from __future__ import annotations

from dataclasses import dataclass

from ..vision import SIGLIP_MEAN, SIGLIP_STD, ViTConfig

SPANS = ("vision", "text", "state")  # the prefix's token spans, in order
REPLAN_STEPS = 5        # openpi's LIBERO client: actions executed from each chunk before the next inference
LIBERO_ACTION_DIM = 7   # LIBERO executes the first 7 action dims


@dataclass(frozen=True)
class GemmaDims:
    """One Gemma stack (the prefix LM or the action expert)."""

    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"GemmaDims.num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")


@dataclass(frozen=True)
class Pi0Config:
    """A Pi0-style model: SigLIP image prefix, Gemma prefix LM, Gemma action expert of the same depth."""

    name: str
    vision: ViTConfig                 # SigLIP; every block runs, then the post-layernorm (PaliGemma)
    lm: GemmaDims
    expert: GemmaDims
    vocab_size: int
    state_dim: int = 8                # the model's state width (LIBERO's 8-dim state is zero-padded to it)
    action_dim: int = 7               # the model's action width (LIBERO uses the first 7)
    action_horizon: int = 10          # actions per chunk
    num_steps: int = 10               # Euler denoising steps
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0

    def __post_init__(self) -> None:
        lm, ex = self.lm, self.expert
        if (lm.num_layers, lm.num_heads, lm.num_kv_heads, lm.head_dim) != (ex.num_layers, ex.num_heads, ex.num_kv_heads, ex.head_dim):
            raise ValueError(
                "the action expert attends to the prefix K/V layer by layer, so it needs the prefix LM's depth, heads, "
                f"K/V heads and head_dim: lm {lm}, expert {ex}"
            )
        if self.num_steps < 1 or self.action_horizon < 1:
            raise ValueError(f"Pi0Config.num_steps and action_horizon must be >= 1, got {self.num_steps}, {self.action_horizon}")

    @property
    def num_image_tokens(self) -> int:
        return self.vision.num_patches

    @property
    def num_layers(self) -> int:
        return self.lm.num_layers


def _siglip(hidden: int, depth: int, heads: int, mlp: int) -> ViTConfig:
    # PaliGemma's SigLIP So400m/14 uses the tanh GELU (unlike OpenVLA's timm tower).
    return ViTConfig(name="siglip", hidden_size=hidden, depth=depth, num_heads=heads, mlp_dim=mlp,
                     hidden_act="gelu_pytorch_tanh", mean=SIGLIP_MEAN, std=SIGLIP_STD)


PI0_PRESETS: dict[str, Pi0Config] = {
    # openpi pi0: PaliGemma-3B (SigLIP So400m/14 + Gemma-2B) and the Gemma-300M action expert, 50-step chunks of
    # 32-dim (padded) actions, 10 Euler steps.
    "pi0": Pi0Config(
        name="pi0", vision=_siglip(1152, 27, 16, 4304),
        lm=GemmaDims(hidden_size=2048, num_layers=18, num_heads=8, num_kv_heads=1, head_dim=256, intermediate_size=16384),
        expert=GemmaDims(hidden_size=1024, num_layers=18, num_heads=8, num_kv_heads=1, head_dim=256, intermediate_size=4096),
        vocab_size=257152, state_dim=32, action_dim=32, action_horizon=50,
    ),
    # CPU studies: the published depth (18 + 18 layers, 8-to-1 grouped K/V), widths 1/8 of Gemma-2B and of the
    # expert, MLPs 4x wide, a 12-block SigLIP; 10-action chunks (LIBERO executes 5 per inference).
    "pi0-small": Pi0Config(
        name="pi0-small", vision=_siglip(192, 12, 3, 768),
        lm=GemmaDims(hidden_size=256, num_layers=18, num_heads=4, num_kv_heads=1, head_dim=64, intermediate_size=1024),
        expert=GemmaDims(hidden_size=128, num_layers=18, num_heads=4, num_kv_heads=1, head_dim=64, intermediate_size=512),
        vocab_size=32000, action_horizon=10,
    ),
    # Tests: milliseconds per step.
    "pi0-tiny": Pi0Config(
        name="pi0-tiny", vision=_siglip(32, 3, 2, 64),
        lm=GemmaDims(hidden_size=32, num_layers=4, num_heads=2, num_kv_heads=1, head_dim=16, intermediate_size=64),
        expert=GemmaDims(hidden_size=16, num_layers=4, num_heads=2, num_kv_heads=1, head_dim=16, intermediate_size=32),
        vocab_size=32000, action_horizon=4, num_steps=10,
    ),
}


def get_pi0_preset(name: str) -> Pi0Config:
    try:
        return PI0_PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown Pi0 preset {name!r}; known: {', '.join(sorted(PI0_PRESETS))}") from None


# Mean and std of the 8-dim LIBERO state (eef pos, axis-angle, gripper qpos) over every frame of the shipped
# episodes (tests/test_pi0.py recomputes them), std floored at 0.05 so the nearly constant roll (about pi) is not
# blown up into noise.
LIBERO_STATE_STATS = {
    "mean": [-0.0367, 0.0634, 0.649, 3.1412, 0.0, -0.0027, 0.0247, -0.0247],
    "std": [0.0844, 0.1695, 0.3199, 0.05, 0.05, 0.05, 0.05, 0.05],
}
STATE_STD_FLOOR = 0.05
