"""`SmolVLAPolicy`: SmolVLA as a `dcvla.flow_policy.FlowPolicy` (K/V reuse across inferences under a mode and a gate
of `dcvla.prefix_reuse`): lerobot's prompt and image preprocessing, the constructors.

| span   | SmolVLA                                                                          |
|--------|----------------------------------------------------------------------------------|
| vision | the present cameras' image tokens (64 each after the pixel shuffle), first       |
| text   | the prompt (the task and "\\n", as lerobot's NewLineTaskProcessorStep)           |
| state  | the state token (`state_proj` of the normalised, padded state), last; only it    |
|        | attends to itself, so the image and prompt K/V do not depend on the state        |

Every layer's K/V of the prefix are in the store, including what the expert's cross-attention layers read (their
own projections of it are made once per inference from the store). With no reuse (mode `none`) an inference is
lerobot's: the prefix computed once and read by all ten Euler steps (lerobot's within-call prefix cache), the
baseline every cross-frame mode is measured against.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from ..flow import resize_with_pad
from ..flow_policy import FlowPolicy
from ..prefix_reuse import ReuseConfig
from ..tokenizer import load_tokenizer
from .checkpoint import load_pretrained, save_pretrained
from .model import random_model


class SmolVLAPolicy(FlowPolicy):
    """SmolVLA behind the streaming API (`FlowPolicy`): [agent view, wrist view] are lerobot LIBERO's `image` and
    `wrist_image`; the prompt is tokenized as the tokenizer gives it (no BOS added, as lerobot's tokenizer step)."""

    family = "smolvla"

    @classmethod
    def from_preset(cls, preset: str = "smolvla-tiny", seed: int = 0, config: ReuseConfig | None = None) -> "SmolVLAPolicy":
        """Random weights of a preset with dcvla's offline tokenizer; `seed` seeds the weights and the noise."""
        return cls(random_model(preset, seed), load_tokenizer(), config, seed=seed)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, config: ReuseConfig | None = None, preset: str | None = None,
                        dtype: torch.dtype | str = torch.float32, device: str = "cpu", tokenizer: str | None = None,
                        seed: int = 0) -> "SmolVLAPolicy":
        """A lerobot SmolVLA checkpoint (`dcvla.smolvla.load_pretrained`, strict). SmolVLM2's tokenizer is not in
        lerobot's checkpoints: give its directory (`tokenizer`, a download of HuggingFaceTB/SmolVLM2-500M-Video-Instruct),
        or the checkpoint's own if it ships one."""
        try:
            words = load_tokenizer(tokenizer or path)
        except FileNotFoundError as err:
            raise FileNotFoundError(f"{err}: SmolVLA needs SmolVLM2's tokenizer; pass tokenizer= a directory holding "
                                    "HuggingFaceTB/SmolVLM2-500M-Video-Instruct's") from None
        return cls(load_pretrained(path, preset, dtype=dtype, device=device), words, config, seed=seed)

    def save_pretrained(self, directory: str | os.PathLike, dtype: torch.dtype | None = torch.bfloat16) -> Path:
        """The model in lerobot's layout (`dcvla.smolvla.checkpoint.save_pretrained`) with the policy's tokenizer
        beside it, so `from_pretrained(directory)` needs nothing else (lerobot's checkpoints ship no tokenizer)."""
        directory = save_pretrained(self.model, directory, dtype)
        self.tokenizer.save_pretrained(directory)
        return directory

    def prompt(self, instruction: str, state_n: np.ndarray) -> tuple[str, tuple[int, int]]:
        """lerobot's: the task as given, with "\\n" appended unless it ends with one; the state is not in it."""
        return (instruction if instruction.endswith("\n") else instruction + "\n"), (0, 0)

    def resize(self, images: list[np.ndarray]) -> torch.Tensor:
        """lerobot's `resize_with_pad` of each image (in [0, 1], on the device) to the model's square: scaled to fit
        (bilinear), padded on the left and the top with 0 (-1 after `x * 2 - 1`)."""
        size, device = self.model.config.image_size, self.model.device
        pixels = [torch.from_numpy(image).to(device).permute(2, 0, 1)[None].float() / 255.0 for image in images]
        return torch.cat([resize_with_pad(px, size, size, pad_value=0.0) for px in pixels])
