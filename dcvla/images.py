"""Image input checks and resizing that every family applies the same way."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image


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


def read_image(path: str | Path, what: str = "image") -> np.ndarray:
    """An image file as RGB uint8 [H, W, 3]; a missing or unreadable file raises naming it (as `what`, e.g. the
    command-line option that gave it)."""
    from PIL import UnidentifiedImageError

    if not Path(path).is_file():
        raise FileNotFoundError(f"{what} {path}: no such file")
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"))
    except (UnidentifiedImageError, OSError) as err:
        raise ValueError(f"{what} {path} is not an image file PIL can read ({err})") from err
