"""VLA-Cache's own selection: static patches by raw-pixel cosine similarity, the attended ones removed, and the
per-layer reuse schedule from attention entropies, on hand-made inputs worked out by hand in the comments."""

import math

import numpy as np
import pytest
import torch

from dcvla.openvla.vla_cache import (
    VLACacheConfig,
    attention_entropy,
    patch_cosine_similarity,
    vla_cache_layer_reuse,
    vla_cache_reuse_proportions,
    vla_cache_static_patches,
)


@pytest.mark.parametrize(
    "field, value",
    [
        ("similarity_threshold", 1.5), ("top_k_static", 300), ("attention_top_k_remove", -1),
        ("prune_layers", (6, 2)), ("prune_layers", ()), ("attention_layer_id", -2), ("growth_factor", 1.5),
        ("apply_weighted_growth", 1),
    ],
)
def test_config_errors_name_the_field(field, value):
    with pytest.raises(ValueError, match=rf"VLACacheConfig\.{field}"):
        VLACacheConfig(**{field: value})


def image_from_patches(patches: np.ndarray) -> np.ndarray:
    """[256, 588] (each patch flattened y, x, c) -> [224, 224, 3]."""
    return patches.reshape(16, 16, 14, 14, 3).transpose(0, 2, 1, 3, 4).reshape(224, 224, 3)


def test_patch_cosine_similarity_hand_values():
    prev = np.full((256, 588), 100, np.uint8)
    cur = prev.copy()
    cur[0, :4] = 0  # sqrt(584 / 588) = 0.996592 >= 0.996
    cur[1, :5] = 0  # sqrt(583 / 588) = 0.995739 < 0.996
    prev[2] = cur[2] = 0  # all black in both frames: 0 / (0 + 1e-8) = 0, never static
    cur[3] = 50  # a uniform brightness change keeps the direction: similarity 1
    sim = patch_cosine_similarity(image_from_patches(prev), torch.from_numpy(image_from_patches(cur)))
    assert sim[:4].tolist() == pytest.approx([0.996592, 0.995739, 0.0, 1.0], abs=1e-6)
    static = vla_cache_static_patches(image_from_patches(prev), image_from_patches(cur), torch.zeros(256),
                                      VLACacheConfig(top_k_static=256, attention_top_k_remove=0))
    assert static[:4].tolist() == [True, False, False, True] and static[4:].all()


def test_static_patches_keep_the_130_most_similar_then_drop_the_attended():
    prev = np.full((256, 588), 100, np.uint8)
    cur = prev.copy()
    for j in range(256):
        cur[j, : j % 5] = 0  # similarity falls with j % 5; all >= 0.996
    prev, cur = image_from_patches(prev), image_from_patches(cur)
    # Most similar first: 52 patches with j%5==0, 51 with j%5==1, then 27 of j%5==2 by index (2, 7, ..., 132).
    expected = {j for j in range(256) if j % 5 < 2 or (j % 5 == 2 and j <= 132)}
    static = vla_cache_static_patches(prev, cur, torch.zeros(256), VLACacheConfig(attention_top_k_remove=0))
    assert set(static.nonzero().flatten().tolist()) == expected
    relevance = -torch.arange(256.0)  # previous frame attended patches 0..119 most
    reusable = vla_cache_static_patches(prev, cur, relevance)  # default: remove the top 120, as upstream's OpenVLA path
    assert set(reusable.nonzero().flatten().tolist()) == {j for j in expected if j >= 120}
    assert not vla_cache_static_patches(prev, cur, None).any()  # no previous prefill: no reuse
    with pytest.raises(ValueError, match=r"image must be an RGB image \[224, 224, 3\]"):
        vla_cache_static_patches(prev, cur[:100], relevance)


def test_attention_entropy_hand_values():
    uniform = torch.full((1, 2, 5, 8), 1 / 8)
    assert attention_entropy(uniform).item() == pytest.approx(math.log(8), rel=1e-5)
    causal = torch.tril(torch.ones(4, 4)) / torch.arange(1, 5.0).view(4, 1)  # row i uniform over i+1 keys
    expected = (math.log(1) + math.log(2) + math.log(3) + math.log(4)) / 4  # 0.79451
    assert attention_entropy(causal[None].expand(3, 4, 4)).item() == pytest.approx(expected, rel=1e-5)


# share = 1 - e / 4, then every rise over the layer below is damped to 0.55 of itself:
# raw      [0, .25, .5,      .375,       .75,          .25, 1,     .75,     .5, .875,   0, .75]
# smoothed [0, .1375, .336875, .35784375, .5735296875, .25, .6625, .710625, .5, .70625, 0, .4125]
ENTROPY = torch.tensor([4.0, 3.0, 2.0, 2.5, 1.0, 3.0, 0.0, 1.0, 2.0, 0.5, 4.0, 1.0])
SMOOTHED = [0, 0.1375, 0.336875, 0.35784375, 0.5735296875, 0.25, 0.6625, 0.710625, 0.5, 0.70625, 0, 0.4125]


def test_reuse_proportions_worked_example():
    assert vla_cache_reuse_proportions(ENTROPY).tolist() == pytest.approx(SMOOTHED, abs=1e-6)
    raw = vla_cache_reuse_proportions(ENTROPY, VLACacheConfig(apply_weighted_growth=False))
    assert raw.tolist() == pytest.approx((1 - ENTROPY / 4).tolist(), abs=1e-6)


def test_layer_schedule_worked_example():
    reusable = torch.zeros(256, dtype=torch.bool)
    reusable[100:180:2] = True  # 40 patches: 100, 102, ..., 178
    schedule = vla_cache_layer_reuse(reusable, ENTROPY)
    # n = 40: layer 2 int(.336875*40)=13, layer 6 int(26.5)=26, layer 9 int(28.25)=28, layer 11 int(16.5)=16 < 28
    # keeps 28. The first k reusable patches in index order: 100, 102, ...
    counts = [0, 0, 13, 13, 13, 13, 26, 26, 26, 28, 28, 28]
    assert schedule.sum(dim=1).tolist() == counts
    for layer, k in enumerate(counts):
        assert schedule[layer].nonzero().flatten().tolist() == list(range(100, 100 + 2 * k, 2))
    assert (schedule[1:] >= schedule[:-1]).all() and not (schedule & ~reusable).any()


def test_layer_schedule_edges():
    reusable = torch.zeros(256, dtype=torch.bool)
    reusable[[7, 9]] = True
    entropy = torch.zeros(12)
    entropy[2] = 1.0  # the highest entropy gives layer 2 a share of 0; upstream still drops max(1, 0) = 1 token
    schedule = vla_cache_layer_reuse(reusable, entropy, VLACacheConfig(apply_weighted_growth=False))
    assert schedule[2].nonzero().flatten().tolist() == [7] and schedule[6].sum() == 2 and not schedule[:2].any()
    assert not vla_cache_layer_reuse(torch.zeros(256, dtype=torch.bool), entropy).any()
    with pytest.raises(ValueError, match=r"VLACacheConfig.prune_layers \(2, 6, 9, 11\) exceed the 8 layers"):
        vla_cache_layer_reuse(reusable, torch.rand(8))
    with pytest.raises(ValueError, match=r"reusable must be a \[vision\] bool tensor"):
        vla_cache_layer_reuse(reusable.float(), entropy)
