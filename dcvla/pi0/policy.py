"""`Pi0Policy`: pi0 or pi0.5 as a `dcvla.flow_policy.FlowPolicy` (K/V reuse across inferences under a mode and a
gate of `dcvla.prefix_reuse`): openpi's and lerobot's prompt, SigLIP's image size, the constructors.

| span   | pi0                                                  | pi0.5                                             |
|--------|------------------------------------------------------|---------------------------------------------------|
| vision | the present cameras' image tokens (prefix)           | the same                                          |
| text   | the prompt (prefix)                                  | the prompt's words ("Task: ..., State:" / ";\\nAction: ") |
| state  | the state token's K/V in the expert (it attends only | the state's bin tokens in the prompt (prefix)     |
|        | to the prefix and itself: computed once per inference)|                                                  |
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from ..flow_policy import FlowPolicy, FlowStepRecord, StepInputs
from ..images import resize_image
from ..prefix_reuse import COMPARE_TO, GATES, MODES, ReuseConfig, ReuseMode
from ..tokenizer import load_tokenizer
from .checkpoint import load_pretrained
from .model import random_model

__all__ = ["COMPARE_TO", "GATES", "MODES", "Pi0Policy", "Pi0StepRecord", "ReuseConfig", "ReuseMode", "StepInputs"]

Pi0StepRecord = FlowStepRecord


class Pi0Policy(FlowPolicy):
    """pi0 or pi0.5 behind the streaming API (`FlowPolicy`): openpi's base and left-wrist cameras take [agent view,
    wrist view]; the prompt starts with BOS (PaliGemma's tokenizer).

    Args:
        model: the model (`PiModel`, pi0 or pi0.5), with its normalisation.
        tokenizer: the prompt tokenizer (BOS first; a fast tokenizer: pi0.5 locates the state's tokens by offsets).
        config, seed: see `FlowPolicy`.
    """

    family = "pi0"
    prepend_bos = True

    @classmethod
    def from_preset(cls, preset: str = "pi0-tiny", seed: int = 0, config: ReuseConfig | None = None) -> "Pi0Policy":
        """Random weights of a preset with dcvla's offline tokenizer; `seed` seeds the weights and the noise."""
        return cls(random_model(preset, seed), load_tokenizer(), config, seed=seed)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, config: ReuseConfig | None = None, preset: str | None = None,
                        dtype: torch.dtype | str = torch.float32, device: str = "cpu", tokenizer: str | None = None,
                        seed: int = 0) -> "Pi0Policy":
        """A lerobot pi0 / pi0.5 checkpoint (`dcvla.pi0.load_pretrained`, strict). The PaliGemma tokenizer is not in
        lerobot's checkpoints: give its directory (`tokenizer`, e.g. a download of google/paligemma-3b-pt-224), or the
        checkpoint's own if it ships one."""
        folder = Path(tokenizer or path)
        if not any((folder / name).exists() for name in ("tokenizer.json", "tokenizer.model")):
            raise FileNotFoundError(f"no PaliGemma tokenizer in {folder} (tokenizer.json or tokenizer.model); pass "
                                    "tokenizer= a directory holding google/paligemma-3b-pt-224's")
        model = load_pretrained(path, preset, dtype=dtype, device=device)
        return cls(model, load_tokenizer(folder), config, seed=seed)

    def prompt(self, instruction: str, state_n: np.ndarray) -> tuple[str, tuple[int, int]]:
        """pi0 (and openpi's pi05_libero): the instruction cleaned (underscores and newlines to spaces) + "\\n".
        pi0.5 with `state_in_prompt` (lerobot): "Task: {cleaned}, State: {bins};\\nAction: ", the normalised state
        cut into 256 bins over [-1, 1] (`np.digitize(x, linspace(-1, 1, 257)[:-1]) - 1`)."""
        cleaned = instruction.strip().replace("_", " ").replace("\n", " ")
        if not self.model.config.state_in_prompt:
            return cleaned + "\n", (0, 0)
        bins = np.digitize(state_n, bins=np.linspace(-1, 1, 256 + 1)[:-1]) - 1
        head, numbers = f"Task: {cleaned}, State: ", " ".join(map(str, bins))
        return f"{head}{numbers};\nAction: ", (len(head), len(head) + len(numbers))

    def resize(self, images: list[np.ndarray]) -> torch.Tensor:
        """SigLIP's square input: each image resized whole (bicubic) to the model's size, in [0, 1]."""
        size = self.model.config.image_size
        sized = [image if image.shape[:2] == (size, size) else resize_image(image, size) for image in images]
        return (torch.from_numpy(np.stack(sized)).permute(0, 3, 1, 2).float() / 255.0).to(self.model.device)
