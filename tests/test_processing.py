"""Inputs: image checks with errors that name the problem, preprocessing, prompt and tokens."""

import numpy as np
import pytest
import torch
from PIL import Image

from dcvla.config import get_preset
from dcvla.processing import Processor, build_prompt, load_tokenizer, preprocess_image, validate_image

TINY = get_preset("tiny")
RNG = np.random.default_rng(0)
IMAGE = RNG.integers(0, 256, (256, 256, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def processor():
    return Processor(load_tokenizer(), TINY)


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


def test_preprocess_normalises_each_tower():
    white = np.full((224, 224, 3), 255, np.uint8)
    pixels = preprocess_image(white, TINY)[0]  # [6, 224, 224]
    dino_expected = (1 - np.array(TINY.dino.mean)) / np.array(TINY.dino.std)
    assert np.allclose(pixels[:3, 0, 0].numpy(), dino_expected, atol=1e-6)
    assert np.allclose(pixels[3:, 0, 0].numpy(), 1.0)  # SigLIP: (1 - 0.5) / 0.5


def test_preprocess_resizes_bicubic_like_pil():
    pixels = preprocess_image(IMAGE, TINY)
    expected = np.asarray(Image.fromarray(IMAGE).resize((224, 224), Image.Resampling.BICUBIC)) / 255.0
    assert pixels.shape == (1, 6, 224, 224)
    assert np.allclose(pixels[0, 3:].permute(1, 2, 0).numpy() * 0.5 + 0.5, expected, atol=1e-6)


def test_prompt_is_openvlas():
    assert build_prompt("Pick Up the Bowl ") == "In: What action should the robot take to pick up the bowl?\nOut:"
    for empty in ("", "   "):
        with pytest.raises(ValueError, match="instruction is empty"):
            build_prompt(empty)
    with pytest.raises(TypeError, match="instruction must be a str"):
        build_prompt(None)


def test_prompt_tokens_start_with_bos_and_end_with_empty_piece(processor):
    ids = processor.encode_prompt("put the bowl on the plate")[0].tolist()
    assert ids[0] == processor.tokenizer.bos_token_id == 1
    assert ids[-1] == processor.empty_piece_id
    assert processor.tokenizer.decode(ids[1:-1]) == build_prompt("put the bowl on the plate")


def test_shipped_tokenizer_encodes_any_text_losslessly(processor):
    text = "Ünïcode 🦓 and\ttabs, numbers 12345"
    ids = processor.tokenizer(text, add_special_tokens=False).input_ids
    assert processor.tokenizer.unk_token_id not in ids  # byte fallback, never <unk>
    assert processor.tokenizer.decode(ids) == text
    assert max(processor.tokenizer.get_vocab().values()) < TINY.llm.text_vocab_size - TINY.n_action_bins


def test_missing_tokenizer_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="no tokenizer.json or tokenizer.model"):
        load_tokenizer(tmp_path)
