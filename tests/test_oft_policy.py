"""`OFTCachedPolicy` (oft-tiny, random weights) on real LIBERO frames, every method: the engine against
`OpenVLAOFT.reference_forward` (the plain transformers forward with a bidirectional mask), H1/H2 under bidirectional
attention, per-image selection, skipped work and its FLOPs, the recorder, and the streaming API's errors.

The images are a shipped spatial episode's agent view and wrist camera, the state its eef pos + axis-angle + gripper
qpos."""

import json

import numpy as np
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from dcvla.openvla import METHODS, CacheConfig
from dcvla.openvla.oft import OFTCachedPolicy, OFTRecorder, normalize_proprio
from dcvla.openvla.oft.flops import vanilla_stage_flops
from dcvla.recording import recorder_for
from oft_clip import clip, run  # noqa: F401  (clip: the fixture)

# The engine runs the reference's fp32 products on subsets of rows and over gathered K/V: only the summation order
# differs (measured max |diff| <= 8.1e-7 on the normalised chunk, every method; reuse on a moving scene: ~2e-2).
ATOL = 1e-5
BASE = OFTCachedPolicy.from_preset("oft-tiny", seed=0, config=CacheConfig("vanilla"))


def policy(**config) -> OFTCachedPolicy:
    return BASE.with_config(CacheConfig(**config))


def reference(images, state, instruction) -> np.ndarray:
    """The normalised chunk of the plain forward."""
    input_ids, pixel_values = BASE.processor(images, instruction)
    proprio = normalize_proprio(np.asarray(state, np.float64), BASE.model.stats(None)["proprio"])
    return BASE.model.reference_forward(input_ids, pixel_values, torch.tensor(proprio, dtype=torch.float32)).normalized.numpy()


# ----------------------------------------------------------------------------------- the frozen scene
@pytest.mark.parametrize("method", sorted(METHODS))
def test_frozen_scene_every_method_is_the_reference_forward(clip, method):
    """One frame (both images) and state stepped three times, no keyframe after the first, pixel fusion: every
    patch of both images is static, so whatever a method reuses, its chunk must be the reference's."""
    (images, state), instruction = clip[0][0], clip[1]
    ref = reference(images, state, instruction)
    pol = policy(method=method, fusion="pixel", keyframe_interval=100, top_k_static=256, attention_top_k_remove=0)
    got = run(pol, [(images, state)] * 3, instruction)
    assert all(np.abs(g - ref).max() <= ATOL for g in got), [float(np.abs(g - ref).max()) for g in got]
    record, m = pol.records[-1], METHODS[method]
    assert record.llm_reuse.shape == (16, 512)
    if m.unified_selector:
        assert not record.selection.keyframe and int(record.selection.reuse.sum()) == 512
    if m.vit == "kv":  # both images' towers projected K/V for the prefix tokens only
        assert all(record.vit_work[f"{image}/dino"][0].kv_rows == 5 for image in ("third-person", "wrist"))
        assert all(record.vit_work[f"{image}/siglip"][0].kv_rows == 0 for image in ("third-person", "wrist"))
    if m.llm in ("kqv", "kv"):
        assert record.llm_reuse.all()
        # BOS is fresh under bidirectional attention: it reads the state, the prompt and the slots
        assert record.llm_work[0].kv_rows == record.seq_len - 512
    elif m.llm == "vla_cache":
        assert record.llm_reuse.any() and not record.llm_reuse[:2].any()
    else:
        assert not record.llm_reuse.any()


# ------------------------------------------------------------------------------------------------ H1 and H2
def test_h1_h2_hold_under_bidirectional_attention(clip):
    """Same masks, K/V cached at every layer: dropping static rows, reusing their Q and recomputing their Q give
    the same chunk (fp32 rounding), although every row attends to every other."""
    steps, instruction = clip
    results = {name: run(policy(**config), steps, instruction) for name, config in {
        "drop": dict(method="dual_cache"),
        "q_reuse": dict(method="dual_cache", faithful=True),
        "q_recompute": dict(method="dual_cache_llm_kv"),
    }.items()}
    vanilla = run(policy(method="vanilla"), steps, instruction)
    pol = policy(method="dual_cache")
    run(pol, steps, instruction)
    reused = [int(r.selection.reuse.sum()) for r in pol.records]
    assert max(reused) > 0 and max(reused) < 512, reused  # reuse, with fresh tokens beside stale ones
    for name in ("q_reuse", "q_recompute"):
        assert all(np.abs(a - b).max() <= ATOL for a, b in zip(results["drop"], results[name])), name
    assert max(np.abs(a - b).max() for a, b in zip(results["drop"], vanilla)) > 100 * ATOL  # reuse changed the chunk


# ----------------------------------------------------------------------------------- selection per image
def test_each_image_has_its_own_selector_and_stores(clip):
    steps, instruction = clip
    pol = policy(method="dual_cache", fusion="pixel")
    run(pol, steps[:2], instruction)
    assert set(pol.tower_stores) == {"third-person/dino", "third-person/siglip", "wrist/dino", "wrist/siglip"}
    assert pol.llm_store.num_slots == 1 + 512
    sel = pol.records[1].selection
    assert sel.reuse.shape == (512,) and sel.tower_reuse.shape == (2, 512)
    assert not torch.equal(sel.reuse[:256], sel.reuse[256:])  # two scenes, two masks
    assert pol.records[1].relevance.shape == (512,)


def test_vla_cache_uses_upstreams_oft_constants_and_drops_rows(clip):
    steps, instruction = clip
    pol = policy(method="vla_cache")
    assert (pol.vla_config.top_k_static, pol.vla_config.attention_top_k_remove) == (150, 100)
    run(pol, [steps[0], steps[0], steps[1]], instruction)  # a repeated frame: every patch of both images is similar
    record = pol.records[1]
    skipped = record.llm_reuse.sum(dim=1)  # [layer]
    assert skipped[:2].eq(0).all() and skipped[2] > 0 and (skipped[1:] >= skipped[:-1]).all(), skipped
    reusable = record.llm_reuse.any(0)
    assert reusable[:256].sum() <= 150 and reusable[256:].sum() <= 150  # per image: at most 150 static
    for layer, work in enumerate(record.llm_work):
        assert work.q_rows == work.kv_rows == record.seq_len - int(skipped[layer]) and work.keys == record.seq_len
    assert record.flops["llm_prefill"] < pol.records[0].flops["llm_prefill"]


# ------------------------------------------------------------------------------------------------- FLOPs
def test_vanilla_flops_are_the_full_forwards(clip):
    (images, state), instruction = clip[0][0], clip[1]
    pol = policy(method="vanilla")
    pol.step(images, instruction, state)
    record = pol.records[0]
    assert record.flops == vanilla_stage_flops(BASE.model.config, record.seq_len)
    assert set(record.flops) == {"dino", "siglip", "projector", "llm_prefill", "head"}


@torch.no_grad()
def test_flops_count_what_a_cached_step_computed(clip):
    """Torch's own counter over a cached step equals the recorded FLOPs, plus the relevance rows' probabilities
    (layer 15, rows from the proprio token on: 2 * heads * rows * seq * head_dim), which are not model FLOPs."""
    steps, instruction = clip
    pol = policy(method="dual_cache")
    pol.reset()
    pol.step(steps[0][0], instruction, steps[0][1])
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        pol.step(steps[1][0], instruction, steps[1][1])
    record = pol.records[1]
    assert record.selection.reuse.any() and record.llm_work[0].q_rows < record.seq_len
    heads, head_dim = 2, 16
    extra = 2 * heads * (record.seq_len - 513) * record.seq_len * head_dim
    assert counter.get_total_flops() == sum(record.flops.values()) + extra


# ------------------------------------------------------------------------------------------ recording
def test_the_recorder_records_512_patches_and_the_chunk(clip):
    steps, instruction = clip
    pol = policy(method="dual_cache")
    pol.reset()
    with recorder_for(pol) as rec:
        for images, state in steps[:2]:
            pol.step(images, instruction, state)
    assert isinstance(rec, OFTRecorder) and pol.observer is None
    ds = rec.to_dataset()
    layers, heads = pol.model.config.llm.num_layers, pol.model.config.llm.num_heads
    assert ds.reuse.dims == ("frame", "patch") and ds.sizes["patch"] == 512
    assert ds.action.shape == (2, 8, 7) and ds.reuse_by_layer.shape == (2, 3, ds.sizes["layer"], 512)
    assert np.array_equal(ds.reuse_by_layer.sel(tower="llm").values[1, :layers], pol.records[-1].llm_reuse.numpy())
    assert ds.text_to_vision.shape == (2, ds.sizes["layer"], heads, 512)
    assert list(ds.stage.values) == ["select", "dino", "siglip", "projector", "llm_prefill", "head"]
    assert np.array_equal(ds.action.values[-1], pol.last.action.astype(np.float32))
    assert np.array_equal(ds.action_normalized.values[-1], pol.last.normalized)
    assert ds.latency_ms.sel(stage="head").values[0] > 0 and ds.attrs["family"] == "openvla-oft"
    assert "action_logits" not in ds and json.loads(ds.attrs["images"]) == ["third-person", "wrist"]
    # the text-to-vision rows are the ones every selector reads: the proprio token and the prompt after it
    probs = pol.records[-1].text_probs[3][:, :34, 1:513].mean(1)
    assert np.allclose(ds.text_to_vision.values[-1, 3], probs.numpy(), atol=1e-3)


def test_drift_recording_compares_with_a_full_recompute_of_both_images(clip):
    steps, instruction = clip
    runs = {}
    for method in ("vanilla", "dual_cache"):
        pol = policy(method=method)
        pol.reset()
        with recorder_for(pol, drift=True) as rec:
            for images, state in steps[:3]:
                pol.step(images, instruction, state)
        runs[method] = rec.to_dataset()
    vanilla, cached = runs["vanilla"], runs["dual_cache"]
    assert vanilla.k_drift.shape == (3, 3, vanilla.sizes["layer"], 512, 2)
    # vanilla is its own full recompute: no drift anywhere, the reference chunk is the chunk
    assert float(np.nanmax(vanilla.k_drift.values)) == 0 and (vanilla.chunk_l1.values == 0).all()
    assert np.array_equal(vanilla.action_ref.values, vanilla.action.values)
    # the dual cache: exact on the keyframe, then its reused patches' K/V drift in every tower of both images
    assert cached.chunk_l1.values[0] == 0 and cached.chunk_l1.values[1:].max() > 0
    later = cached.reuse.values[1:]  # [frame, patch]
    for tower in ("dino", "siglip", "llm"):
        k = cached.k_drift.sel(tower=tower, metric="rel_l2").values[1:, 0]  # first layer, [frame, patch]
        for image in (slice(0, 256), slice(256, 512)):
            reused = later[:, image]
            assert reused.any() and (k[:, image][reused] > 0).any(), (tower, image)
    assert np.array_equal(cached.action_ref.values, vanilla.action.values)  # the recompute is the vanilla chunk


# ------------------------------------------------------------------------------------------------- errors
def test_input_errors_are_named_and_leave_the_policy_usable(clip):
    steps, instruction = clip
    (images, state) = steps[0]
    pol = policy(method="dual_cache")
    pol.reset()
    with pytest.raises(ValueError, match=r"takes 2 images per step \(third-person, wrist\); got 1"):
        pol.step(images[:1], instruction, state)
    with pytest.raises(ValueError, match="state must be 8 numbers"):
        pol.step(images, instruction, state[:7])
    pol.step(images, instruction, state)
    with pytest.raises(RuntimeError, match="the prompt changed within an episode"):
        pol.step(images, "another task", state)
    assert not pol.broken and pol.frame == 1


def test_the_libero_closed_loop_runs_oft_with_both_views_and_whole_chunks(tmp_path):
    """dcvla.libero calls step([agent, wrist], instruction, state) and executes the whole 8-step chunk open loop."""
    from dcvla.libero import evaluate

    pol = policy(method="dual_cache")
    assert (pol.uses_wrist, pol.uses_state, pol.replan_steps) == (True, True, 8)
    ds = evaluate.evaluate_task(pol, "libero_spatial", 0, tmp_path, method="oft_dual_cache", trials=[0], max_steps=9,
                                progress=False)
    assert int(ds.attrs["uses_wrist"]) == 1 and int(ds.attrs["replan_steps"]) == 8
    assert len(pol.records) == 2  # 9 env steps: one chunk of 8, then a second call
