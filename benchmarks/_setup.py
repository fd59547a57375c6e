"""What the benchmark scripts share: `--device` / `--dtype` placement of a model, device-synchronised timing, and the
policy of a preset with its per-frame inputs (OpenVLA or OpenVLA-OFT).

Timing on a GPU: kernels run asynchronously, so a wall-clock interval means the device's work only when the
device is synchronised at both ends (`timer`, from `dcvla.timing`, as `dcvla.streaming.StageClock` does for the
policies' stages).
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from dcvla.libero.protocol import decode_frame
from dcvla.timing import timer  # noqa: F401  (the scripts' timer)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def place_model(model: torch.nn.Module, device: str, dtype: torch.dtype) -> torch.nn.Module:
    """Move a model (OpenVLA or Pi0) to `device` and `dtype`, in place; returns it.

    DEVICES: the one call site of every script. `dcvla.devices.place` keeps the rotary embeddings' inverse
    frequencies in float32; without that module (it is new), a plain `.to()`, which casts them too.
    """
    try:
        from dcvla.devices import place
    except ImportError:
        return model.to(device=torch.device(device), dtype=dtype)
    return place(model, device, dtype)


def first_frames(episode, n: int) -> list[np.ndarray]:
    """`episode.frames[:n]`, decoding only those n (`Episode.frames` decodes every frame of the episode)."""
    return [decode_frame(jpeg) for jpeg in episode.jpegs[:n]]


OFT_NOTE = ("OpenVLA-OFT: each frame's third-person image is the episode's agent view and its wrist image the episode's "
            "wrist camera (an episode recorded without one, format_version 1, gives its agent view as both); the state "
            "is the episode's eef_pos + axis-angle(eef_quat) + gripper_qpos (8 dims)")


def is_oft(preset: str) -> bool:
    from dcvla.openvla.oft import PRESETS as OFT_PRESETS

    return preset in OFT_PRESETS


def base_policy(preset: str, seed: int = 0):
    """The preset's cached policy behind `vanilla` (random weights, not yet placed): `OFTCachedPolicy` for an
    OpenVLA-OFT preset (oft-tiny, oft-small, ...), else `CachedPolicy`; other methods come from `with_config`."""
    from dcvla.openvla import CacheConfig
    from dcvla.openvla.loading import policy_type

    return policy_type(preset).from_preset(preset, seed=seed, config=CacheConfig("vanilla"))


def has_wrist(episode) -> bool:
    """The episode holds wrist-camera frames (`wrist_jpegs`, episodes of format_version 2 on)."""
    return getattr(episode, "wrist_jpegs", None) is not None


def step_inputs(policy, episode, n: int, process: Callable[[np.ndarray], np.ndarray] | None = None) -> list[tuple]:
    """The `policy.step` arguments of the episode's first n frames, each frame passed through `process` (e.g. the
    protocol's center crop): (image, instruction); for OpenVLA-OFT ([agent view, wrist view], instruction, state),
    the agent view standing in for a wrist view the episode lacks (`OFT_NOTE`)."""
    from dcvla.openvla.oft import OFTCachedPolicy

    process = process or (lambda frame: frame)
    frames = [process(frame) for frame in first_frames(episode, n)]
    if not isinstance(policy, OFTCachedPolicy):
        return [(frame, episode.instruction) for frame in frames]
    wrist = [process(decode_frame(jpeg)) for jpeg in episode.wrist_jpegs[:n]] if has_wrist(episode) else frames
    return [([frame, hand], episode.instruction, state) for frame, hand, state in zip(frames, wrist, episode.states)]
