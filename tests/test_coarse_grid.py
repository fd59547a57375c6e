"""Towers with another patch grid than OpenVLA's 16 x 16 (`oft-micro`: 28 px patches, 8 x 8 a view): every cache
method selects, reuses and schedules on that grid, with upstream's patch counts (given for 256 patches) scaled to it.
An oft-tiny model in 28 px patches (64 a view, 128 vision tokens), random weights, on a shipped episode's frames."""

from dataclasses import replace

import numpy as np
import pytest
import torch

from dcvla.openvla import METHODS, CacheConfig
from dcvla.openvla.oft import OFTCachedPolicy, OFTProcessor, get_preset, normalize_proprio, random_model
from dcvla.openvla.ttf_selector import scaled_count
from dcvla.openvla.vla_cache import patch_cosine_similarity
from dcvla.tokenizer import load_tokenizer
from oft_clip import clip, run  # noqa: F401  (clip: the fixture)

TINY = get_preset("oft-tiny")
COARSE = replace(TINY, name="oft-tiny-28px", dino=replace(TINY.dino, patch_size=28),
                 siglip=replace(TINY.siglip, patch_size=28))
BASE = OFTCachedPolicy(random_model(COARSE, seed=0), OFTProcessor(load_tokenizer(), COARSE), CacheConfig("vanilla"))
ATOL = 1e-5  # as tests/test_oft_policy.py: the engine's subsets of rows change only the summation order


def policy(**config) -> OFTCachedPolicy:
    return BASE.with_config(CacheConfig(**config))


def test_counts_scale_to_the_grid_half_up():
    assert [scaled_count(k, 64) for k in (70, 100, 120, 130, 150)] == [18, 25, 30, 33, 38]
    assert [scaled_count(k, 256) for k in (0, 70, 256)] == [0, 70, 256]
    pol = policy(method="vla_cache")
    assert (pol.grid, pol.patch_size, pol.num_vision) == (8, 28, 128)
    assert (pol.vla_config.top_k_static, pol.vla_config.attention_top_k_remove) == (38, 25)  # OFT's 150, 100
    assert pol.selectors[0].config.attention_top_k == 18 and pol.selectors[0].num_patches == 64
    assert (pol.config.attention_top_k, pol.config.top_k_static) == (70, 150)  # the config keeps upstream's counts
    assert pol.with_config(pol.config).vla_config == pol.vla_config  # so rebuilding from it scales once


def test_patch_similarity_on_the_grid_is_row_major():
    image = np.zeros((224, 224, 3), np.uint8) + 100
    moved = image.copy()
    moved[28:56, 56:84, 0] = 0  # the patch at row 1, column 2 of the 8 x 8 grid: patch 10
    similarity = patch_cosine_similarity(image, moved, patch_size=28, grid=8)
    assert similarity.shape == (64,) and np.flatnonzero(similarity.numpy() < 0.99).tolist() == [10]
    with pytest.raises(ValueError, match=r"prev_image must be an RGB image \[224, 224, 3\]"):
        patch_cosine_similarity(image[:112], image, patch_size=28, grid=8)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_frozen_scene_every_method_is_the_reference_forward(clip, method):
    """One frame stepped three times, no keyframe after the first, pixel fusion: every patch static, so every
    method's chunk must be the plain forward's; the records are the grid's 128 vision tokens."""
    (images, state), instruction = clip[0][0], clip[1]
    input_ids, pixel_values = BASE.processor(images, instruction)
    proprio = normalize_proprio(np.asarray(state, np.float64), BASE.model.stats(None)["proprio"])
    ref = BASE.model.reference_forward(input_ids, pixel_values, torch.tensor(proprio, dtype=torch.float32)).normalized.numpy()
    pol = policy(method=method, fusion="pixel", keyframe_interval=100, top_k_static=256, attention_top_k_remove=0)
    got = run(pol, [(images, state)] * 3, instruction)
    assert all(np.abs(g - ref).max() <= ATOL for g in got), [float(np.abs(g - ref).max()) for g in got]
    record, m = pol.records[-1], METHODS[method]
    assert record.llm_reuse.shape == (16, 128) and record.staleness.shape == (128,)
    if m.unified_selector:
        assert int(record.selection.reuse.sum()) == 128 and record.selection.tower_reuse.shape == (2, 128)
    if m.llm == "vla_cache":  # every patch similar, all 64 of each image static; upstream's schedule drops some
        assert record.llm_reuse.any() and not record.llm_reuse[:2].any()


def test_a_moving_scene_selects_per_image_on_the_grid(clip):
    steps, instruction = clip
    pol = policy(method="dual_cache")
    run(pol, steps, instruction)
    assert all(r.relevance.shape == (128,) for r in pol.records)
    relevant = [int(r.selection.attn_relevant[:64].sum()) for r in pol.records if not r.selection.keyframe]
    assert relevant and all(n == 18 for n in relevant)  # the top 18 of each image's 64, never upstream's 70
    vla = policy(method="vla_cache")
    run(vla, [steps[0], steps[0], steps[1]], instruction)
    reusable = vla.records[1].llm_reuse.any(0)
    assert 0 < reusable[:64].sum() <= 38 and reusable[64:].sum() <= 38  # per image: at most 38 static
