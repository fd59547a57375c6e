"""Which vision patches may reuse cached values: TTF-VLA's selector, and the unified selector of the dual cache.

`UnifiedTokenSelector` follows PKU-XLab/TTF-VLA (`experiments/robot/aptube_manager.py` at afbd6bf): keyframes at
frames 0, k, 2k, ... since the episode start; a patch is pixel-dynamic when the mean |dY| of its grayscale
difference to the previous frame exceeds a threshold; the top-k patches of the previous frame's text-to-vision
attention are always recomputed. TTF applies the grayscale weights to the *normalised* pixel values of each tower
(channels 0-2 DINOv2, 3-5 SigLIP) and keeps one mask per tower: `Selection.tower_reuse`, which the TTF baselines
use. The dual cache uses one mask for every tower and the LLM (`Selection.reuse`): a patch is dynamic when either
tower's test fires. On [0, 1] pixels the DINOv2 score is about 4.43x the plain grayscale difference (1/std per
channel: 4.37 R, 4.46 G, 4.44 B) and the SigLIP score exactly 2x, so TTF's published 0.03 equals ~0.0068 on
[0, 1] pixels (1.7 grey levels of 255) for DINOv2 and 0.015 for SigLIP. `pixel_space="unit"` thresholds the
[0, 1] grayscale difference instead (the same test for both towers).

Patch j of the 16x16 grid (row-major, row = image y) is LLM sequence position j + 1. The selection is checked
against TTF's own code by `tests/test_selector_parity.py` (fixture: `scripts/make_selector_parity_fixture.py`).
A model whose towers cut the image into another grid (`oft-micro`: 8 x 8 patches of 28 px) passes its `grid`; the
counts of a config are upstream's, for 256 patches (`scaled_count` carries them to another grid).

The selector reads the device once per frame (the pixel scores, with the count of non-finite pixels); the rest of
its decision is made on the host, where the previous frame's relevance already is.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..vision import SIGLIP_MEAN, SIGLIP_STD

GRID = 16                # patches a side of OpenVLA's 224 px image (14 px patches), as upstream hard-codes it
NUM_PATCHES = GRID * GRID
MAX_TEXT_TOKENS = 35  # TTF and VLA-Cache average at most the first 35 prompt rows (token_attention_merge)
GRAY_WEIGHTS = (0.299, 0.587, 0.114)
FUSIONS = ("hybrid", "pixel", "attention")
PIXEL_SPACES = ("ttf", "unit")


def check_int(owner: str, name: str, value, lo: int, hi: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo or (hi is not None and value > hi):
        bound = f"in [{lo}, {hi}]" if hi is not None else f">= {lo}"
        raise ValueError(f"{owner}.{name} must be an int {bound}, got {value!r}")


def scaled_count(count: int, num_patches: int) -> int:
    """A patch count of upstream's (for its 256 patches an image) on a grid of `num_patches`: the same share of the
    patches, rounded half up (TTF's top 70 of 256 is the top 18 of 64)."""
    return (count * num_patches + NUM_PATCHES // 2) // NUM_PATCHES


def check_float(owner: str, name: str, value, lo: float, hi: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not lo <= value <= hi:
        raise ValueError(f"{owner}.{name} must be a finite number in [{lo}, {hi}], got {value!r}")


@dataclass(frozen=True)
class SelectorConfig:
    pixel_threshold: float = 0.03     # TTF README: mean |dY| per patch above this => dynamic (scale: pixel_space)
    attention_top_k: int = 70         # TTF README: patches with the highest previous-frame relevance, recomputed
    attention_layer_id: int = 15      # LLM layer whose attention gives the relevance (the model checks its depth)
    keyframe_interval: int = 3        # TTF README: frames 0, k, 2k, ... of an episode recompute everything
    fusion: str = "hybrid"            # "hybrid": pixel OR attention | "pixel" | "attention"
    pixel_space: str = "ttf"          # "ttf": normalised tower inputs, max over towers | "unit": [0, 1] RGB

    def __post_init__(self) -> None:
        check_float("SelectorConfig", "pixel_threshold", self.pixel_threshold, 0.0, math.inf)
        check_int("SelectorConfig", "attention_top_k", self.attention_top_k, 0, NUM_PATCHES)
        check_int("SelectorConfig", "attention_layer_id", self.attention_layer_id, 0)
        check_int("SelectorConfig", "keyframe_interval", self.keyframe_interval, 1)
        if self.fusion not in FUSIONS:
            raise ValueError(f"SelectorConfig.fusion must be one of {', '.join(FUSIONS)}; got {self.fusion!r}")
        if self.pixel_space not in PIXEL_SPACES:
            raise ValueError(f"SelectorConfig.pixel_space must be one of {', '.join(PIXEL_SPACES)}; got {self.pixel_space!r}")


@dataclass
class Selection:
    """One frame's decision. Always `reuse == ~(pixel_dynamic | attn_relevant)` and `pixel_dynamic` = either row of
    `tower_dynamic`; a test the fusion does not use marks nothing, and on keyframes both mark every patch. Shapes are
    per image (256 patches); `concat_selections` joins several images' along the last dim."""

    reuse: torch.Tensor            # [256] bool: the unified mask (every tower and the LLM take the cached value)
    pixel_dynamic: torch.Tensor    # [256] bool: dynamic in either tower
    attn_relevant: torch.Tensor    # [256] bool
    pixel_score: torch.Tensor      # [256] float: the larger tower score (zeros when there is no previous frame)
    keyframe: bool
    tower_dynamic: torch.Tensor    # [2, 256] bool: each tower's own pixel test (DINOv2, SigLIP), as TTF keeps them
    tower_score: torch.Tensor      # [2, 256] float: each tower's mean |dY|

    @property
    def tower_reuse(self) -> torch.Tensor:
        """[2, 256] bool: TTF's per-tower reuse (DINOv2, SigLIP): static in that tower's pixels, not relevant."""
        return ~(self.tower_dynamic | self.attn_relevant)


def on_host(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor itself if it is in host memory, else its copy there (a device read)."""
    return tensor if tensor.device.type == "cpu" else tensor.cpu()


def top_k_patches(scores: torch.Tensor, k: int) -> torch.Tensor:
    """The k highest-scoring patches; ties go to the lower index, as upstream's stable Python sort does.

    Args:
        scores: [256] float relevance.
        k: how many to mark, 0..256.
    Returns:
        [256] bool mask (on the CPU) with exactly k True.
    """
    order = torch.sort(scores, descending=True, stable=True).indices  # [patch]
    mask = np.zeros(scores.shape[0], dtype=bool)
    mask[on_host(order[:k]).numpy()] = True
    return torch.from_numpy(mask)


def check_relevance(relevance: torch.Tensor | None, name: str, num_patches: int = NUM_PATCHES) -> torch.Tensor | None:
    if relevance is None:
        return None
    if not isinstance(relevance, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor [{num_patches}] or None, got {type(relevance).__name__}")
    if relevance.shape != (num_patches,):
        raise ValueError(f"{name} must have shape [{num_patches}] (one value per patch); got {list(relevance.shape)}")
    relevance = on_host(relevance.detach().float())
    bad = ~np.isfinite(relevance.numpy())
    if bad.any():
        raise ValueError(f"{name} has {int(bad.sum())} NaN or infinite values")
    return relevance


def text_to_vision_relevance(
    attn: torch.Tensor, query_positions: torch.Tensor | None = None, max_text_tokens: int = MAX_TEXT_TOKENS,
    text_start: int = NUM_PATCHES + 1, num_images: int = 1, num_patches: int = NUM_PATCHES,
) -> torch.Tensor:
    """Per-patch relevance from one LLM layer's prefill attention, as TTF and VLA-Cache compute it.

    Both upstreams average the probabilities over heads (in float32), keep the rows at sequence positions
    [text_start, text_start + max_text_tokens) (OpenVLA: the prompt after BOS, capped at its first 35 tokens),
    average those rows and read each image's vision columns (image i: 1 + 256 i .. 256 (i + 1)).

    Args:
        attn: [1, heads, q, k] or [heads, q, k] attention probabilities of layer `attention_layer_id`.
        query_positions: [q] sequence position of each row; None means rows 0..q-1 (no token was dropped).
        max_text_tokens: cap on the text rows used (upstream: 35; OpenVLA-OFT's VLA-Cache: 34).
        text_start: the first row position read (OpenVLA: 257; OpenVLA-OFT: 513, its proprio token).
        num_images: images whose 256 vision columns follow BOS, one after the other.
        num_patches: vision columns per image (256; `oft-micro`'s 8 x 8 grid: 64).
    Returns:
        [num_images * 256] float32 on CPU.
    """
    probs = attn.detach().float()
    probs = probs[0] if probs.dim() == 4 else probs
    n_vision = num_patches * num_images
    if probs.dim() != 3 or probs.shape[-1] < n_vision + 1:
        raise ValueError(f"attn must be [1, heads, q, k] or [heads, q, k] with k > {n_vision}; got {list(attn.shape)}")
    mean = probs.mean(dim=0)  # [q, k]
    pos = torch.arange(mean.shape[0], device=mean.device) if query_positions is None else query_positions.to(mean.device)
    rows = (pos >= text_start) & (pos < text_start + max_text_tokens)  # [q]
    if not rows.any():
        raise ValueError(f"no query row at a text position (>= {text_start}); is this the prefill attention?")
    return vision_columns(mean, rows, num_images, num_patches).cpu()  # [vision]


def vision_columns(mean: torch.Tensor, rows: torch.Tensor | slice, num_images: int,
                   num_patches: int = NUM_PATCHES) -> torch.Tensor:
    """[q, seq] head-averaged probabilities -> [num_images * 256]: the mean over `rows` of each image's vision
    columns, one image at a time, as upstream slices them (VLA-Cache's OFT path: columns 1..256, then 257..512)."""
    parts = [mean[rows, 1 + num_patches * i : 1 + num_patches * (i + 1)].mean(dim=0) for i in range(num_images)]
    return parts[0] if num_images == 1 else torch.cat(parts)


def text_relevance(text_probs: torch.Tensor, max_text_tokens: int = MAX_TEXT_TOKENS, num_images: int = 1,
                   num_patches: int = NUM_PATCHES) -> torch.Tensor:
    """`text_to_vision_relevance` of the text rows a prefill returns (`PrefillOutput.text_probs`), where they are:
    the same values, computed on their device without reading it.

    Args:
        text_probs: [heads, text, seq] attention probabilities of the rows from the request's `text_start` on, in
            position order (OpenVLA: the prompt, from 1 + 256; OpenVLA-OFT: from its proprio token, 1 + 512).
        max_text_tokens: cap on the text rows used (upstream: 35).
        num_images: images whose 256 vision columns follow BOS.
        num_patches: vision columns per image (256).
    Returns:
        [num_images * 256] float32, on `text_probs`' device.
    """
    n_vision = num_patches * num_images
    if text_probs.dim() != 3 or text_probs.shape[1] == 0 or text_probs.shape[-1] < n_vision + 1:
        raise ValueError(f"text_probs must be [heads, text > 0, seq > {n_vision}]; got {list(text_probs.shape)}")
    mean = text_probs.detach().float().mean(dim=0)  # [text, seq]
    return vision_columns(mean, slice(None, max_text_tokens), num_images, num_patches)  # [vision]


def concat_selections(selections: list[Selection]) -> Selection:
    """One image's selection as is; several images' (each from its own selector, stepped together) joined along the
    patch dim: image i's patch j is vision token 256 i + j. Their keyframes coincide (same frame count)."""
    if len(selections) == 1:
        return selections[0]
    if len({s.keyframe for s in selections}) != 1:
        raise ValueError("the images' selectors disagree on the keyframe; step them together")

    def cat(name: str) -> torch.Tensor:
        return torch.cat([getattr(s, name) for s in selections], dim=-1)

    return Selection(cat("reuse"), cat("pixel_dynamic"), cat("attn_relevant"), cat("pixel_score"),
                     selections[0].keyframe, cat("tower_dynamic"), cat("tower_score"))


class UnifiedTokenSelector:
    """TTF-VLA's reuse decision for one episode stream; it keeps the previous frame's pixel values itself.

    Args:
        config: thresholds, top-k, keyframe interval, fusion (its top-k as given, for this grid).
        patch_size: ViT patch side.
        grid: patches a side (OpenVLA: 16), so the image is `grid * patch_size` pixels a side.
    """

    def __init__(self, config: SelectorConfig | None = None, patch_size: int = 14, grid: int = GRID) -> None:
        self.config = config if config is not None else SelectorConfig()
        check_int("UnifiedTokenSelector", "patch_size", patch_size, 1)
        check_int("UnifiedTokenSelector", "grid", grid, 1)
        self.patch_size, self.grid, self.num_patches = patch_size, grid, grid * grid
        self.reset()

    def reset(self) -> None:
        """New episode: forget the previous frame, so the next frame is a keyframe."""
        self._prev: torch.Tensor | None = None
        self._frame = 0  # frames since reset; TTF never resets it at keyframes, so keyframes are 0, k, 2k, ...
        self._constants: dict[tuple[str, torch.device], torch.Tensor] = {}  # per device: made (copied) once

    def select(self, pixel_values: torch.Tensor, text_to_vision: torch.Tensor | None) -> Selection:
        """Decide which patches of this frame reuse cached values, then remember this frame.

        Args:
            pixel_values: [1, 6, 224, 224] this frame's model input (DINOv2- then SigLIP-normalised channels).
                Pass it in the model's dtype: TTF's runs fed bf16 values, whose rounding the score then shares.
            text_to_vision: [256] relevance from the previous frame's prefill (`text_to_vision_relevance`), or
                None when there is none. Without it on a non-keyframe the attention test marks every patch
                relevant, as TTF does, so "hybrid" and "attention" reuse nothing; "pixel" ignores it.
        Returns:
            Selection with [256] CPU tensors.
        """
        cfg = self.config
        current = self._check_pixels(pixel_values)  # [6, H, W] float32
        prev = None if self._prev is None else self._prev.to(current.device)
        # the frame's one read of the device: the count of non-finite pixels, then the scores
        nonfinite = (~torch.isfinite(current)).sum().float()[None]  # exact: far fewer than 2**24 pixels
        host = (nonfinite if prev is None else torch.cat([nonfinite, self._pixel_score(prev, current).flatten()])).cpu()
        n_bad = int(host.numpy()[0])
        if n_bad:
            raise ValueError(f"pixel_values has {n_bad} NaN or infinite values")
        n = self.num_patches
        relevance = check_relevance(text_to_vision, "text_to_vision", n)
        scores = torch.zeros(2, n) if prev is None else host[1:].view(2, n).clone()  # [tower, patch]
        keyframe = prev is None or self._frame % cfg.keyframe_interval == 0
        none = torch.zeros(n, dtype=torch.bool)
        if keyframe:
            towers, relevant = torch.ones(2, n, dtype=torch.bool), ~none
        else:
            towers = scores > cfg.pixel_threshold if cfg.fusion != "attention" else torch.zeros(2, n, dtype=torch.bool)
            if cfg.fusion == "pixel":
                relevant = none
            elif relevance is None:
                relevant = ~none
            else:
                relevant = top_k_patches(relevance, cfg.attention_top_k)
        self._prev, self._frame = current, self._frame + 1
        dynamic = towers[0] | towers[1]
        return Selection(~(dynamic | relevant), dynamic, relevant.clone(), scores.amax(0), keyframe, towers, scores)

    def _check_pixels(self, pixel_values: torch.Tensor) -> torch.Tensor:
        side = self.grid * self.patch_size
        if not isinstance(pixel_values, torch.Tensor):
            raise TypeError(f"pixel_values must be a torch.Tensor [1, 6, {side}, {side}], got {type(pixel_values).__name__}")
        if pixel_values.shape != (1, 6, side, side):
            raise ValueError(f"pixel_values must have shape [1, 6, {side}, {side}] (one frame, both towers' channels); "
                             f"got {list(pixel_values.shape)}")
        if not pixel_values.is_floating_point():
            raise TypeError(f"pixel_values must be normalised floats, got dtype {pixel_values.dtype}")
        # TTF upcasts before the grayscale too; finiteness is checked with the scores (`select`: one device read)
        return pixel_values.detach()[0].to(torch.float32).clone()  # [6, H, W]

    def _constant(self, name: str, values: tuple[float, float, float], device: torch.device) -> torch.Tensor:
        """[3, 1, 1] float32 per-channel constant on `device`, copied there once (not once per frame)."""
        key = (name, device)
        if key not in self._constants:
            self._constants[key] = torch.tensor(values).view(3, 1, 1).to(device)
        return self._constants[key]

    def _gray_diff(self, prev: torch.Tensor, current: torch.Tensor) -> torch.Tensor:
        # TTF's order of operations: grayscale each frame, then |difference|, then the 14x14 mean.
        weights = self._constant("gray", GRAY_WEIGHTS, current.device)
        diff = ((prev * weights).sum(0) - (current * weights).sum(0)).abs()  # [H, W]
        return F.avg_pool2d(diff[None, None], self.patch_size, self.patch_size).flatten()  # [patch], on the device

    def _pixel_score(self, prev: torch.Tensor, current: torch.Tensor) -> torch.Tensor:
        """[2, patch] each tower's score (DINOv2, SigLIP), on the device."""
        if self.config.pixel_space == "unit":
            mean = self._constant("mean", SIGLIP_MEAN, current.device)
            std = self._constant("std", SIGLIP_STD, current.device)
            return self._gray_diff(prev[3:] * std + mean, current[3:] * std + mean).expand(2, -1)  # one test for both
        return torch.stack([self._gray_diff(prev[:3], current[:3]), self._gray_diff(prev[3:], current[3:])])
