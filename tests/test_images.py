"""Image input checks with errors that name the problem, and the resize every family applies."""

import numpy as np
import pytest
import torch
from PIL import Image

from dcvla.images import resize_image, validate_image

RNG = np.random.default_rng(0)
IMAGE = RNG.integers(0, 256, (256, 256, 3), dtype=np.uint8)


@pytest.mark.parametrize(
    "image, error, message",
    [
        (IMAGE[..., 0], ValueError, r"shape \(H, W, 3\); got 2 dims"),
        (IMAGE[..., :2], ValueError, r"3 channels \(RGB\) last; got shape \(256, 256, 2\)"),
        (IMAGE.transpose(2, 0, 1), ValueError, "channels-first"),
        (np.stack([IMAGE, IMAGE]), ValueError, "batch of 2.*batch > 1 is not supported"),
        (IMAGE.astype(np.int32), TypeError, "dtype must be uint8 .* got int32"),
        (IMAGE.astype(np.float32), ValueError, r"values must lie in \[0, 1\]; got min 0, max 255"),
        (np.full((64, 64, 3), np.nan, np.float32), ValueError, "12288 NaN or infinite pixel values"),
        (torch.zeros(224, 224, 3), TypeError, "not a torch.Tensor"),
        ([[0, 0, 0]], TypeError, "got list"),
        (np.zeros((8, 8, 3), np.uint8), ValueError, "smaller than one 14x14 patch"),
    ],
)
def test_bad_images_are_named(image, error, message):
    with pytest.raises(error, match=message):
        validate_image(image)


def test_accepted_image_forms_agree():
    as_float = IMAGE.astype(np.float64) / 255.0
    for form in (IMAGE, IMAGE[None], as_float, Image.fromarray(IMAGE)):
        assert np.array_equal(validate_image(form), IMAGE)


def test_resize_keeps_a_right_sized_image_and_the_value_range():
    assert resize_image(IMAGE, 256) is IMAGE
    flat = np.full((256, 256, 3), 77, np.uint8)
    out = resize_image(flat, 224)
    assert out.shape == (224, 224, 3) and out.dtype == np.uint8 and (out == 77).all()  # bicubic keeps a constant
