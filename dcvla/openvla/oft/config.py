"""OpenVLA-OFT configurations (LIBERO recipe): an OpenVLA backbone plus the proprio projector and the L1 head.

Upstream (moojink/openvla-oft, `prismatic/vla/constants.py`) fixes the LIBERO numbers: chunks of 8 actions of 7
dims, an 8-dim proprio state, BOUNDS_Q99 normalisation; `experiments/robot/openvla_utils.py` builds the L1 head
with hidden_dim = llm_dim and the proprio projector with llm_dim outputs. The presets keep the OpenVLA presets'
towers and Llama and add these modules.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

from ..config import PRESETS as OPENVLA_PRESETS
from ..config import OpenVLAConfig


@dataclass(frozen=True)
class OFTConfig(OpenVLAConfig):
    """A full OpenVLA-OFT model: the OpenVLA fields, then OFT's."""

    # inputs
    num_images: int = 2               # third-person, then wrist; each through both towers
    proprio_dim: int = 8              # LIBERO state: eef pos (3) + axis-angle (3) + gripper qpos (2)
    # action chunk (action_dim is OpenVLA's field, 7)
    chunk_size: int = 8               # NUM_ACTIONS_CHUNK: actions predicted per forward
    stop_token_id: int = 2            # STOP_INDEX, '</s>': the token after the action slots
    # L1 regression head (MLPResNet)
    head_hidden: int | None = None    # None: llm hidden, as upstream (hidden_dim=llm_dim)
    head_blocks: int = 2              # residual blocks

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("num_images", "proprio_dim", "chunk_size", "head_blocks", "action_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"OFTConfig.{name}={getattr(self, name)} must be >= 1")
        if self.head_hidden is not None and self.head_hidden < 1:
            raise ValueError(f"OFTConfig.head_hidden={self.head_hidden} must be >= 1 (or None for the llm hidden size)")

    @property
    def num_vision_tokens(self) -> int:
        """Patch tokens of all images (256 per image)."""
        return self.num_patches * self.num_images

    @property
    def num_action_slots(self) -> int:
        """Placeholder positions after the prompt: one per action dim per chunk step (56)."""
        return self.action_dim * self.chunk_size

    @property
    def head_dims(self) -> tuple[int, int, int]:
        """(input: action_dim consecutive slot states, hidden, output) of the L1 head's MLPResNet."""
        hidden = self.head_hidden or self.llm.hidden_size
        return self.action_dim * self.llm.hidden_size, hidden, self.action_dim


def from_openvla(base: OpenVLAConfig, name: str, **changes) -> OFTConfig:
    """The OFT config with `base`'s towers and Llama, named `name`."""
    return OFTConfig(**{f.name: getattr(base, f.name) for f in fields(base)} | {"name": name} | changes)


PRESETS: dict[str, OFTConfig] = {
    # The published moojink/openvla-7b-oft-finetuned-libero-*: openvla-7b's towers and Llama-2-7B, head hidden 4096.
    "openvla-oft-7b": from_openvla(OPENVLA_PRESETS["openvla-7b"], "openvla-oft-7b"),
    "oft-small": from_openvla(OPENVLA_PRESETS["small"], "oft-small"),
    "oft-tiny": from_openvla(OPENVLA_PRESETS["tiny"], "oft-tiny"),
    # openvla-micro's towers and Llama with OFT's heads, trained here on the project's demonstrations
    # (scripts/train_micro.py oft-micro, docs/micro.md). The towers cut 224 px frames into 28 px patches: an 8 x 8
    # grid, 64 tokens per tower and view, as smolvla-micro's 28 px patches (16 tokens a camera after its pixel
    # shuffle) see the scene. With openvla-micro's 14 px patches (256 tokens a view, 586 positions) a training step
    # cost 2.6 times as much, and 5000 steps of 8 did not learn the task (docs/micro.md, section 2).
    "oft-micro": from_openvla(OPENVLA_PRESETS["openvla-micro"], "oft-micro",
                              dino=replace(OPENVLA_PRESETS["openvla-micro"].dino, patch_size=28),
                              siglip=replace(OPENVLA_PRESETS["openvla-micro"].siglip, patch_size=28)),
}
# An OpenVLA preset name (what an OpenVLA-layout checkpoint records) -> its OFT preset: the same towers and Llama.
FROM_OPENVLA_PRESET = {"openvla-7b": "openvla-oft-7b", "small": "oft-small", "tiny": "oft-tiny"}


def get_preset(name: str) -> OFTConfig:
    """Return the OFT preset called `name`; an unknown name raises a ValueError listing the known ones."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown OpenVLA-OFT preset {name!r}; known presets: {', '.join(sorted(PRESETS))}") from None
