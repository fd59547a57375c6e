"""pi0 and pi0.5 (`dcvla.pi0`) against lerobot 0.6.1's own modules, at tiny dims.

`tests/fixtures/pi0_tiny` and `pi05_tiny` were made by `scripts/make_pi_parity_fixture.py` in a throwaway Python
3.12 environment (lerobot 0.6.1, torch 2.11.0, transformers 5.5.4; the fixture's `fixture.json` records them):
random weights in lerobot's published layout, lerobot's config and processors, the inputs (three camera slots, the
third an empty camera; a right-padded prompt; the state; fixed noise) and lerobot's outputs. dcvla loads the
checkpoint with its strict loader, runs the same inputs (dropping the masked camera and the padding, which nobody
attends) and must match in float32 to 1e-4: the image features, every prefix layer's post-RoPE K/V, the velocity at
t = 1, the action chunk after 10 Euler steps, and the processors' normalisation.
"""

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from dcvla.pi0 import get_preset, load_pretrained, run_prefix
from dcvla.pi0.config import with_dims

FIXTURES = Path(__file__).parent / "fixtures"
ATOL = 1e-4
# the tiny presets at the fixture's vocabulary (lerobot's 257,152 shrunk to 320 there; the presets keep 32,000 for
# dcvla's offline tokenizer)
CASES = {"pi0_tiny": with_dims(get_preset("pi0-tiny"), vocab_size=320),
         "pi05_tiny": with_dims(get_preset("pi05-tiny"), vocab_size=320)}


@pytest.fixture(scope="module", params=list(CASES))
def case(request):
    folder = FIXTURES / request.param
    return load_pretrained(folder, preset=CASES[request.param]), load_file(folder / "reference.safetensors")


def prefix(model, ref):
    """The prefix of the present cameras and the unpadded prompt, and which of lerobot's positions they are."""
    present = ref["image_masks"].tolist()
    pixels = ref["images"][torch.tensor(present)][:, 0]  # [present camera, 3, H, W]
    valid = int(ref["token_masks"].sum())
    inputs = model.prefix_inputs(pixels, present, ref["tokens"][:, :valid])
    n = model.config.tokens_per_image
    kept = torch.cat([torch.arange(i * n, (i + 1) * n) for i, p in enumerate(present) if p]
                     + [len(present) * n + torch.arange(valid)])
    return inputs, kept


def max_diff(a, b) -> float:
    return float((a.float() - b.float()).abs().max())


def test_image_features_and_every_prefix_layer_kv_match_lerobot(case):
    model, ref = case
    assert max_diff(model.embed_images(ref["images"][0]), ref["image_features"]) <= ATOL
    inputs, kept = prefix(model, ref)
    assert torch.equal(ref["prefix_positions"][0, kept], torch.arange(len(kept)))  # masked tokens never advance positions
    store = model.new_store(inputs.length)
    run_prefix(model, inputs, None, store, step=0)
    for layer in range(model.config.lm.depth):
        assert max_diff(store.keys[layer], ref[f"prefix_keys_{layer}"][0][:, kept]) <= ATOL, layer
        assert max_diff(store.values[layer], ref[f"prefix_values_{layer}"][0][:, kept]) <= ATOL, layer


def test_velocity_and_action_chunk_match_lerobot(case):
    model, ref = case
    inputs, _ = prefix(model, ref)
    store = model.new_store(inputs.length)
    run_prefix(model, inputs, None, store, step=0)
    state = None if model.config.pi05 else ref["state"][0]
    state_kv = None if model.config.pi05 else model.expert_state_kv(store, state)
    velocity = model.velocity(store, ref["noise"], torch.ones(1), state_kv)
    assert max_diff(velocity, ref["velocity_t1"]) <= ATOL
    actions = model.sample_actions(store, ref["noise"], state)
    assert actions.shape == ref["actions"].shape and max_diff(actions, ref["actions"]) <= ATOL
    assert max_diff(actions, ref["noise"]) > 0.1  # ten steps moved the chunk: the comparison is not of noise to noise


def test_the_checkpoints_normalisation_is_lerobots(case):
    model, ref = case
    norm = model.normalization
    expected = "QUANTILES" if model.config.pi05 else "MEAN_STD"
    assert norm.modes == {"observation.state": expected, "action": expected, "observation.images.image": "IDENTITY",
                          "observation.images.image2": "IDENTITY"}
    state = norm.normalize(ref["raw_state"].numpy(), "observation.state")
    action = norm.normalize(ref["normalized_action"].numpy(), "action", inverse=True)
    assert np.abs(state - ref["normalized_state"].numpy()).max() <= 1e-5
    assert np.abs(action - ref["unnormalized_action"].numpy()).max() <= 1e-5
