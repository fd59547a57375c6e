"""What the flow-matching VLA families (pi0, pi0.5, SmolVLA) compute alike: the prefix's inputs and outputs, the
sinusoidal time embedding, the Euler integration of the action chunk, and lerobot's resize-with-pad of an image.

Facts from lerobot 0.6.1 (`policies/common/vla_utils.py`, `policies/common/flow_matching.py`), held to lerobot's
numbers by each family's parity test (`tests/test_pi_parity.py`, `tests/test_smolvla_parity.py`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as TF

from . import flops as F


@dataclass
class PrefixInputs:
    """One inference's prefix: the present cameras' image tokens, the prompt's unpadded tokens and, where the family
    puts it there (SmolVLA), the robot state's one token, last."""

    images: list[torch.Tensor]           # per present camera [1, tokens_per_image, lm_width]
    text: torch.Tensor                   # [1, text, lm_width]
    state: torch.Tensor | None = None    # [1, 1, lm_width]

    @property
    def num_image_tokens(self) -> int:
        return sum(image.shape[1] for image in self.images)

    @property
    def length(self) -> int:
        return self.num_image_tokens + self.text.shape[1] + (0 if self.state is None else self.state.shape[1])

    @property
    def spans(self) -> dict[str, slice]:
        """The prefix rows of the image tokens, the prompt and the state token (empty without one)."""
        n_vision, n_text = self.num_image_tokens, self.text.shape[1]
        return {"vision": slice(0, n_vision), "text": slice(n_vision, n_vision + n_text),
                "state": slice(n_vision + n_text, self.length)}

    def embeddings(self) -> torch.Tensor:
        """[1, prefix, lm_width]."""
        return torch.cat([*self.images, self.text, *([] if self.state is None else [self.state])], dim=1)


@dataclass
class PrefixOutput:
    work: list[F.LayerWork]   # per layer
    reused: torch.Tensor      # [layer, prefix] bool (host): K/V taken from the store


def time_embedding(t: torch.Tensor, width: int, min_period: float, max_period: float) -> torch.Tensor:
    """lerobot's (openpi's) `create_sinusoidal_pos_embedding` of t [batch] (float32) -> [batch, width] as
    [sin | cos], float64 inside, returned in t's dtype."""
    if width % 2:
        raise ValueError(f"the time embedding's width must be even, got {width}")
    fraction = torch.linspace(0.0, 1.0, width // 2, dtype=torch.float64, device=t.device)
    period = min_period * (max_period / min_period) ** fraction
    angle = (1.0 / period * 2 * math.pi)[None, :] * t[:, None]
    return torch.cat([torch.sin(angle), torch.cos(angle)], dim=1).to(t.dtype)


def euler(velocity: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], noise: torch.Tensor, steps: int) -> torch.Tensor:
    """lerobot's `euler_integrate` (openpi's sampling loop) in float32: from x = noise at t = 1, `steps` steps of
    x += dt * velocity(x, t) with dt = -1 / steps and t = 1 + step * dt, to the actions at t = 0."""
    dt = -1.0 / steps
    x = noise.float()
    for step in range(steps):
        t = torch.tensor([1.0 + step * dt], dtype=torch.float32, device=x.device)
        x = x + dt * velocity(x, t)
    return x


def resize_with_pad(images: torch.Tensor, height: int, width: int, pad_value: float = 0.0) -> torch.Tensor:
    """lerobot's `resize_with_pad` (SmolVLA's convention) of [batch, channel, h, w] float images: scaled by one ratio
    to fit (bilinear, no antialias, `int()` of each side), then padded on the left and the top with `pad_value`.
    An image already at the size is returned as is."""
    if images.ndim != 4:
        raise ValueError(f"resize_with_pad needs [batch, channel, height, width], got shape {tuple(images.shape)}")
    h, w = images.shape[2:]
    if (h, w) == (height, width):
        return images
    ratio = max(w / width, h / height)
    resized = TF.interpolate(images, size=(int(h / ratio), int(w / ratio)), mode="bilinear", align_corners=False)
    pad_h, pad_w = max(0, height - resized.shape[2]), max(0, width - resized.shape[3])
    return TF.pad(resized, (pad_w, 0, pad_h, 0), value=pad_value)
