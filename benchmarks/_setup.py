"""What the benchmark scripts share: `--device` / `--dtype` placement of a model and device-synchronised timing.

Timing on a GPU: kernels run asynchronously, so a wall-clock interval means the device's work only when the
device is synchronised at both ends (`timer`, as `dcvla.streaming.StageClock` does for the policies' stages).
"""

from __future__ import annotations

import contextlib
import time
from typing import Iterator

import numpy as np
import torch

from dcvla.libero.protocol import decode_frame

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


def synchronize(device: torch.device | str) -> None:
    """Wait for the device's queued work (a no-op on the CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def timer(device: torch.device | str, out: dict, key: str = "ms") -> Iterator[None]:
    """Wall-clock milliseconds of the block into out[key], the device synchronised before and after."""
    synchronize(device)
    start = time.perf_counter()
    yield
    synchronize(device)
    out[key] = (time.perf_counter() - start) * 1e3


def first_frames(episode, n: int) -> list[np.ndarray]:
    """`episode.frames[:n]`, decoding only those n (`Episode.frames` decodes every frame of the episode)."""
    return [decode_frame(jpeg) for jpeg in episode.jpegs[:n]]
