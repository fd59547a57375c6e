"""OpenVLA-OFT inputs: two images per step, the proprio state and the prompt; the state's normalisation.

Each image goes through OpenVLA's processor (`dcvla.openvla.processing.preprocess_image`: 6 channels, DINOv2's
then SigLIP's); the images are stacked on the channel dim, third-person first, as upstream's `get_vla_action`
concatenates the processor outputs. The prompt is OpenVLA's, with the bare "▁" appended (upstream's
`predict_action` appends Llama-2 id 29871, the same piece). The state is normalised with the dataset's q01/q99
(BOUNDS_Q99, `normalize_proprio` in upstream's `experiments/robot/openvla_utils.py`). The LIBERO evaluation's own
image steps before the processor (JPEG round trip, lanczos resize to 224, 0.9-area center crop) belong to the caller.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import torch

from ..processing import Processor, preprocess_image
from .config import OFTConfig

IMAGE_NAMES = ("third-person", "wrist")


def check_state(state, config: OFTConfig) -> np.ndarray:
    """The proprio state as float64 [proprio_dim]; a ValueError naming the length or the bad values otherwise."""
    if isinstance(state, torch.Tensor):
        state = state.detach().cpu().numpy()
    array = np.asarray(state, dtype=np.float64)
    if array.shape != (config.proprio_dim,):
        raise ValueError(f"state must be {config.proprio_dim} numbers (LIBERO: eef pos 3 + axis-angle 3 + gripper qpos 2); "
                         f"got shape {array.shape}")
    if not np.isfinite(array).all():
        raise ValueError(f"state has NaN or infinite values: {array.tolist()}")
    return array


def normalize_proprio(state: np.ndarray, stats: Mapping[str, list]) -> np.ndarray:
    """Robot units -> [-1, 1]: clip(2 * (x - q01) / (q99 - q01 + 1e-8) - 1, -1, 1) where `mask` (all dims when absent)."""
    low, high = np.asarray(stats["q01"], dtype=np.float64), np.asarray(stats["q99"], dtype=np.float64)
    mask = np.asarray(stats.get("mask", np.ones_like(low, dtype=bool)), dtype=bool)
    if low.shape != state.shape:
        raise ValueError(f"proprio statistics have {low.shape[0]} dims, the state has {state.shape[0]}")
    return np.clip(np.where(mask, 2 * (state - low) / (high - low + 1e-8) - 1, state), -1.0, 1.0)


class OFTProcessor(Processor):
    """Turns (images, instruction) into `input_ids` [1, text] and `pixel_values` [1, 6 * num_images, size, size].

    Args:
        tokenizer: a Llama-style tokenizer that prepends BOS and has the bare "▁" piece.
        config: the OFT config (image count, size and per-tower normalisation, the sequence's parts).
    """

    config: OFTConfig

    def sequence_parts(self) -> tuple[tuple[tuple[int, str], ...], tuple[tuple[int, str], ...]]:
        """OFT's sequence: [BOS] + vision + proprio + prompt + action slots + stop, all in one forward."""
        return ((self.config.num_vision_tokens, "vision"), (1, "proprio")), \
            ((self.config.num_action_slots, "action slot"), (1, "stop"))

    def pixel_values(self, images: Sequence) -> torch.Tensor:
        """[third-person, wrist] RGB images -> pixel_values [1, 6 * num_images, size, size].

        Raises:
            TypeError / ValueError: not a list of `num_images` images, or an image that `validate_image` refuses
                (the message names which image).
        """
        n = self.config.num_images
        if not isinstance(images, (list, tuple)):
            raise TypeError(f"images must be a list of {n} images ({', '.join(IMAGE_NAMES[:n])}), "
                            f"got {type(images).__name__}")
        if len(images) != n:
            raise ValueError(f"OpenVLA-OFT takes {n} images per step ({', '.join(IMAGE_NAMES[:n])}); got {len(images)}")
        pixels = []
        for i, image in enumerate(images):
            try:
                pixels.append(preprocess_image(image, self.config))  # [1, 6, size, size]
            except (TypeError, ValueError) as err:
                name = IMAGE_NAMES[i] if i < len(IMAGE_NAMES) else f"#{i}"
                raise type(err)(f"image {i} ({name}): {err}") from err
        return torch.cat(pixels, dim=1)  # [1, 6 * num_images, size, size]

    def __call__(self, images: Sequence, instruction: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (input_ids [1, text], pixel_values [1, 6 * num_images, size, size])."""
        return self.encode_prompt(instruction), self.pixel_values(images)
