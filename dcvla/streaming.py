"""What every streaming policy (`reset()` per episode, `step()` per frame) shares: the episode guard, the stage
clock and the arguments of its steps."""

from __future__ import annotations

import contextlib
import time
from typing import Iterator

import numpy as np
import torch


class EpisodeGuard:
    """Remembers the episode's image size and prompt: a cache holds one episode's values, so a change of either
    without `reset()` is an error, never silent reuse of another episode's K/V. It also remembers a step that failed
    after it had started to change the caches (`changing`): every later step is refused (`check_usable`) until
    `reset()`, rather than run on caches that mix two frames."""

    def __init__(self, owner: str) -> None:
        self.owner = owner  # named in the error: the method or mode whose caches would be reused
        self.key: tuple | None = None
        self.broken = False

    def reset(self) -> None:
        self.key = None
        self.broken = False

    def check_usable(self) -> None:
        if self.broken:
            raise RuntimeError(f"the previous step of this {self.owner} policy failed mid-way, so its caches may mix "
                               "two frames; call reset() before the next step")

    @contextlib.contextmanager
    def changing(self) -> Iterator[None]:
        """The part of a step that changes the episode's caches: any error in it marks the policy broken."""
        try:
            yield
        except BaseException:
            self.broken = True
            raise

    def check(self, image_shape: tuple[int, ...], input_ids: torch.Tensor) -> None:
        key = (tuple(image_shape), tuple(input_ids[0].tolist()))
        if self.key is not None and key != self.key:
            what = "image size" if key[0] != self.key[0] else "prompt"
            raise RuntimeError(f"the {what} changed within an episode (the {self.owner} caches hold the previous "
                               "one's values); call reset() before a new episode")
        self.key = key


class StageClock:
    """Wall-clock milliseconds per named stage of one step. On a CUDA device each stage is bracketed by a device
    synchronisation, so a stage's time is the kernels it launched, not the time to queue them."""

    def __init__(self, device: torch.device | str) -> None:
        self.sync = torch.device(device).type == "cuda"
        self.ms: dict[str, float] = {}

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        if self.sync:
            torch.cuda.synchronize()
        start = time.perf_counter()
        yield
        if self.sync:
            torch.cuda.synchronize()
        self.ms[name] = self.ms.get(name, 0.0) + (time.perf_counter() - start) * 1e3


def step_args(policy, frames: np.ndarray, instruction: str, states: np.ndarray | None = None) -> list[tuple]:
    """`policy.step`'s arguments for each frame: (frame, instruction); [agent view, wrist view] for a policy that
    takes the wrist camera too (`uses_wrist`, frames [frame, 2, H, W, 3]); the frame's robot state third for one
    that takes it (`uses_state`).

    Raises:
        ValueError: a policy that takes the state without one state per frame.
    """
    view = list if getattr(policy, "uses_wrist", False) else (lambda frame: frame)
    if not getattr(policy, "uses_state", False):
        return [(view(frame), instruction) for frame in frames]
    if states is None or len(states) != len(frames):
        raise ValueError(f"{type(policy).__name__} needs one robot state per frame: got {len(frames)} frames and "
                         f"{'no' if states is None else len(states)} states")
    return [(view(frame), instruction, state) for frame, state in zip(frames, states)]
