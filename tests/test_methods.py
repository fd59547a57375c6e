"""The caches and methods on real LIBERO frames (tiny preset): equivalences, refresh, isolation, savings."""

import numpy as np
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from dcvla.cache import LayerPlan
from dcvla.llm_cache import prefill
from dcvla.methods import METHODS, CacheConfig
from dcvla.vit_cache import run_tower, tower_plan

ATOL = 1e-5


def run(pol, frames, instruction):
    pol.reset()
    return [pol.step(f, instruction) for f in frames], [r.prediction for r in pol.records]


# ------------------------------------------------------------------------------------------ the engine itself
@torch.no_grad()
def test_engine_without_reuse_equals_transformers_forward(base, spatial_episode):
    model = base.model
    input_ids, pixel_values = base.processor(spatial_episode[0][0], spatial_episode[1])
    dino_px, siglip_px = torch.split(pixel_values, [3, 3], dim=1)
    for tower, px in ((model.vision_backbone.featurizer, dino_px), (model.vision_backbone.fused_featurizer, siglip_px)):
        out = run_tower(tower, px, tower_plan(tower, None, True), None, 0)
        assert (out.features - tower(px)).abs().max() < ATOL
    embeds = model.multimodal_embeddings(input_ids, model.embed_image(pixel_values))
    seq = embeds.shape[1]
    ours = prefill(model.language_model, embeds, seq, [LayerPlan.full(seq)] * 16, None, 0, text_start=257)
    theirs = model.language_model(inputs_embeds=embeds).logits[:, -1]
    assert (ours.logits - theirs).abs().max() < ATOL


# ------------------------------------------------------------------------------------------------------- H0
@pytest.mark.parametrize("method", sorted(METHODS))
def test_h0_all_dynamic_equals_vanilla(base, make_policy, spatial_episode, method):
    """Every frame a keyframe (unified selector) and no static patch (VLA-Cache's own selection, which
    ignores keyframes): nothing is reused, so every method must be vanilla."""
    frames, instruction = spatial_episode
    reference = [base.model.predict_action(*base.processor(f, instruction)) for f in frames[:3]]
    _, predictions = run(make_policy(method=method, keyframe_interval=1, top_k_static=0), frames[:3], instruction)
    for ref, got in zip(reference, predictions):
        assert torch.equal(ref.token_ids, got.token_ids)
        assert (ref.logits - got.logits).abs().max() < ATOL


# ------------------------------------------------------------------------------------------------ H1 and H2
def test_h1_h2_q_reuse_q_recompute_and_dropping_agree(make_policy, spatial_episode):
    """Same mask, K/V cached at every layer: static rows' Q and outputs influence nothing downstream."""
    frames, instruction = spatial_episode
    runs = {
        "drop": make_policy(method="dual_cache"),
        "q_reuse": make_policy(method="dual_cache", faithful=True),
        "q_recompute": make_policy(method="dual_cache_llm_kv"),
    }
    results = {name: run(pol, frames, instruction)[1] for name, pol in runs.items()}
    reused = [r.selection.reuse.sum().item() for r in runs["drop"].records]
    assert max(reused) > 0, "the test frames must exercise reuse"
    for name in ("q_reuse", "q_recompute"):
        for a, b in zip(results["drop"], results[name]):
            assert torch.equal(a.token_ids, b.token_ids), name
            assert (a.logits - b.logits).abs().max() < ATOL, name


# ------------------------------------------------------------------------------------- caches and episodes
def test_keyframes_refresh_every_cache(make_policy, spatial_episode):
    frames, instruction = spatial_episode
    pol = make_policy(method="dual_cache", keyframe_interval=3)
    run(pol, frames[:4], instruction)  # frames 0..3: frame 3 is a keyframe
    assert pol.records[3].selection.keyframe and not pol.records[2].selection.keyframe
    for store in pol.tower_stores.values():
        assert (store.computed_at == 3).all()
    assert (pol.llm_store.computed_at == 3).all()


def test_staleness_counts_frames_since_fresh(make_policy, spatial_episode):
    frames, instruction = spatial_episode
    still = [frames[0]] * 5  # a frozen scene: only attention-relevant patches are recomputed
    pol = make_policy(method="dual_cache", keyframe_interval=100, fusion="pixel")
    run(pol, still, instruction)
    for record in pol.records:
        assert (record.staleness == record.frame).all(), (record.frame, record.staleness.unique())
    assert (pol.tower_stores["dino"].staleness(4)[:, 5:] == 4).all()  # patches: computed at frame 0 only


def test_reset_isolates_episodes(make_policy, spatial_episode):
    frames, instruction = spatial_episode
    fresh, _ = run(make_policy(method="dual_cache"), frames[4:8], instruction)
    pol = make_policy(method="dual_cache")
    run(pol, frames[:4], instruction)
    again, _ = run(pol, frames[4:8], instruction)
    assert all(np.array_equal(a, b) for a, b in zip(fresh, again))


def test_changes_without_reset_raise(make_policy, spatial_episode):
    frames, instruction = spatial_episode
    pol = make_policy(method="dual_cache")
    pol.step(frames[0], instruction)
    with pytest.raises(RuntimeError, match="prompt changed within an episode.*call reset"):
        pol.step(frames[1], "open the drawer")
    with pytest.raises(RuntimeError, match="image size changed"):
        pol.step(np.zeros((128, 128, 3), np.uint8), instruction)
    pol.reset()
    pol.step(frames[1], "open the drawer")


def test_bad_config_is_named(make_policy):
    with pytest.raises(ValueError, match="unknown method 'turbo'; known: vanilla"):
        CacheConfig(method="turbo")
    with pytest.raises(ValueError, match="attention_layer_id=40 is past the LLM's 16 layers"):
        make_policy(attention_layer_id=40)


# -------------------------------------------------------------------------------------------- real savings
def test_dual_cache_skips_work_and_counts_it(make_policy, spatial_episode):
    frames, instruction = spatial_episode
    pol = make_policy(method="dual_cache")
    run(pol, frames[:3], instruction)
    vanilla = make_policy(method="vanilla")
    run(vanilla, frames[:3], instruction)
    record, ref = pol.records[1], vanilla.records[1]
    n_static = int(record.selection.reuse.sum())
    assert n_static > 0
    assert record.vit_work["dino"][0].q_rows == 5 + 256 - n_static  # static patches dropped from the ViT
    assert record.llm_work[0].q_rows == ref.llm_work[0].q_rows - n_static - 1  # and from the LLM (+ BOS)
    assert record.llm_work[0].keys == ref.llm_work[0].keys  # attending over every position
    assert sum(record.flops.values()) < sum(ref.flops.values())


@torch.no_grad()
def test_flop_counter_matches_torch_on_a_cached_frame(make_policy, spatial_episode):
    frames, instruction = spatial_episode
    pol = make_policy(method="dual_cache")
    pol.step(frames[0], instruction)
    # the fused CPU attention kernel is invisible to torch's counter; the math backend spells it as matmuls
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        pol.step(frames[1], instruction)
    record = pol.records[1]
    assert record.selection.reuse.any()
    # the selector's pixel test and the recorder's probability rows are not model FLOPs: the counter sees
    # only matmuls; the recorded attention probabilities add 2 * heads * text * seq * head_dim per layer asked.
    heads, head_dim = 2, 16
    text = record.seq_len - 257
    extra = 2 * heads * text * record.seq_len * head_dim
    assert counter.get_total_flops() == sum(record.flops.values()) + extra


def test_vla_cache_drops_rows_from_its_prune_layers(make_policy, spatial_episode):
    """VLA-Cache: layers 0-1 compute every row; from layer 2 the skipped tokens are dropped (no Q, no MLP),
    monotonically, and their K/V come from the store."""
    frames, instruction = spatial_episode
    pol = make_policy(method="vla_cache")
    run(pol, [frames[0], frames[0], frames[1]], instruction)  # a repeated frame: every patch is similar
    record = pol.records[1]
    skipped = record.llm_reuse.sum(dim=1)  # [layer]
    assert skipped[:2].eq(0).all() and skipped[2] > 0, skipped
    assert (skipped[1:] >= skipped[:-1]).all(), "a token dropped at one layer stays dropped"
    for layer, work in enumerate(record.llm_work):
        assert work.q_rows == work.kv_rows == record.seq_len - int(skipped[layer])
        assert work.keys == record.seq_len
    assert record.flops["llm_prefill"] < pol.records[0].flops["llm_prefill"]


def test_vanilla_does_no_selector_bookkeeping(make_policy, spatial_episode):
    """Only methods with a selector compute the text-to-vision attention it needs."""
    frames, instruction = spatial_episode
    vanilla, cached = make_policy(method="vanilla"), make_policy(method="dual_cache")
    for pol in (vanilla, cached):
        pol.step(frames[0], instruction)
    assert vanilla.records[0].text_probs == {} and vanilla.records[0].relevance is None
    assert set(cached.records[0].text_probs) == {15} and cached.records[0].relevance.shape == (256,)
