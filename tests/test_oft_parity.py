"""dcvla's OpenVLA-OFT reproduces upstream moojink/openvla-oft at tiny dims.

The fixture (tests/fixtures/oft_tiny, made by scripts/make_oft_parity_fixture.py) is a random OFT saved in the
published layout by upstream's own modules on its transformers fork (bidirectional SDPA), with float32 references of
`get_vla_action`'s path. Its Llama is `oft-tiny`'s at width 16 (the 32064-row embedding and lm_head dominate the
fixture's size); the towers are `oft-tiny`'s.

The dcvla tokenizer's bare "▁" is id 290, the Llama-2 tokenizer's 29871, which upstream's `predict_action` appends
literally; the end-to-end test gives the processor Llama-2's id so both run the same ids.
"""

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from dcvla.openvla.oft import OFTProcessor, get_preset, load_pretrained, normalize_proprio
from dcvla.tokenizer import load_tokenizer

FIXTURE = Path(__file__).parent / "fixtures" / "oft_tiny"
CONFIG = replace(get_preset("oft-tiny").with_llm(hidden_size=16, intermediate_size=44), name="oft-tiny-llm16")
ATOL = 1e-4
INSTRUCTION = "Put the black bowl on the plate"
UNNORM_KEY = "libero_spatial"  # resolves to libero_spatial_no_noops, as upstream's LIBERO eval does
LLAMA2_EMPTY_PIECE = 29871


@pytest.fixture(scope="module")
def reference():
    return load_file(str(FIXTURE / "reference.safetensors"))


@pytest.fixture(scope="module", params=["sdpa", "eager"])
def model(request):
    return load_pretrained(FIXTURE, preset=CONFIG, attn_implementation=request.param)


@pytest.fixture(scope="module")
def processor():
    processor = OFTProcessor(load_tokenizer(), CONFIG)
    processor.empty_piece_id = LLAMA2_EMPTY_PIECE
    return processor


@pytest.fixture(scope="module")
def images(reference):
    return [reference["image_third_person"].numpy(), reference["image_wrist"].numpy()]


@pytest.fixture(scope="module")
def forward(model, processor, images, reference):
    """dcvla's reference forward on upstream's exact prompt ids and normalised state."""
    return model.reference_forward(reference["input_ids"], processor.pixel_values(images), reference["proprio_normalized"])


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a.double() - b.double()).abs().max().item()


def test_prompt_ids_and_state_normalisation_match(processor, reference, model):
    assert torch.equal(processor.encode_prompt(INSTRUCTION), reference["input_ids"])
    stats = model.stats(UNNORM_KEY)["proprio"]
    normalized = normalize_proprio(reference["state"].numpy(), stats)
    assert np.abs(normalized - reference["proprio_normalized"].numpy()).max() < 1e-12
    assert (np.abs(normalized) == 1.0).any()  # the fixture's state leaves q01..q99 on some dims: clipping is covered


@torch.no_grad()
def test_vision_features_of_both_images_match(model, processor, images, reference):
    features = model.vision_features(processor.pixel_values(images))  # [1, 512, dino + siglip]
    assert max_diff(features, reference["vision_features"]) <= ATOL
    swapped = model.vision_features(processor.pixel_values(images[::-1]))
    assert max_diff(swapped, reference["vision_features"]) > 100 * ATOL  # the image order matters


def test_patch_embeddings_and_proprio_token_match(forward, reference):
    assert max_diff(forward.patch_embeddings, reference["patch_embeddings"]) <= ATOL
    assert max_diff(forward.proprio_token, reference["proprio_token"]) <= ATOL


def test_action_slot_hidden_states_match(forward, reference):
    assert max_diff(forward.action_hidden, reference["action_hidden"]) <= ATOL


def test_action_chunk_matches_end_to_end(model, processor, images, reference, forward):
    assert max_diff(forward.normalized, reference["normalized_actions"]) <= ATOL
    chunk = model.predict(images, reference["state"].numpy(), INSTRUCTION, processor=processor, unnorm_key=UNNORM_KEY)
    assert chunk.shape == (8, 7) and chunk.dtype == np.float64
    assert np.abs(chunk - reference["actions"].numpy()).max() <= ATOL


@torch.no_grad()
def test_parity_breaks_with_a_causal_mask_or_an_unshifted_slice(model, processor, images, reference):
    """Guards against references the test could not miss: the plain causal Llama, or reading the 56 slots themselves
    instead of starting one position early, must NOT match."""
    input_ids = reference["input_ids"]
    patches = model.embed_images(processor.pixel_values(images))
    embeds = model.sequence_embeddings(input_ids, patches, model.embed_proprio(reference["proprio_normalized"]))
    window = model.action_slice(input_ids.shape[1])
    causal = model.language_model.model(inputs_embeds=embeds).last_hidden_state  # no mask: transformers' causal one
    assert max_diff(causal[:, window], reference["action_hidden"]) > 100 * ATOL
    hidden = model.language_model.model(inputs_embeds=embeds, attention_mask=model.bidirectional_mask(embeds.shape[1]))
    assert max_diff(hidden.last_hidden_state[:, window], reference["action_hidden"]) <= ATOL
    unshifted = hidden.last_hidden_state[:, window.start + 1 : window.stop + 1]
    assert max_diff(unshifted, reference["action_hidden"]) > 100 * ATOL


def test_the_fixture_is_the_published_layout():
    head = torch.load(FIXTURE / "action_head--1000_checkpoint.pt", weights_only=True)
    proprio = torch.load(FIXTURE / "proprio_projector--1000_checkpoint.pt", weights_only=True)
    assert all(key.startswith("module.") for key in [*head, *proprio])
    assert {v.dtype for v in head.values()} == {torch.bfloat16} and {v.dtype for v in proprio.values()} == {torch.float32}
    assert "module.model.mlp_resnet_blocks.1.ffn.1.weight" in head and "module.fc2.weight" in proprio
    shards = sorted(FIXTURE.glob("model-*.safetensors"))
    assert len(shards) == 2 and all(t.dtype == torch.bfloat16 for s in shards for t in load_file(str(s)).values())
    assert sum(p.stat().st_size for p in FIXTURE.iterdir()) < 3.2e6
