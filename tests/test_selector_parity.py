"""The TTF and VLA-Cache baselines select exactly what upstream's own selection code selects.

`tests/fixtures/selector_parity/` was made by `scripts/make_selector_parity_fixture.py`, which ran TTF-VLA's
`APTubeManager` and VLA-Cache's `vla_cache_utils` plus the pruning block of its transformers fork, unchanged, on
shipped frames and one fixed bfloat16 attention (commits in its `meta.json`). Here dcvla's selectors get the same
inputs and must give the same masks, bit for bit. The fixture includes relevance ties at both top-k cutoffs, frames
where the two towers' pixel tests differ, a pair whose static patches are all among the most attended (upstream
raises there) and a pair with nothing static. Its `oft_*` part runs VLA-Cache's OpenVLA-OFT path (two images, a
bidirectional attention over OFT's sequence); dcvla's OFT selection must match it exactly too.
"""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from dcvla.openvla import CacheConfig
from dcvla.openvla.oft import OFTCachedPolicy
from dcvla.openvla.ttf_selector import UnifiedTokenSelector, text_to_vision_relevance, top_k_patches
from dcvla.openvla.vla_cache import (
    UPSTREAM_CONSTANTS,
    attention_entropy,
    vla_cache_layer_reuse,
    vla_cache_reusable,
    vla_cache_reuse_proportions,
    vla_cache_static_patches,
)

FIXTURE = Path(__file__).parent / "fixtures" / "selector_parity"


@pytest.fixture(scope="module")
def fx():
    meta = json.loads((FIXTURE / "meta.json").read_text())
    with np.load(FIXTURE / "inputs.npz") as z:
        inputs = {k: z[k] for k in z.files}
    with np.load(FIXTURE / "upstream.npz") as z:
        upstream = {k: z[k] for k in z.files}
    bits = torch.from_numpy(inputs.pop("attention_bf16_bits").view(np.int16))
    return meta, inputs, upstream, bits.view(torch.bfloat16)  # attention [layer, head, seq, seq]


def pixel_values(frame: np.ndarray, meta: dict) -> torch.Tensor:
    """The fixture's tower inputs: (frame / 255 - mean) / std per tower in float32, then bfloat16."""
    x = torch.from_numpy(frame).permute(2, 0, 1).float() / 255.0
    towers = [(x - torch.tensor(m).view(3, 1, 1)) / torch.tensor(s).view(3, 1, 1)
              for m, s in meta["tower_mean_std"].values()]
    return torch.cat(towers)[None].to(torch.bfloat16)


def ttf_selections(fx):
    meta, inputs, _, attention = fx
    ttf = meta["ttf_settings"]
    config = CacheConfig(method="ttf", pixel_threshold=ttf["patch_diff_threshold"], attention_top_k=ttf["attention_top_k"],
                         attention_layer_id=ttf["attention_layer_id"], keyframe_interval=ttf["keyframe_interval"],
                         fusion=ttf["fusion_mode"])
    relevance = text_to_vision_relevance(attention[config.attention_layer_id])  # every row: TTF never prunes
    n = meta["frames_per_episode"]
    selections = []
    for episode in range(len(meta["episodes"])):
        selector, previous = UnifiedTokenSelector(config.selector_config()), None
        for frame in inputs["frames"][episode * n:(episode + 1) * n]:
            selections.append(selector.select(pixel_values(frame, meta), previous))
            previous = relevance  # the fixed prefill attention of every frame
    return selections


def test_ttf_masks_per_tower_are_upstreams(fx):
    _, _, up, _ = fx
    selections = ttf_selections(fx)
    assert [s.keyframe for s in selections] == up["ttf_keyframe"].tolist()
    for i, sel in enumerate(selections):
        if sel.keyframe:  # upstream computes no mask there: every patch is recomputed
            assert up["ttf_recompute"][i].all() and not sel.tower_reuse.any()
            continue
        assert np.array_equal(sel.tower_dynamic.numpy(), up["ttf_pixel_recompute"][i]), i
        assert np.array_equal(sel.attn_relevant.numpy(), up["ttf_attention_recompute"][i][0]), i
        assert np.array_equal(sel.tower_reuse.numpy(), ~up["ttf_recompute"][i]), i
        assert np.array_equal(sel.tower_score[0].numpy(), up["ttf_pixel_diff"][i]), i  # DINOv2's mean |dY|, exactly


def test_the_fixture_tells_per_tower_masks_from_their_union(fx):
    """The unified mask (the dual cache's) differs from TTF's per-tower masks on these frames, so OR-ing the
    towers' tests for the TTF baselines again would fail the test above."""
    _, _, up, _ = fx
    selections = ttf_selections(fx)
    differ = [i for i, s in enumerate(selections) if not s.keyframe
              and not np.array_equal(np.stack([s.reuse.numpy()] * 2), ~up["ttf_recompute"][i])]
    assert len(differ) >= 3
    reuse = ~up["ttf_recompute"][[i for i, s in enumerate(selections) if not s.keyframe]]
    assert reuse[:, 1].sum() > reuse[:, 0].sum()  # SigLIP reuses more than DINOv2 (its test is half as sensitive)


def vla_cache_pairs(fx):
    """Per pair: (dcvla's relevance, static set with and without removal, entropies of the previous prefill)."""
    _, inputs, _, attention = fx
    frames = np.concatenate([inputs["frames"], inputs["made_frames"]])
    config = CacheConfig(method="vla_cache").vla_cache_config()
    for (i, j), rows in zip(inputs["vla_pairs"], inputs["vla_prev_rows"]):
        layers = [attention[layer][:, torch.from_numpy(rows[layer])] for layer in range(len(rows))]  # computed rows
        layer_id = config.attention_layer_id
        relevance = text_to_vision_relevance(layers[layer_id], torch.from_numpy(np.flatnonzero(rows[layer_id])))
        yield config, frames[i], frames[j], relevance, layers


def test_vla_cache_selection_is_upstreams(fx):
    _, _, up, _ = fx
    for k, (config, prev, cur, relevance, layers) in enumerate(vla_cache_pairs(fx)):
        assert (config.top_k_static, config.attention_top_k_remove) == (130, 120)  # upstream's OpenVLA path at HEAD
        assert np.array_equal(top_k_patches(relevance, config.attention_top_k_remove).numpy(), up["vla_removed"][k]), k
        static = vla_cache_static_patches(prev, cur, relevance, config)
        everything = vla_cache_static_patches(prev, cur, relevance, CacheConfig(attention_top_k_remove=0).vla_cache_config())
        assert np.array_equal(everything.numpy(), up["vla_static"][k]), k
        assert np.array_equal(static.numpy(), up["vla_reusable"][k]), k
        # upstream's entropy schedule runs in the attention's dtype (bfloat16): dcvla's faithful switch
        entropy = torch.stack([attention_entropy(layer, dtype=torch.bfloat16) for layer in layers])
        share = vla_cache_reuse_proportions(entropy, config)
        assert np.array_equal(share.numpy(), up["vla_schedule"][k]), k
        # where every static patch is attended, upstream's pruning block raises on len(None); dcvla reuses nothing
        assert up["vla_raises"][k] == (not static.any())
        assert np.array_equal(vla_cache_layer_reuse(static, entropy, config).numpy(), up["vla_layer_reuse"][k]), k


def test_the_fixture_covers_ties_and_the_edge_pairs(fx):
    _, _, up, _ = fx
    pairs = list(vla_cache_pairs(fx))
    relevance = pairs[0][3]
    for k in (70, 120):  # a tie straddles each top-k cutoff, so the order among equals decides
        ranked = torch.sort(relevance, descending=True, stable=True).values
        assert ranked[k - 1] == ranked[k]
    assert up["vla_raises"].tolist() == [False] * (len(pairs) - 2) + [True, True]
    assert up["vla_static"][-2].any() and not up["vla_static"][-1].any()
    # with 100 removed instead of 120 (dcvla's old constant) the reusable sets differ
    config = CacheConfig(method="vla_cache", attention_top_k_remove=100).vla_cache_config()
    assert any(not np.array_equal(vla_cache_static_patches(p, c, r, config).numpy(), up["vla_reusable"][k])
               for k, (_, p, c, r, _) in enumerate(pairs[:-2]))


def test_float32_schedule_is_close_to_upstreams_bfloat16_one(fx):
    """dcvla's default entropy schedule (float32) against upstream's bfloat16 one on the same attention."""
    _, _, up, _ = fx
    for k, (config, _, _, _, layers) in enumerate(vla_cache_pairs(fx)):
        share = vla_cache_reuse_proportions(torch.stack([attention_entropy(layer) for layer in layers]), config)
        assert np.abs(share.numpy() - up["vla_schedule"][k]).max() < 0.02, k


# ------------------------------------------------------------------------------------------ OpenVLA-OFT's path
def oft_pairs(fx, config):
    """Per OFT pair (third-person + wrist): dcvla's relevance [512], its joined reusable mask [512] under `config`,
    and the previous prefill's computed rows per layer."""
    _, inputs, _, _ = fx
    with np.load(FIXTURE / "inputs.npz") as z:
        attention = torch.from_numpy(z["oft_attention_bf16_bits"].view(np.int16)).view(torch.bfloat16)
    frames = inputs["frames"]
    for ids, rows in zip(inputs["oft_pairs"], inputs["oft_prev_rows"]):
        layers = [attention[layer][:, torch.from_numpy(rows[layer])] for layer in range(len(rows))]
        layer_id = config.attention_layer_id
        relevance = text_to_vision_relevance(layers[layer_id], torch.from_numpy(np.flatnonzero(rows[layer_id])),
                                             max_text_tokens=OFTCachedPolicy.relevance_rows, text_start=1 + 512,
                                             num_images=2)  # [512]: rows 513..546 (proprio + 33), per image
        reusable = vla_cache_reusable([frames[p] for p, _ in ids], [frames[c] for _, c in ids], relevance, config)
        yield relevance, reusable, layers


def test_oft_vla_cache_selection_is_upstreams_oft_path(fx):
    """VLA-Cache on OpenVLA-OFT: per image 150 static, 100 removed (its text rows start at the proprio token), the
    two images' positions merged, one schedule over every row of the bidirectional pass; exactly upstream's."""
    _, _, up, _ = fx
    config = CacheConfig(method="vla_cache").vla_cache_config(OFTCachedPolicy.family)
    assert (config.top_k_static, config.attention_top_k_remove) == UPSTREAM_CONSTANTS["openvla-oft"] == (150, 100)
    assert OFTCachedPolicy.relevance_rows == 34
    for k, (relevance, reusable, layers) in enumerate(oft_pairs(fx, config)):
        removed = torch.cat([top_k_patches(relevance[i * 256:(i + 1) * 256], 100) for i in range(2)])
        assert np.array_equal(removed.numpy(), up["oft_removed"][k]), k
        assert np.array_equal(reusable.numpy(), up["oft_reusable"][k]), k
        entropy = torch.stack([attention_entropy(layer, dtype=torch.bfloat16) for layer in layers])
        assert np.array_equal(vla_cache_reuse_proportions(entropy, config).numpy(), up["oft_schedule"][k]), k
        assert np.array_equal(vla_cache_layer_reuse(reusable, entropy, config).numpy(), up["oft_layer_reuse"][k]), k
    assert not up["oft_raises"].any() and up["oft_layer_reuse"].any()


def test_oft_parity_fails_with_openvlas_constants(fx):
    """The fixture tells OFT's (150, 100) from OpenVLA's (130, 120): with OpenVLA's, the reusable sets differ."""
    _, _, up, _ = fx
    config = CacheConfig(method="vla_cache").vla_cache_config("openvla")
    assert (config.top_k_static, config.attention_top_k_remove) == (130, 120)
    differ = [k for k, (_, reusable, _) in enumerate(oft_pairs(fx, config))
              if not np.array_equal(reusable.numpy(), up["oft_reusable"][k])]
    assert len(differ) == len(up["oft_reusable"])
    assert (up["oft_static"].reshape(-1, 2, 256).sum(-1) > 130).all()  # the 150 cap binds in every pair
