"""dcvla's transformers-based towers and projector reproduce the upstream timm implementation.

The fixture (tests/fixtures/openvla_tiny, made by scripts/make_parity_fixture.py with timm) is a tiny random
checkpoint in OpenVLA's key layout plus the outputs upstream's code computed from it.
"""

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from dcvla.openvla.checkpoint import load_pretrained
from dcvla.openvla.config import get_preset

ATOL = 1e-4


@pytest.fixture(scope="module")
def reference(parity_dir):
    return load_file(str(parity_dir / "reference.safetensors"))


@pytest.fixture(scope="module", params=["sdpa", "eager"])
def model(parity_dir, request):
    return load_pretrained(parity_dir, preset="tiny", attn_implementation=request.param)


@torch.no_grad()
def test_tower_features_match_timm(model, reference):
    dino_px, siglip_px = torch.split(reference["pixel_values"], [3, 3], dim=1)
    dino = model.vision_backbone.featurizer(dino_px)
    siglip = model.vision_backbone.fused_featurizer(siglip_px)
    assert dino.shape == reference["dino_features"].shape
    assert (dino - reference["dino_features"]).abs().max() <= ATOL
    assert (siglip - reference["siglip_features"]).abs().max() <= ATOL


@torch.no_grad()
def test_projector_output_matches_upstream(model, reference):
    projected = model.embed_image(reference["pixel_values"])
    assert (projected - reference["projector_output"]).abs().max() <= ATOL


@torch.no_grad()
def test_parity_is_sensitive_to_the_siglip_activation(parity_dir, reference):
    """Guard against a test that cannot fail: the tanh-GELU variant must NOT match the reference."""
    from dataclasses import replace

    cfg = get_preset("tiny")
    wrong = replace(cfg, siglip=replace(cfg.siglip, hidden_act="gelu_pytorch_tanh"))
    model = load_pretrained(parity_dir, preset=wrong)
    _, siglip_px = torch.split(reference["pixel_values"], [3, 3], dim=1)
    diff = (model.vision_backbone.fused_featurizer(siglip_px) - reference["siglip_features"]).abs().max()
    assert diff > 10 * ATOL


def test_fixture_unnorm_stats_are_loaded(model):
    assert sorted(model.norm_stats) == ["bridge_orig", "libero_spatial_no_noops"]
    assert np.asarray(model.action_stats("libero_spatial")["q01"]).shape == (7,)
