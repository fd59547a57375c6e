"""SmolVLA (`dcvla.smolvla`) against lerobot 0.6.1's own modules, at tiny dims.

`tests/fixtures/smolvla_tiny` was made by `scripts/make_smolvla_parity_fixture.py` in the throwaway Python 3.12
environment of the pi0 fixtures (lerobot 0.6.1 with the smolvla extra, torch 2.11.0, transformers 5.5.4;
`fixture.json` records them): random weights saved by lerobot's `SmolVLAPolicy.save_pretrained` (in bfloat16, exact in
float32), lerobot's config and normaliser steps, the inputs (a 48 x 80 and a 32 x 32 camera, a right-padded prompt,
the state, fixed noise) and lerobot's outputs. dcvla loads the checkpoint with its strict loader, runs the same inputs
(dropping the prompt's padding, which nobody attends) and must match in float32 to 1e-4: the resized pixels, the image
features, every kept layer's post-RoPE prefix K/V (the expert's cross-attention layers read them), the velocity at
t = 1, the action chunk after 10 Euler steps, and the normalisation.
"""

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from dcvla.flow import resize_with_pad
from dcvla.normalization import ACTION, STATE
from dcvla.smolvla import get_preset, load_pretrained
from dcvla.smolvla.config import with_dims

FIXTURE = Path(__file__).parent / "fixtures" / "smolvla_tiny"
ATOL = 1e-4
# smolvla-tiny at the fixture's vocabulary (the preset keeps 32,000 for dcvla's offline tokenizer)
CONFIG = with_dims(get_preset("smolvla-tiny"), vocab_size=320)


@pytest.fixture(scope="module")
def case():
    return load_pretrained(FIXTURE, preset=CONFIG), load_file(FIXTURE / "reference.safetensors")


def prefix(model, ref):
    """The prefix of both cameras, the unpadded prompt and the state token, and which of lerobot's slots they are."""
    valid = int(ref["lang_masks"].sum())
    inputs = model.prefix_inputs(ref["pixels"][:, 0], [True, True], ref["lang_tokens"][:, :valid], ref["state"][0])
    n_images, lang = 2 * model.config.tokens_per_image, ref["lang_masks"].shape[1]
    kept = torch.cat([torch.arange(n_images + valid), torch.tensor([n_images + lang])])  # the state token is last
    return inputs, kept


def max_diff(a, b) -> float:
    return float((a.float() - b.float()).abs().max())


def test_images_are_resized_with_padding_as_lerobot_does():
    ref = load_file(FIXTURE / "reference.safetensors")
    for i in range(2):
        pixels = resize_with_pad(ref[f"image_{i}"], 64, 64, pad_value=0.0) * 2 - 1
        assert max_diff(pixels, ref["pixels"][i]) <= 1e-6, i
    assert (ref["pixels"][0, 0, :, 0] == -1).all()  # the wide camera is padded at the top, to -1


def test_image_features_and_every_prefix_layer_kv_match_lerobot(case):
    model, ref = case
    scale = model.config.text.width ** 0.5
    for i in range(2):
        assert max_diff(model.embed_images(ref["pixels"][i]) / scale, ref[f"image_features_{i}"]) <= ATOL, i
    inputs, kept = prefix(model, ref)
    assert max_diff(inputs.embeddings()[0], ref["prefix_embs"][0, kept]) <= ATOL
    assert torch.equal(ref["prefix_positions"][0, kept], torch.arange(len(kept)))  # padding never advances positions
    store = model.new_store(inputs.length)
    model.run_prefix(inputs, None, store, step=0)
    for layer in range(model.config.text.depth):
        assert max_diff(store.keys[layer], ref[f"prefix_k_{layer}"][0][:, kept]) <= ATOL, layer
        assert max_diff(store.values[layer], ref[f"prefix_v_{layer}"][0][:, kept]) <= ATOL, layer


def test_velocity_and_action_chunk_match_lerobot(case):
    model, ref = case
    inputs, _ = prefix(model, ref)
    store = model.new_store(inputs.length)
    model.run_prefix(inputs, None, store, step=0)
    assert max_diff(model.velocity(store, ref["noise"], torch.ones(1)), ref["velocity"]) <= ATOL
    actions = model.sample_actions(store, ref["noise"])
    assert actions.shape == ref["actions"].shape and max_diff(actions, ref["actions"]) <= ATOL
    assert max_diff(actions, ref["noise"]) > 0.1  # ten steps moved the chunk: the comparison is not of noise to noise


def test_the_checkpoints_normalisation_is_lerobots(case):
    model, ref = case
    norm = model.normalization
    assert (norm.modes[STATE], norm.modes[ACTION]) == ("MEAN_STD", "MEAN_STD")
    state = norm.normalize(ref["raw_state"].double().numpy(), STATE)
    np.testing.assert_allclose(state, ref["state"][0, :8].double().numpy(), atol=1e-5)
    action = norm.normalize(ref["normalized_action"][0].double().numpy(), ACTION, inverse=True)
    np.testing.assert_allclose(action, ref["unnormalized_action"][0].double().numpy(), atol=1e-5)
