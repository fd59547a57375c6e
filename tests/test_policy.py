"""`CachedPolicy` on real LIBERO frames (tiny preset), every method: the engine against the plain transformers
forward, equivalences, refresh, isolation, savings, the streaming API and its errors."""

import numpy as np
import pytest
import torch

from dcvla.libero.protocol import policy_input
from dcvla.openvla import METHODS, CacheConfig, CachedPolicy

# The engine runs the same fp32 products as the reference on subsets of rows and over gathered K/V, so only the
# summation order differs: measured max |logit diff| <= 8.4e-7 for every method (logits up to ~3.6). Injected
# off-by-one slot bugs moved them by 9e-3 to 5e-2; the smallest injected effect (a wrapped roll of the ViT store,
# 7.5e-5) is why the bound is 1e-5 rather than 1e-4 (see test_frozen_scene_every_method_is_the_reference_forward).
ATOL = 1e-5
IMAGE = np.random.default_rng(1).integers(0, 256, (224, 224, 3), dtype=np.uint8)


def run(pol, frames, instruction):
    pol.reset()
    return [pol.step(f, instruction) for f in frames], [r.prediction for r in pol.records]


def assert_same_prediction(got, ref, what=""):
    assert torch.equal(got.token_ids, ref.token_ids), what
    assert (got.logits - ref.logits).abs().max() < ATOL, (what, float((got.logits - ref.logits).abs().max()))


# ----------------------------------------------------------------------------------- the frozen scene
# Pixel fusion reuses every patch; hybrid fusion also recomputes the 70 most text-attended ones, so fresh and
# stored slots meet in one layer (a consistent permutation of ALL stored slots is invisible to attention; a fresh
# row among them is not). Hybrid only changes methods with the unified selector.
FROZEN = [(m, "pixel") for m in sorted(METHODS)] + [(m, "hybrid") for m in sorted(METHODS) if METHODS[m].unified_selector]


@pytest.mark.parametrize("method, fusion", FROZEN)
def test_frozen_scene_every_method_is_the_reference_forward(base, make_policy, spatial_episode, method, fusion):
    """The strongest check of the cache engine: one frame stepped three times, no keyframe after the first. On a
    frozen scene the reused values ARE the fresh ones, so whatever a method reuses, its action tokens and logits
    must be the plain transformers forward's (`reference_action`, no engine code). A K/V read from or written to
    a neighbouring slot moves the logits by ~1e-2, 1000x the tolerance (measured with an injected off-by-one)."""
    frames, instruction = spatial_episode
    frame = policy_input(frames[0])
    ref = base.model.reference_action(*base.processor(frame, instruction))
    # VLA-Cache's own selection: every patch may be static and none is protected by attention (the
    # analogue of pixel fusion), so its layer schedule reuses as many tokens as its entropies allow.
    pol = make_policy(method=method, fusion=fusion, keyframe_interval=100, top_k_static=256, attention_top_k_remove=0)
    pol.reset()
    actions = [pol.step(frame, instruction) for _ in range(3)]
    record, m = pol.records[-1], METHODS[method]
    assert_same_prediction(record.prediction, ref, method)
    assert np.array_equal(actions[-1], ref.action)
    # reuse really happened on the last frame
    n_static = 256 if fusion == "pixel" else 256 - 70
    if m.unified_selector:
        assert not record.selection.keyframe and int(record.selection.reuse.sum()) == n_static, method
    if m.vit == "kv":  # the towers projected K/V for the prefix tokens and the recomputed patches only
        assert record.vit_work["dino"][0].kv_rows == 5 + 256 - n_static, record.vit_work["dino"]
        assert record.vit_work["siglip"][0].kv_rows == 256 - n_static, record.vit_work["siglip"]
    if m.llm in ("kqv", "kv"):  # the static vision tokens' K/V came from the store at every layer
        assert torch.equal(record.llm_reuse, record.selection.reuse.expand(16, -1)), method
    elif m.llm == "vla_cache":
        assert record.llm_reuse.any() and not record.llm_reuse[:2].any(), record.llm_reuse.sum(1)
    else:
        assert not record.llm_reuse.any()
    if method == "vanilla":
        assert pol.tower_stores is None and pol.llm_store is None and record.selection is None


# ------------------------------------------------------------------------------------------------------- H0
@pytest.mark.parametrize("method", sorted(METHODS))
def test_h0_all_dynamic_equals_the_reference_forward(base, make_policy, spatial_episode, method):
    """Every frame a keyframe (unified selector) and no static patch (VLA-Cache's own selection, which
    ignores keyframes): nothing is reused, so every method must be the reference forward."""
    frames, instruction = spatial_episode
    reference = [base.model.reference_action(*base.processor(f, instruction)) for f in frames[:3]]
    _, predictions = run(make_policy(method=method, keyframe_interval=1, top_k_static=0), frames[:3], instruction)
    for k, (ref, got) in enumerate(zip(reference, predictions)):
        assert_same_prediction(got, ref, (method, k))


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
            assert_same_prediction(b, a, name)


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
    still = [frames[0]] * 5  # a frozen scene: with pixel fusion nothing is recomputed after frame 0
    pol = make_policy(method="dual_cache", keyframe_interval=100, fusion="pixel")
    assert pol.last_reuse is None  # no frame yet
    reuse = []
    for frame in still:
        pol.step(frame, instruction)
        reuse.append(pol.last_reuse)  # what the closed-loop LIBERO evaluation records per step
    assert reuse == [0.0, 1.0, 1.0, 1.0, 1.0]
    for record in pol.records:
        assert (record.staleness == record.frame).all(), (record.frame, record.staleness.unique())
    mixed = make_policy(method="dual_cache")
    for frame in frames[:3]:
        mixed.step(frame, instruction)
        assert mixed.last_reuse == float((mixed.records[-1].staleness > 0).float().mean())
    assert 0 < mixed.last_reuse < 1
    assert (pol.tower_stores["dino"].staleness(4)[:, 5:] == 4).all()  # patches: computed at frame 0 only


def test_reset_isolates_episodes(make_policy, spatial_episode):
    frames, instruction = spatial_episode
    fresh, _ = run(make_policy(method="dual_cache"), frames[4:8], instruction)
    pol = make_policy(method="dual_cache")
    run(pol, frames[:4], instruction)
    again, _ = run(pol, frames[4:8], instruction)
    assert all(np.array_equal(a, b) for a, b in zip(fresh, again))


def test_a_step_that_fails_mid_way_breaks_the_policy_until_reset(make_policy, spatial_episode, monkeypatch):
    """The prefill fails after the towers have refreshed their stores (out of memory, say): the next step refuses,
    naming reset(), rather than run on stores that mix two frames; after reset() the policy is a fresh one."""
    import dcvla.openvla.cache_policy as policy_module  # the shared stages call the prefill

    frames, instruction = spatial_episode
    expected, expected_predictions = run(make_policy(method="dual_cache"), frames[:3], instruction)
    pol = make_policy(method="dual_cache")
    pol.reset()
    pol.step(frames[0], instruction)

    def out_of_memory(*args, **kwargs):
        raise RuntimeError("out of memory (injected)")

    with monkeypatch.context() as patch:
        patch.setattr(policy_module, "prefill", out_of_memory)
        with pytest.raises(RuntimeError, match="injected"):
            pol.step(frames[1], instruction)
    assert (pol.tower_stores["dino"].computed_at == 1).any(), "the failed step had written the tower stores"
    for _ in range(2):
        with pytest.raises(RuntimeError, match="previous step .* failed mid-way.*call reset"):
            pol.step(frames[1], instruction)
    assert pol.frame == 1 and len(pol.records) == 1
    actions, predictions = run(pol, frames[:3], instruction)  # run() resets first
    assert all(np.array_equal(a, b) for a, b in zip(actions, expected))
    for got, ref in zip(predictions, expected_predictions):
        assert torch.equal(got.token_ids, ref.token_ids) and torch.equal(got.logits, ref.logits)


def test_input_errors_do_not_break_the_policy(make_policy, spatial_episode):
    """Inputs are checked before the step changes anything: a refused step leaves the policy usable."""
    frames, instruction = spatial_episode
    pol = make_policy(method="dual_cache")
    pol.reset()
    pol.step(frames[0], instruction)
    with pytest.raises(ValueError, match="instruction is empty"):
        pol.step(frames[1], "  ")
    assert not pol.broken
    pol.step(frames[1], instruction)
    assert pol.frame == 2


def test_only_the_stores_a_method_reads_exist(make_policy):
    for method, m in METHODS.items():
        pol = make_policy(method=method)
        assert (pol.tower_stores is not None) == (m.vit == "kv"), method
        assert (pol.llm_store is not None) == (m.llm != "full"), method
        if pol.llm_store is not None:
            assert (pol.llm_store.queries is not None) == (m.llm == "kqv"), method


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
    with pytest.raises(ValueError, match=r"prune_layers=\(2, 6, 9, 20\) has a layer past the LLM's 16 layers"):
        make_policy(method="vla_cache", prune_layers=(2, 6, 9, 20))


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


# --------------------------------------------------------------------------------------- the policy API
def test_random_preset_decodes_action_tokens(base):
    base.reset()
    action = base.step(IMAGE, "pick up the bowl")
    ids = base.last.token_ids
    base.reset()
    assert action.shape == (7,) and np.isfinite(action).all()
    assert ((ids < 32000) & (ids >= 32000 - 256)).all(), ids


def test_policy_errors_name_the_problem(base):
    base.reset()
    with pytest.raises(ValueError, match="batch of 2"):
        base.step(np.stack([IMAGE, IMAGE]), "pick up the bowl")
    with pytest.raises(ValueError, match="instruction is empty"):
        base.step(IMAGE, "  ")
    with pytest.raises(KeyError, match="unnorm_key 'bridge_orig' not found; available: random"):
        CachedPolicy(base.model, base.processor, CacheConfig("vanilla", unnorm_key="bridge_orig"))
    assert base.frame == 0  # the refused steps counted no frame


def test_from_pretrained_uses_checkpoint_stats(parity_dir):
    policy = CachedPolicy.from_pretrained(parity_dir, config=CacheConfig("vanilla", unnorm_key="libero_spatial"),
                                          preset="tiny")
    action = policy.step(IMAGE, "put the bowl on the plate")
    assert policy.model.action_stats("libero_spatial") is policy.model.norm_stats["libero_spatial_no_noops"]["action"]
    assert action.shape == (7,)
    ref = policy.model.reference_action(*policy.processor(IMAGE, "put the bowl on the plate"), "libero_spatial")
    assert np.array_equal(action, ref.action)


def test_ttf_fuses_each_tower_with_its_own_mask(make_policy):
    """TTF keeps one mask per tower: a blue change of 24 grey levels moves DINOv2's normalised grayscale by
    0.114 / 0.225 * 24 / 255 = 0.048 and SigLIP's by 0.114 * 2 * 24 / 255 = 0.021, so at the 0.03 threshold the
    patch is dynamic for DINOv2 only: DINOv2 recomputes its output token, SigLIP keeps the cached one."""
    pol = make_policy(method="ttf", fusion="pixel", keyframe_interval=100)
    patch, (r, c) = 3 * 16 + 5, (3, 5)
    changed = IMAGE.copy()
    blue = changed[r * 14:(r + 1) * 14, c * 14:(c + 1) * 14, 2].astype(int)
    changed[r * 14:(r + 1) * 14, c * 14:(c + 1) * 14, 2] = np.where(blue <= 231, blue + 24, blue - 24)
    pol.reset()
    pol.step(IMAGE, "pick it up")
    before = pol.fused_features.clone()
    pol.step(changed, "pick it up")
    sel, after, dino = pol.records[-1].selection, pol.fused_features, pol.model.config.dino.hidden_size
    assert sel.tower_dynamic[:, patch].tolist() == [True, False] and sel.tower_dynamic.sum() == 1
    assert not sel.reuse[patch] and sel.tower_reuse[:, patch].tolist() == [False, True]
    assert not torch.equal(after[0, patch, :dino], before[0, patch, :dino])  # DINOv2: fresh
    assert torch.equal(after[0, patch, dino:], before[0, patch, dino:])      # SigLIP: its cached token
    others = torch.arange(256) != patch
    assert torch.equal(after[0, others], before[0, others])  # static in both towers: cached

