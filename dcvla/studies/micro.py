"""The micro policies the project ships (docs/micro.md): small policies of the published architectures, trained here
on the scripted demonstrations of one task per LIBERO suite (`dcvla.libero.episodes.DEMO_TASKS`); not OpenVLA or
SmolVLA. Each checkpoint is in its family's published layout under `checkpoints/<preset>` and is loaded by that
family's strict loader, so every cache method, reuse mode and gate applies to it unchanged.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

#: Where the shipped checkpoints live (the repository's `checkpoints/`).
CHECKPOINT_DIR = Path(__file__).resolve().parents[2] / "checkpoints"
#: Every micro preset, with the family that loads it.
MICRO_FAMILIES = {"openvla-micro": "openvla", "oft-micro": "openvla", "smolvla-micro": "smolvla"}
#: The micro presets whose trained checkpoints are committed (a test loads each and runs it in the simulator).
SHIPPED: tuple[str, ...] = ("smolvla-micro",)
#: The committed one-task checkpoints (docs/micro.md): name -> (micro preset, suite, task it was trained on).
ONE_TASK: dict[str, tuple[str, str, int]] = {"smolvla-micro-goal": ("smolvla-micro", "libero_goal", 8),
                                             "oft-micro-goal": ("oft-micro", "libero_goal", 8),
                                             "oft-micro-spatial": ("oft-micro", "libero_spatial", 0),
                                             "oft-micro-object": ("oft-micro", "libero_object", 0),
                                             "oft-micro-10": ("oft-micro", "libero_10", 4)}


def micro_checkpoint(preset: str) -> Path:
    """`checkpoints/<preset>`; a clear error when the preset is no micro preset or its checkpoint is not there."""
    if preset not in MICRO_FAMILIES:
        raise ValueError(f"unknown micro preset {preset!r}; known: {', '.join(MICRO_FAMILIES)}")
    path = CHECKPOINT_DIR / preset
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no {preset} checkpoint; train it with "
                                f"`.venv/bin/python scripts/train_micro.py {preset}` (docs/micro.md)")
    return path


#: The file that marks each published layout: lerobot's (the flow policies') and OpenVLA's.
LAYOUT_FILES = {"lerobot": "config.json", "openvla": "dataset_statistics.json"}


def shipped_checkpoints(layout: str | None = None) -> list[str]:
    """The names of the committed checkpoints (`checkpoints/<name>` holding safetensors weights), of one `layout`
    ("lerobot", "openvla") or of both: the micro presets' and those of one-task runs such as `smolvla-micro-goal`
    (docs/micro.md)."""
    if not CHECKPOINT_DIR.is_dir():
        return []
    marks = [LAYOUT_FILES[layout]] if layout else list(LAYOUT_FILES.values())
    return sorted(p.name for p in CHECKPOINT_DIR.iterdir()
                  if any(p.glob("*.safetensors")) and any((p / mark).is_file() for mark in marks))


def resolve_micro(checkpoint: str) -> str | Path:
    """A study's `checkpoint` parameter: a micro preset's name is its shipped checkpoint, as is the name of any other
    committed checkpoint; anything else (a directory, a hub id) is returned as given."""
    if checkpoint in MICRO_FAMILIES:
        return micro_checkpoint(checkpoint)
    return CHECKPOINT_DIR / checkpoint if checkpoint in shipped_checkpoints() else checkpoint


def center_crop(preset: str) -> bool:
    """Whether the LIBERO evaluation center-crops what `preset` sees: OpenVLA's protocol does (its LIBERO fine-tunes,
    and the OpenVLA micro policies' training frames, are cropped; OpenVLA-OFT's crops both views), the flow
    policies' does not."""
    return MICRO_FAMILIES[preset] == "openvla"


def load_micro(preset: str, dtype: torch.dtype = torch.float32, device: str = "cpu",
               checkpoint: str | Path | None = None, replan_steps: int | None = None) -> Any:
    """The micro policy `preset` without caching (OpenVLA's `vanilla`; the flow policies' reuse mode `none`), loaded
    strictly from `checkpoint` (default: the shipped `checkpoints/<preset>`; a training run's `--out` otherwise).
    `replan_steps`: actions of each chunk executed before the next inference, 1 to the chunk's length (default the
    family's protocol: OFT's 8, the flow policies' 5)."""
    shipped = micro_checkpoint(preset) if checkpoint is None else None  # checks the preset's name too
    path = shipped or Path(checkpoint)
    if MICRO_FAMILIES.get(preset) is None:
        raise ValueError(f"unknown micro preset {preset!r}; known: {', '.join(MICRO_FAMILIES)}")
    if MICRO_FAMILIES[preset] == "openvla":
        from ..openvla.loading import vanilla_policy
        from ..openvla.train import STATS_KEY

        policy = vanilla_policy(checkpoint=path, unnorm_key=STATS_KEY, dtype=dtype, device=device)
        chunk = getattr(policy.model.config, "chunk_size", 1)  # OpenVLA's single action: a chunk of one
    else:
        from ..prefix_reuse import ReuseConfig
        from ..smolvla import SmolVLAPolicy

        # a flow policy given no ReuseConfig reuses the prefix K/V (the "full" mode at cosine 0.985): say "none"
        policy = SmolVLAPolicy.from_pretrained(path, ReuseConfig(mode="none"), dtype=dtype, device=device)
        chunk = policy.model.config.chunk_size
    if replan_steps is None:
        return policy
    if not 1 <= replan_steps <= chunk:
        raise ValueError(f"replan_steps must be 1 to {chunk} (the chunk of {path}), got {replan_steps}")
    if MICRO_FAMILIES[preset] == "openvla":
        policy.replan_steps = replan_steps
        return policy
    return policy.with_config(dataclasses.replace(policy.config, replan_steps=replan_steps))
