"""OpenVLA's inputs: the two towers' preprocessing (against upstream's), the prompt and its tokens."""

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from dcvla.openvla.config import get_preset
from dcvla.openvla.processing import Processor, build_prompt, preprocess_image
from dcvla.tokenizer import load_tokenizer

TINY = get_preset("tiny")


@pytest.fixture(scope="module")
def processor():
    return Processor(load_tokenizer(), TINY)


def test_preprocess_normalises_each_tower():
    white = np.full((224, 224, 3), 255, np.uint8)
    pixels = preprocess_image(white, TINY)[0]  # [6, 224, 224]
    dino_expected = (1 - np.array(TINY.dino.mean)) / np.array(TINY.dino.std)
    assert np.allclose(pixels[:3, 0, 0].numpy(), dino_expected, atol=1e-6)
    assert np.allclose(pixels[3:, 0, 0].numpy(), 1.0)  # SigLIP: (1 - 0.5) / 0.5


def test_preprocessing_matches_upstream(parity_dir):
    """A 256x256 scene through upstream's processor (PIL bicubic resize to 224, per-tower normalisation; made
    by scripts/make_parity_fixture.py with upstream's code, not dcvla's) gives these pixel values."""
    reference = load_file(str(parity_dir / "reference.safetensors"))
    assert reference["image"].shape == (256, 256, 3)  # the resize is exercised
    pixel_values = preprocess_image(reference["image"].numpy(), TINY)
    assert pixel_values.shape == reference["pixel_values"].shape
    assert torch.allclose(pixel_values, reference["pixel_values"], atol=1e-5)


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


def test_an_instruction_past_the_position_limit_raises_saying_by_how_much(processor):
    """[BOS] + 256 vision + prompt + 7 action tokens may fill max_position_embeddings exactly, not one more."""
    instruction = "put the bowl on the plate"
    ids = processor.encode_prompt(instruction)[0]
    needed = len(ids) + TINY.num_patches + TINY.action_dim  # BOS is ids[0]
    assert Processor(processor.tokenizer, TINY.with_llm(max_position_embeddings=needed)).encode_prompt(instruction).shape == ids[None].shape
    with pytest.raises(ValueError, match=rf"instruction too long: the LLM would see {needed} tokens \(1 BOS \+ 256 vision \+ "
                                         rf"{len(ids) - 1} prompt \+ 7 action tokens\), past its max_position_embeddings of "
                                         rf"{needed - 1}; shorten the instruction by at least 1 tokens"):
        Processor(processor.tokenizer, TINY.with_llm(max_position_embeddings=needed - 1)).encode_prompt(instruction)
    with pytest.raises(ValueError, match="max_position_embeddings of 2048; shorten the instruction by at least"):
        processor.encode_prompt("pick up the bowl " * 600)  # the tiny preset's real limit
