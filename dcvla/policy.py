"""The streaming policy API every method shares: `reset()` at each episode, `step(image, instruction)` per frame."""

from __future__ import annotations

import os

import numpy as np
import torch
from PIL import Image

from .checkpoint import load_pretrained, resolve_checkpoint_dir
from .config import get_preset
from .model import ActionPrediction, OpenVLA, random_model
from .processing import Processor, load_tokenizer


class VLAPolicy:
    """OpenVLA as a closed-loop policy (lerobot-style `reset()` / `step()`).

    Args:
        model: the VLA.
        processor: turns (image, instruction) into model inputs.
        unnorm_key: which dataset statistics un-normalise actions (None: the only one the model has).
        name: the method's name, as results and datasets label it.
    """

    def __init__(self, model: OpenVLA, processor: Processor, unnorm_key: str | None = None, name: str = "vanilla") -> None:
        self.model = model
        self.processor = processor
        self.name = name
        model.action_stats(unnorm_key)  # fail now, naming the available keys, rather than at the first step
        self.unnorm_key = unnorm_key
        self.last: ActionPrediction | None = None

    @classmethod
    def from_preset(cls, preset: str = "tiny", seed: int = 0, unnorm_key: str | None = None, **kwargs) -> "VLAPolicy":
        """Random weights of a preset's architecture with dcvla's offline tokenizer."""
        config = get_preset(preset)
        return cls(random_model(config, seed), Processor(load_tokenizer(), config), unnorm_key, **kwargs)

    @classmethod
    def from_pretrained(cls, path_or_id: str | os.PathLike, unnorm_key: str | None = None, preset: str | None = None,
                        dtype: torch.dtype = torch.float32, device: str = "cpu", **kwargs) -> "VLAPolicy":
        """A checkpoint in OpenVLA's layout; its own tokenizer if it ships one, else dcvla's offline one."""
        directory = resolve_checkpoint_dir(path_or_id)
        model = load_pretrained(directory, preset, dtype=dtype, device=device)
        folder = directory if directory.is_dir() else directory.parent
        has_tokenizer = any((folder / f).exists() for f in ("tokenizer.json", "tokenizer.model"))
        if model.config.name == "openvla-7b" and not has_tokenizer:
            raise FileNotFoundError(f"{folder} has no Llama-2 tokenizer (tokenizer.json or tokenizer.model)")
        tokenizer = load_tokenizer(folder if has_tokenizer else None)
        return cls(model, Processor(tokenizer, model.config), unnorm_key, **kwargs)

    def reset(self) -> None:
        """Start a new episode (the vanilla policy keeps no state across frames)."""
        self.last = None

    def step(self, image: np.ndarray | Image.Image, instruction: str) -> np.ndarray:
        """One frame -> the un-normalised 7-dim action; `self.last` keeps its tokens and logits."""
        input_ids, pixel_values = self.processor(image, instruction)
        self.last = self.model.predict_action(input_ids, pixel_values, self.unnorm_key)
        return self.last.action
