"""pi0 and pi0.5 as openpi and lerobot build them: dims, presets, the constants of their computation and of the
LIBERO closed loop.

Facts from lerobot 0.6.1 (`policies/pi0/modeling_pi0.py`, `policies/pi05/modeling_pi05.py`, `policies/pi_gemma.py`,
`policies/common/vla_utils.py`) and openpi (`models/pi0_config.py`, `models/gemma.py`), checked against lerobot's
own modules by `tests/test_pi_parity.py`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from ..normalization import LIBERO_STATE_STATS, STATE_STD_FLOOR  # noqa: F401 (random presets' statistics)
from ..prefix_reuse import LIBERO_ACTION_DIM, REPLAN_STEPS, SPANS  # noqa: F401 (the family's names for them)

VARIANTS = ("pi0", "pi05")
IMAGE_SLOTS = ("base_0_rgb", "left_wrist_0_rgb", "right_wrist_0_rgb")  # openpi's IMAGE_KEYS; LIBERO: agent, wrist, empty


@dataclass(frozen=True)
class SiglipDims:
    """PaliGemma's SigLIP tower: every block runs, then the post-layernorm (no pooling head)."""

    hidden_size: int = 1152
    num_layers: int = 27
    num_heads: int = 16
    intermediate_size: int = 4304   # lerobot and openpi override PaliGemma's default
    image_size: int = 224
    patch_size: int = 14
    layer_norm_eps: float = 1e-6

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


@dataclass(frozen=True)
class GemmaDims:
    """One Gemma stack (openpi's `gemma.Config`): the PaliGemma LM or the action expert."""

    width: int
    depth: int
    mlp_dim: int
    num_heads: int
    num_kv_heads: int
    head_dim: int

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"GemmaDims.num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")


GEMMA_2B = GemmaDims(width=2048, depth=18, mlp_dim=16384, num_heads=8, num_kv_heads=1, head_dim=256)
GEMMA_300M = GemmaDims(width=1024, depth=18, mlp_dim=4096, num_heads=8, num_kv_heads=1, head_dim=256)


@dataclass(frozen=True)
class PiConfig:
    """A pi0 or pi0.5 model.

    pi0: the robot state is one token at the head of the expert's suffix (`state_proj`), the flow time is fused into
    each action token (`action_time_mlp_in/out`). pi0.5: no state token; the time MLP (`time_mlp_in/out`) gives the
    condition of adaRMSNorm in every expert norm, and the state goes into the prompt as 256-bin tokens
    (`state_in_prompt`, as lerobot's pi05 processor does; openpi's `pi05_libero` leaves it out).
    """

    name: str
    variant: str                       # "pi0" | "pi05"
    vision: SiglipDims = field(default_factory=SiglipDims)
    lm: GemmaDims = GEMMA_2B
    expert: GemmaDims = GEMMA_300M
    vocab_size: int = 257152
    num_image_slots: int = len(IMAGE_SLOTS)
    max_state_dim: int = 32             # the state is normalised, then zero-padded to this
    max_action_dim: int = 32
    chunk_size: int = 50                # openpi's action_horizon
    num_steps: int = 10                 # Euler steps from t = 1 to t = 0
    max_token_len: int = 48             # prompt tokens (padding is masked): pi0 48, pi0.5 200
    state_in_prompt: bool = False       # pi0.5: "Task: ..., State: b0 b1 ...;\nAction: "
    delta_action_dims: int = 0          # openpi pi0_libero: the first 6 actions are relative to the state
    min_period: float = 4e-3            # the sinusoidal time embedding's periods
    max_period: float = 4.0
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ValueError(f"PiConfig.variant must be one of {VARIANTS}, got {self.variant!r}")
        lm, ex = self.lm, self.expert
        if (lm.depth, lm.num_heads, lm.num_kv_heads, lm.head_dim) != (ex.depth, ex.num_heads, ex.num_kv_heads, ex.head_dim):
            raise ValueError("the expert attends to the prefix K/V layer by layer, so it needs the LM's depth, heads, "
                             f"K/V heads and head_dim: lm {lm}, expert {ex}")
        if self.state_in_prompt and self.variant != "pi05":
            raise ValueError("state_in_prompt is pi0.5's (pi0 projects the state into the expert's suffix)")
        if not 0 <= self.delta_action_dims <= self.max_action_dim:
            raise ValueError(f"PiConfig.delta_action_dims must be in 0..{self.max_action_dim}, got {self.delta_action_dims}")
        if self.num_steps < 1 or self.chunk_size < 1:
            raise ValueError(f"PiConfig.num_steps and chunk_size must be >= 1, got {self.num_steps}, {self.chunk_size}")

    @property
    def pi05(self) -> bool:
        return self.variant == "pi05"

    @property
    def tokens_per_image(self) -> int:
        return self.vision.num_patches

    @property
    def state_token(self) -> str:
        """Where the robot state enters (`dcvla.flow_policy`): pi0's expert token, pi0.5's prompt bins, or nowhere
        (openpi's pi05_libero)."""
        return "prompt" if self.state_in_prompt else "none" if self.pi05 else "expert"

    @property
    def image_size(self) -> int:
        return self.vision.image_size

    @property
    def prefix_depth(self) -> int:
        return self.lm.depth

    @property
    def suffix_state_tokens(self) -> int:
        """Tokens before the actions in the expert's suffix: pi0's state token, none in pi0.5."""
        return 0 if self.pi05 else 1


_SMALL_VISION = SiglipDims(hidden_size=192, num_layers=12, num_heads=3, intermediate_size=768)
_TINY_VISION = SiglipDims(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, image_size=56)
_SMALL = dict(vision=_SMALL_VISION, lm=GemmaDims(256, 18, 1024, 8, 1, 32), expert=GemmaDims(128, 18, 512, 8, 1, 32),
              vocab_size=32000, chunk_size=10)
_TINY = dict(vision=_TINY_VISION, lm=GemmaDims(64, 2, 128, 8, 1, 16), expert=GemmaDims(48, 2, 96, 8, 1, 16),
             vocab_size=32000, chunk_size=10)

PRESETS: dict[str, PiConfig] = {
    # published: PaliGemma-3B (SigLIP So400m/14 at 224 + Gemma-2B) and the Gemma-300M expert, 50-action chunks
    "pi0": PiConfig("pi0", "pi0"),
    "pi05": PiConfig("pi05", "pi05", max_token_len=200, state_in_prompt=True),
    # openpi's pi05_libero: no state in the prompt, 10-action chunks
    "pi05-libero": PiConfig("pi05-libero", "pi05", max_token_len=200, chunk_size=10),
    # CPU studies: the published depth (18 + 18, 8 heads to 1 K/V head), widths 1/8, a 12-block SigLIP, 10 actions
    "pi0-small": PiConfig("pi0-small", "pi0", **_SMALL),
    "pi05-small": PiConfig("pi05-small", "pi05", max_token_len=200, state_in_prompt=True, **_SMALL),
    # tests: the parity fixture's dims (tests/fixtures/pi0_tiny, pi05_tiny; their vocabulary is 320)
    "pi0-tiny": PiConfig("pi0-tiny", "pi0", **_TINY),
    "pi05-tiny": PiConfig("pi05-tiny", "pi05", max_token_len=200, state_in_prompt=True, **_TINY),
}


def get_preset(name: str) -> PiConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown pi0/pi0.5 preset {name!r}; known: {', '.join(PRESETS)}") from None


def with_dims(config, **changes):
    """A config (PiConfig, SiglipDims) with other fields (e.g. a checkpoint's chunk size)."""
    return replace(config, **changes)
