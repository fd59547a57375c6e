"""Inputs as OpenVLA prepares them: image checks, the two towers' preprocessing, the prompt and its tokens.

Upstream's processor (resize strategy "resize-naive") resizes the PIL image to 224x224 with bicubic
interpolation (torchvision's resize on a PIL image is PIL's own resize), center-crops 224 (a no-op after the
resize), scales to [0, 1] and normalises once per tower; the two 3-channel results are stacked into
6 channels, DINOv2's first.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from .config import OpenVLAConfig

ASSETS = Path(__file__).resolve().parent / "assets"
PROMPT_TEMPLATE = "In: What action should the robot take to {instruction}?\nOut:"
EMPTY_PIECE = "▁"  # OpenVLA appends this bare SentencePiece space (Llama-2 id 29871) to every prompt


def validate_image(image: np.ndarray | Image.Image) -> np.ndarray:
    """Check one RGB image and return it as uint8 [H, W, 3].

    Accepts a PIL image, a uint8 array with values 0..255, or a float array with values in [0, 1]; a
    leading batch axis of size 1 is dropped.

    Raises:
        TypeError: not an array or PIL image, or an unsupported dtype.
        ValueError: wrong number of dims or channels, a batch of several images, NaN/inf, values out of range.
    """
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    if isinstance(image, torch.Tensor):
        raise TypeError("image must be a numpy array or PIL image (H, W, 3), not a torch.Tensor")
    if not isinstance(image, np.ndarray):
        raise TypeError(f"image must be a numpy array or PIL image, got {type(image).__name__}")
    if image.ndim == 4:
        if image.shape[0] != 1:
            raise ValueError(f"one image at a time: got a batch of {image.shape[0]} (shape {image.shape}); batch > 1 is not supported")
        image = image[0]
    if image.ndim != 3:
        raise ValueError(f"image must have shape (H, W, 3); got {image.ndim} dims, shape {image.shape}")
    if image.shape[-1] != 3:
        hint = " (channels-first? transpose to H, W, 3)" if image.shape[0] == 3 else ""
        raise ValueError(f"image must have 3 channels (RGB) last; got shape {image.shape}{hint}")
    if image.shape[0] < 14 or image.shape[1] < 14:
        raise ValueError(f"image of shape {image.shape} is smaller than one 14x14 patch")
    if image.dtype == np.uint8:
        return image
    if image.dtype.kind != "f":
        raise TypeError(f"image dtype must be uint8 (0..255) or float (0..1); got {image.dtype}")
    if not np.isfinite(image).all():
        raise ValueError(f"image has {int((~np.isfinite(image)).sum())} NaN or infinite pixel values")
    lo, hi = float(image.min()), float(image.max())
    if lo < 0.0 or hi > 1.0:
        raise ValueError(f"float image values must lie in [0, 1]; got min {lo:.4g}, max {hi:.4g} (uint8 data? pass it as uint8)")
    return np.round(image * 255.0).astype(np.uint8)


def resize_image(image: np.ndarray, size: int) -> np.ndarray:
    """uint8 [H, W, 3] -> uint8 [size, size, 3], bicubic (PIL), as upstream's resize-naive."""
    if image.shape[:2] == (size, size):
        return image
    return np.asarray(Image.fromarray(image).resize((size, size), Image.Resampling.BICUBIC))


def preprocess_image(image: np.ndarray | Image.Image, config: OpenVLAConfig) -> torch.Tensor:
    """One RGB image -> pixel_values [1, 6, size, size]: DINOv2-normalised channels, then SigLIP-normalised."""
    size = config.dino.image_size
    pixels = torch.from_numpy(resize_image(validate_image(image), size).copy()).permute(2, 0, 1).float() / 255.0
    towers = []
    for cfg in (config.dino, config.siglip):
        mean = torch.tensor(cfg.mean).view(3, 1, 1)
        std = torch.tensor(cfg.std).view(3, 1, 1)
        towers.append((pixels - mean) / std)  # [3, size, size]
    return torch.cat(towers, dim=0)[None]  # [1, 6, size, size]


def build_prompt(instruction: str) -> str:
    """OpenVLA's prompt for one instruction (lower-cased, as the LIBERO evaluation passes it)."""
    if not isinstance(instruction, str):
        raise TypeError(f"instruction must be a str, got {type(instruction).__name__}")
    if not instruction.strip():
        raise ValueError("instruction is empty; the policy needs a task description")
    return PROMPT_TEMPLATE.format(instruction=instruction.strip().lower())


def load_tokenizer(path: str | Path | None = None) -> PreTrainedTokenizerBase:
    """The Llama-2 tokenizer of a checkpoint directory, or dcvla's offline one when `path` is None.

    Raises:
        FileNotFoundError: `path` has no tokenizer files.
    """
    if path is None:
        return PreTrainedTokenizerFast(
            tokenizer_file=str(ASSETS / "tokenizer.json"), bos_token="<s>", eos_token="</s>", unk_token="<unk>"
        )
    path = Path(path)
    if not any((path / name).exists() for name in ("tokenizer.json", "tokenizer.model")):
        raise FileNotFoundError(f"no tokenizer.json or tokenizer.model in {path}")
    return AutoTokenizer.from_pretrained(str(path))


class Processor:
    """Turns (image, instruction) into the model's `input_ids` and `pixel_values`.

    Args:
        tokenizer: a Llama-style tokenizer that prepends BOS and has the bare "▁" piece.
        config: the model config (image size and per-tower normalisation).
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, config: OpenVLAConfig) -> None:
        self.tokenizer = tokenizer
        self.config = config
        self.empty_piece_id = tokenizer.convert_tokens_to_ids(EMPTY_PIECE)
        if self.empty_piece_id is None or self.empty_piece_id == tokenizer.unk_token_id:
            raise ValueError(f"tokenizer has no bare {EMPTY_PIECE!r} piece, which OpenVLA appends to every prompt")

    def encode_prompt(self, instruction: str) -> torch.Tensor:
        """Instruction -> input_ids [1, text], BOS first and the bare "▁" last (added if missing)."""
        ids = self.tokenizer(build_prompt(instruction)).input_ids
        if ids[0] != self.tokenizer.bos_token_id:
            raise ValueError("tokenizer did not prepend BOS; OpenVLA's sequence starts with it")
        if ids[-1] != self.empty_piece_id:
            ids = ids + [self.empty_piece_id]
        return torch.tensor([ids], dtype=torch.long)

    def __call__(self, image: np.ndarray | Image.Image, instruction: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (input_ids [1, text], pixel_values [1, 6, size, size])."""
        return self.encode_prompt(instruction), preprocess_image(image, self.config)
