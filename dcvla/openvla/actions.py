"""Action tokens <-> continuous actions, as OpenVLA does it.

The action space is discretised into 256 uniform bins on [-1, 1] (255 bin centres). Token ids count down
from the top of the text vocabulary: id = text_vocab_size - bin_index, so the 256 least-used Llama tokens
carry the actions. Normalised actions are mapped back to the robot's units with the dataset's 1st and 99th
percentiles (`dataset_statistics.json`), only on the dimensions whose `mask` is true (the gripper is not).
"""

from __future__ import annotations

from typing import Mapping

import numpy as np


class ActionTokenizer:
    """Uniform binning of [-1, 1] onto the last `n_bins` ids below `text_vocab_size`."""

    def __init__(self, text_vocab_size: int = 32000, n_bins: int = 256) -> None:
        self.text_vocab_size = text_vocab_size
        self.bins = np.linspace(-1.0, 1.0, n_bins)                  # [n_bins] bin edges
        self.bin_centers = (self.bins[:-1] + self.bins[1:]) / 2.0   # [n_bins - 1]

    def encode(self, normalized: np.ndarray) -> np.ndarray:
        """Normalised actions in [-1, 1] -> token ids (values outside are clipped)."""
        index = np.digitize(np.clip(normalized, -1.0, 1.0), self.bins)  # 1..n_bins
        return (self.text_vocab_size - index).astype(np.int64)

    def decode(self, token_ids: np.ndarray) -> np.ndarray:
        """Token ids -> bin centres in [-1, 1]; ids outside the action range clip to the nearest bin."""
        index = np.clip(self.text_vocab_size - np.asarray(token_ids) - 1, 0, self.bin_centers.shape[0] - 1)
        return self.bin_centers[index]


def unnormalize_action(normalized: np.ndarray, stats: Mapping[str, list], eps: float = 0.0) -> np.ndarray:
    """[-1, 1] -> robot units: 0.5 * (a + 1) * (q99 - q01 + eps) + q01 where `mask`, unchanged elsewhere.

    `normalized` is one action [action_dim] or a chunk [step, action_dim]. OpenVLA uses no `eps`; OpenVLA-OFT adds
    1e-8 to the range (its `_unnormalize_actions`).
    """
    low, high = np.asarray(stats["q01"], dtype=np.float64), np.asarray(stats["q99"], dtype=np.float64)
    mask = np.asarray(stats.get("mask", np.ones_like(low, dtype=bool)), dtype=bool)
    if low.shape[-1:] != normalized.shape[-1:]:
        raise ValueError(f"dataset statistics have {low.shape[0]} action dims, the model predicts {normalized.shape[-1]}")
    return np.where(mask, 0.5 * (normalized + 1.0) * (high - low + eps) + low, normalized)
