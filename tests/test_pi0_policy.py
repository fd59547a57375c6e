"""The Pi0-style policy (pi0-tiny, random weights) on real shipped LIBERO frames: prefix K/V reuse per mode, the
gate and its reference, episode isolation, the seed, errors, the FLOPs of reused steps, the closed loop."""

import copy

import numpy as np
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from dcvla.libero.episodes import list_episodes, load_episode
from dcvla.libero.protocol import policy_input
from dcvla.pi0 import MODES, Pi0Policy, ReuseConfig
from dcvla.pi0.config import SPANS

# What each mode must reuse when its gate opens, written out here rather than read from MODES.
EXPECTED_SPANS = {
    "none": (),
    "full": SPANS,
    "vision_only": ("vision",),
    "state_only": ("state",),
    "text_fixed": ("text",),
    "layer_wise": ("vision",),  # in layers >= layer_wise_from only
    "synchronized": SPANS,
}
DEPTH = 4  # pi0-tiny's prefix LM


# ------------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def reference(pi0, pi0_clip):
    """The no-reuse run over the pi0_clip: its step records."""
    return run(pi0.with_config(ReuseConfig(mode="none")), *pi0_clip)


@pytest.fixture(scope="module")
def repeat_clip(pi0_clip):
    """The pi0_clip with its first frame (and state) twice: step 1 repeats step 0 exactly."""
    frames, states, instruction = pi0_clip
    return [frames[0], *frames], [states[0], *states], instruction


@pytest.fixture(scope="module")
def repeat_reference(pi0, repeat_clip):
    return run(pi0.with_config(ReuseConfig(mode="none")), *repeat_clip)


def run(policy, frames, states, instruction):
    policy.reset()
    for frame, state in zip(frames, states):
        policy.step(frame, instruction, state)
    return list(policy.records)


def expected_reuse(mode: str, lwf: int) -> torch.Tensor:
    """[span, layer] bool: what the mode reuses when its gate opens."""
    reuse = torch.zeros(len(SPANS), DEPTH, dtype=torch.bool)
    first = lwf if mode == "layer_wise" else 0
    for span in EXPECTED_SPANS[mode]:
        reuse[SPANS.index(span), first:] = True
    return reuse


def prefix_spans(policy, instruction) -> dict[str, slice]:
    n_text = policy.encode_prompt(instruction).shape[1]
    n_vision = policy.model.config.num_image_tokens
    return {"vision": slice(0, n_vision), "text": slice(n_vision, n_vision + n_text),
            "state": slice(n_vision + n_text, n_vision + n_text + 1)}


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.float().flatten(), b.float().flatten(), dim=0))


def test_modes_are_the_documented_ones(pi0):
    assert set(MODES) == set(EXPECTED_SPANS)
    assert pi0.model.config.num_layers == DEPTH


# ----------------------------------------------------------------------------- 1. a threshold above 1
@pytest.mark.parametrize("mode", sorted(EXPECTED_SPANS))
def test_threshold_above_one_is_exactly_no_reuse(pi0, repeat_clip, repeat_reference, mode):
    """Cosine similarity <= 1 (up to rounding): a 1.001 threshold never opens the gate, even on a repeated frame,
    and every step is bit for bit the no-reuse computation."""
    frames, states, instruction = repeat_clip
    ref = repeat_reference
    pol = pi0.with_config(ReuseConfig(mode=mode, threshold=1.001))
    got = run(pol, frames, states, instruction)
    assert len(got) == len(frames)
    assert got[1].vision_similarity > 0.9999 and got[1].state_similarity > 0.9999  # the repeat is as similar as it gets
    for k, (a, b) in enumerate(zip(got, ref)):
        assert a.gate is False, (mode, k)
        assert not a.span_reuse.any() and a.reuse_fraction == 0 and (a.staleness == 0).all()
        assert np.array_equal(a.chunk, b.chunk), (mode, k)
        assert torch.equal(a.noise, b.noise)
        assert a.flops == b.flops
    assert (pol.store.computed_at == len(frames) - 1).all()


# ----------------------------------------------------------------- 2. each mode reuses exactly its spans
@pytest.mark.parametrize("mode", sorted(EXPECTED_SPANS))
def test_mode_reuses_exactly_its_spans(pi0, pi0_clip, reference, mode):
    frames, states, instruction = pi0_clip
    pol = pi0.with_config(ReuseConfig(mode=mode, threshold=-1.0))  # the gate opens on every step after the first
    lwf = pol.layer_wise_from
    assert lwf == DEPTH // 2
    spans = prefix_spans(pol, instruction)
    prefix_len = spans["state"].stop
    expected = expected_reuse(mode, lwf)
    full_prefix = reference[0].flops["prefix"]
    pol.reset()
    pol.step(frames[0], instruction, states[0])
    assert pol.last.gate is False and (pol.store.computed_at == 0).all()
    for k in range(1, len(frames)):
        before = copy.deepcopy(pol.store)
        pol.step(frames[k], instruction, states[k])
        rec, store = pol.last, pol.store
        assert rec.step == k
        assert rec.gate is (mode != "none"), k
        assert torch.equal(rec.span_reuse, expected), (mode, k, rec.span_reuse)
        for i, span in enumerate(SPANS):
            slots = spans[span]
            for layer in range(DEPTH):
                at = store.computed_at[layer, slots]
                if expected[i, layer]:  # reused: the previous computation's K/V, bit for bit
                    assert torch.equal(at, before.computed_at[layer, slots]) and (at < k).all(), (span, layer)
                    assert torch.equal(store.keys[layer, :, slots], before.keys[layer, :, slots]), (span, layer)
                    assert torch.equal(store.values[layer, :, slots], before.values[layer, :, slots]), (span, layer)
                else:
                    assert (at == k).all(), (mode, span, layer, at.unique())
            # reuse starts at step 1 and the gate stays open: a reused span was last computed at step 0
            assert int(rec.staleness[i]) == (k if expected[i].any() else 0), (span, rec.staleness)
        lengths = torch.tensor([spans[s].stop - spans[s].start for s in SPANS])
        share = float((expected.sum(1) * lengths).sum()) / (DEPTH * prefix_len)
        assert rec.reuse_fraction == pytest.approx(share, abs=1e-6)
        assert rec.flops["vision"] == reference[k].flops["vision"]  # the gate needs the image tokens every step
        assert rec.flops["expert"] == reference[k].flops["expert"]
        if mode == "none":
            assert rec.flops["prefix"] == full_prefix
            assert np.array_equal(rec.chunk, reference[k].chunk)
        else:
            assert not np.array_equal(rec.chunk, reference[k].chunk), "the reused K/V must change the actions"
        if mode in ("full", "synchronized"):
            assert rec.flops["prefix"] == 0 and rec.reuse_fraction == 1.0
            # the expert read exactly the previous store
            assert torch.equal(rec.chunk_normalized, pol.model.sample_actions(before, rec.noise))
        elif mode != "none":
            assert 0 < rec.flops["prefix"] < full_prefix, rec.flops


def test_layer_wise_bounds(pi0, pi0_clip):
    """layer_wise from layer 0 is vision_only; from the last layer it reuses only that layer's vision K/V."""
    frames, states, instruction = pi0_clip
    vision_only = run(pi0.with_config(ReuseConfig(mode="vision_only", threshold=-1.0)), *pi0_clip)
    from0 = run(pi0.with_config(ReuseConfig(mode="layer_wise", threshold=-1.0, layer_wise_from=0)), *pi0_clip)
    for a, b in zip(vision_only, from0):
        assert np.array_equal(a.chunk, b.chunk) and torch.equal(a.span_reuse, b.span_reuse)
    last = pi0.with_config(ReuseConfig(mode="layer_wise", threshold=-1.0, layer_wise_from=DEPTH - 1))
    run(last, frames[:2], states[:2], instruction)
    assert torch.equal(last.last.span_reuse, expected_reuse("layer_wise", DEPTH - 1))
    vision = prefix_spans(last, instruction)["vision"]
    computed_at = last.store.computed_at[:, vision]
    assert (computed_at[: DEPTH - 1] == 1).all() and (computed_at[DEPTH - 1] == 0).all()


# ------------------------------------------------------------------------------ 3. the synchronized gate
def test_synchronized_gate_needs_vision_and_state(pi0, pi0_clip):
    frames, states, instruction = pi0_clip
    far = states[0] + np.array([0.3, -0.3, 0.3, 0, 0, 0, 0, 0], np.float32)  # same scene, the arm elsewhere
    steps = [
        (frames[0], states[0]),  # 0: first step, nothing to reuse
        (frames[0], far),        # 1: vision identical, state not: full reuses, synchronized recomputes
        (frames[0], far),        # 2: both identical: both reuse
        (frames[1], far),        # 3: the scene moved, state identical: neither reuses
    ]
    threshold = 0.99
    full = pi0.with_config(ReuseConfig(mode="full", threshold=threshold))
    sync = pi0.with_config(ReuseConfig(mode="synchronized", threshold=threshold))
    for pol in (full, sync):
        run(pol, [f for f, _ in steps], [s for _, s in steps], instruction)
    f, s = full.records, sync.records
    for k in range(1, 4):  # both gates saw the same similarities (both keep the previous step as reference)
        assert f[k].vision_similarity == pytest.approx(s[k].vision_similarity, abs=1e-6)
    assert s[1].vision_similarity >= threshold > s[1].state_similarity, (s[1].vision_similarity, s[1].state_similarity)
    assert s[2].vision_similarity >= threshold and s[2].state_similarity >= threshold
    assert s[3].vision_similarity < threshold <= s[3].state_similarity
    assert [r.gate for r in f] == [False, True, True, False]
    assert [r.gate for r in s] == [False, False, True, False]
    full_prefix = s[0].flops["prefix"]
    assert f[1].flops["prefix"] == 0 and s[1].flops["prefix"] == full_prefix
    assert f[2].flops["prefix"] == 0 and s[2].flops["prefix"] == 0
    assert f[3].flops["prefix"] == full_prefix == s[3].flops["prefix"]
    # full skipped step 1 (its store is step 0's), synchronized recomputed it; step 3 is fresh for both
    assert (full.store.computed_at == 3).all() and (sync.store.computed_at == 3).all()
    assert [int(r.staleness.max()) for r in f] == [0, 1, 2, 0]
    assert [int(r.staleness.max()) for r in s] == [0, 0, 1, 0]


# ------------------------------------------------------------------------------- 4. episode boundaries
def test_reuse_never_crosses_an_episode_boundary(pi0, pi0_clip):
    frames, states, instruction = pi0_clip
    other = load_episode(list_episodes(suite="libero_object")[0])
    frame_b, state_b = policy_input(other.frames[0], crop=False), other.states[0]
    fresh = pi0.with_config(ReuseConfig(mode="none"))
    fresh.step(frame_b, other.instruction, state_b)
    for mode in ("full", "synchronized", "vision_only"):
        pol = pi0.with_config(ReuseConfig(mode=mode, threshold=-1.0))
        run(pol, frames[:3], states[:3], instruction)
        assert pol.last.gate and pol.step_index == 3
        pol.reset()
        assert pol.records == [] and pol.store is None and pol.ref_vision is None
        chunk = pol.step(frame_b, other.instruction, state_b)
        rec = pol.last
        assert rec.step == 0 and rec.gate is False and np.isnan(rec.vision_similarity)
        assert (rec.staleness == 0).all() and rec.reuse_fraction == 0 and not rec.span_reuse.any()
        assert (pol.store.computed_at == 0).all()
        assert np.array_equal(chunk, fresh.last.chunk), mode  # same noise, nothing of the previous episode


def test_prompt_change_needs_a_reset(pi0, pi0_clip):
    frames, states, instruction = pi0_clip
    pol = pi0.with_config(ReuseConfig(mode="full", threshold=-1.0))
    pol.reset()
    pol.step(frames[0], instruction, states[0])
    with pytest.raises(RuntimeError, match="prompt changed within an episode.*reset"):
        pol.step(frames[1], "open the top drawer", states[1])
    assert pol.step_index == 1 and len(pol.records) == 1  # the refused step changed nothing
    pol.step(frames[1], instruction, states[1])  # the episode goes on
    assert pol.last.gate and pol.last.step == 1
    pol.reset()
    pol.step(frames[1], "open the top drawer", states[1])
    assert pol.last.step == 0 and pol.last.gate is False


def test_a_step_that_fails_mid_way_breaks_the_policy_until_reset(pi0, pi0_clip, monkeypatch):
    """The expert fails after the prefix has refreshed the store (out of memory, say): the next step refuses, naming
    reset(), rather than reuse a store that mixes two steps; after reset() the policy is a fresh one."""
    frames, states, instruction = pi0_clip
    # the gate opens on every step after the first; the text and state rows are recomputed, so the store is written
    config = ReuseConfig(mode="vision_only", threshold=-1.0)
    expected = [r.chunk for r in run(pi0.with_config(config), frames[:3], states[:3], instruction)]
    pol = pi0.with_config(config)
    pol.reset()
    pol.step(frames[0], instruction, states[0])

    def out_of_memory(*args, **kwargs):
        raise RuntimeError("out of memory (injected)")

    with monkeypatch.context() as patch:
        patch.setattr(type(pi0.model), "sample_actions", out_of_memory)
        with pytest.raises(RuntimeError, match="injected"):
            pol.step(frames[1], instruction, states[1])
    assert (pol.store.computed_at == 1).any(), "the failed step had written the store"
    for _ in range(2):
        with pytest.raises(RuntimeError, match="previous step .* failed mid-way.*call reset"):
            pol.step(frames[1], instruction, states[1])
    assert pol.step_index == 1 and len(pol.records) == 1
    got = [r.chunk for r in run(pol, frames[:3], states[:3], instruction)]  # run() resets first
    assert all(np.array_equal(a, b) for a, b in zip(got, expected))


# -------------------------------------------------------------------------------------------- 6. errors
@pytest.mark.parametrize("kwargs, error, match", [
    ({"mode": "turbo"}, ValueError, "unknown mode 'turbo'"),
    ({"threshold": float("nan")}, ValueError, "threshold must be a finite"),
    ({"threshold": -1.5}, ValueError, "threshold must be a finite"),
    ({"compare_to": "first"}, ValueError, "compare_to must be one of"),
    ({"layer_wise_from": -1}, ValueError, "layer_wise_from must be >= 0"),
    ({"replan_steps": 0}, ValueError, "replan_steps must be >= 1"),
])
def test_bad_config_is_named(kwargs, error, match):
    with pytest.raises(error, match=match):
        ReuseConfig(**kwargs)


def test_layer_wise_from_past_the_depth(pi0):
    with pytest.raises(ValueError, match=f"layer_wise_from={DEPTH} is past the prefix LM's {DEPTH} layers"):
        pi0.with_config(ReuseConfig(mode="layer_wise", layer_wise_from=DEPTH))
    assert pi0.with_config(ReuseConfig(mode="layer_wise", layer_wise_from=DEPTH - 1)).layer_wise_from == DEPTH - 1


@pytest.mark.parametrize("what, error, match", [
    ("nan_state", ValueError, "state has non-finite values"),
    ("2d_state", ValueError, r"state must be a 1-D array of at most 8 values.*\(1, 8\)"),
    ("long_state", ValueError, r"at most 8 values.*\(9,\)"),
    ("int_image", TypeError, "image dtype must be uint8"),
    ("float_image", ValueError, r"float image values must lie in \[0, 1\]"),
    ("chw_image", ValueError, "3 channels"),
    ("empty_prompt", ValueError, "instruction is empty"),
])
def test_bad_step_inputs_are_named_and_change_nothing(pi0, pi0_clip, what, error, match):
    frames, states, instruction = pi0_clip
    image, state, prompt = frames[1], states[1], instruction
    if what == "nan_state":
        state = states[1].copy()
        state[2] = np.nan
    elif what == "2d_state":
        state = states[1][None]
    elif what == "long_state":
        state = np.append(states[1], 0.0)
    elif what == "int_image":
        image = frames[1].astype(np.int32)
    elif what == "float_image":
        image = frames[1].astype(np.float32)  # 0..255 as floats
    elif what == "chw_image":
        image = frames[1].transpose(2, 0, 1)
    elif what == "empty_prompt":
        prompt = "  \n"
    pol = pi0.with_config(ReuseConfig(mode="full", threshold=-1.0))
    pol.step(frames[0], instruction, states[0])
    with pytest.raises(error, match=match):
        pol.step(image, prompt, state)
    assert pol.step_index == 1 and len(pol.records) == 1
    assert pol.step(frames[1], instruction, states[1]).shape == (pi0.model.config.action_horizon, 7)


# ---------------------------------------------------------------------------------------------- 7. FLOPs
@pytest.mark.parametrize("mode", ["vision_only", "text_fixed", "state_only", "layer_wise", "full"])
def test_reused_step_flops_match_torch_counter(pi0, pi0_clip, mode):
    """A whole gated step under the counter: exactly the recorded stages."""
    frames, states, instruction = pi0_clip
    pol = pi0.with_config(ReuseConfig(mode=mode, threshold=-1.0))
    pol.step(frames[0], instruction, states[0])
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        pol.step(frames[1], instruction, states[1])
    assert pol.last.gate
    assert counter.get_total_flops() == sum(pol.last.flops.values())


# ----------------------------------------------------------------------------- 9. the gate's reference
def test_previous_reference_moves_every_step_anchor_does_not(pi0, pi0_clip):
    frames, states, instruction = pi0_clip
    with torch.inference_mode():
        emb = [pi0.model.embed_image(pi0.pixel_values(f)) for f in frames[:3]]
    for compare_to in ("previous", "anchor"):
        pol = pi0.with_config(ReuseConfig(mode="full", threshold=-1.0, compare_to=compare_to))
        pol.step(frames[0], instruction, states[0])
        anchor = pol.ref_vision
        assert torch.equal(anchor, emb[0])
        for k in (1, 2):
            pol.step(frames[k], instruction, states[k])
            assert pol.last.gate
            if compare_to == "anchor":  # gated steps leave the reference where the gate last closed
                assert pol.ref_vision is anchor
                assert pol.last.vision_similarity == pytest.approx(cosine(emb[k], emb[0]), abs=1e-6)
            else:
                assert pol.ref_vision is not anchor and torch.equal(pol.ref_vision, emb[k])
                assert pol.last.vision_similarity == pytest.approx(cosine(emb[k], emb[k - 1]), abs=1e-6)


def test_anchor_follows_the_last_closed_gate(pi0, pi0_clip):
    """With a threshold that opens some gates and closes others, each gate compares with the reference its rule
    names: the previous step, or the last step whose gate was closed."""
    frames, states, instruction = pi0_clip
    threshold = 0.94
    with torch.inference_mode():
        emb = [pi0.model.embed_image(pi0.pixel_values(f)) for f in frames]
    gates = {}
    for compare_to in ("previous", "anchor"):
        pol = pi0.with_config(ReuseConfig(mode="vision_only", threshold=threshold, compare_to=compare_to))
        run(pol, frames, states, instruction)
        ref = 0
        for k in range(1, len(frames)):
            sim = cosine(emb[k], emb[ref])
            rec = pol.records[k]
            assert rec.vision_similarity == pytest.approx(sim, abs=1e-6), (compare_to, k, ref)
            assert rec.gate == (rec.vision_similarity >= threshold)
            if compare_to == "previous" or not rec.gate:
                ref = k
        gates[compare_to] = [r.gate for r in pol.records[1:]]
    # the pi0_clip must exercise both rules: open and closed gates, and a step where the two references disagree
    assert any(gates["anchor"]) and not all(gates["anchor"]), gates
    assert gates["previous"] != gates["anchor"], gates


def test_image_size_change_needs_a_reset(pi0, pi0_clip):
    frames, states, instruction = pi0_clip
    pol = pi0.with_config(ReuseConfig(mode="full", threshold=-1.0))
    pol.step(frames[0], instruction, states[0])
    with pytest.raises(RuntimeError, match="image size changed"):
        pol.step(np.zeros((256, 256, 3), np.uint8), instruction, states[0])


def test_threshold_just_above_one_never_reuses_identical_frames(pi0, pi0_clip):
    frames, states, instruction = pi0_clip
    pol = pi0.with_config(ReuseConfig(mode="full", threshold=1.0000001))
    for _ in range(3):  # the same frame and state: float32 similarity may round above 1, the gate must not open
        pol.step(frames[0], instruction, states[0])
    assert not any(r.gate for r in pol.records)
    assert all(r.vision_similarity > 0.9999 for r in pol.records[1:])  # as similar as it gets: only the threshold closes it


def test_the_seed_seeds_the_noise(pi0_clip):
    """Same seed: the same noise and chunks; another seed: other noise; every episode draws the same sequence."""
    frames, states, instruction = pi0_clip
    seeded = Pi0Policy.from_preset("pi0-tiny", seed=3, config=ReuseConfig(mode="none"))
    same = Pi0Policy(seeded.model, seeded.tokenizer, ReuseConfig(mode="none"), seed=3)
    other = Pi0Policy(seeded.model, seeded.tokenizer, ReuseConfig(mode="none"), seed=4)
    runs = {name: run(pol, frames[:2], states[:2], instruction) for name, pol in
            (("seeded", seeded), ("same", same), ("other", other))}
    again = run(seeded, frames[:2], states[:2], instruction)  # a second episode of the same policy
    for k in range(2):
        a = runs["seeded"][k]
        for b in (runs["same"][k], again[k]):
            assert torch.equal(a.noise, b.noise) and np.array_equal(a.chunk, b.chunk), k
        assert not torch.equal(a.noise, runs["other"][k].noise) and not np.array_equal(a.chunk, runs["other"][k].chunk)
    assert not torch.equal(runs["seeded"][0].noise, runs["seeded"][1].noise)  # a fresh draw every step


def test_closed_loop_libero_with_robot_state(pi0, tmp_path):
    """The simulator's robot state drives the policy; chunks of 4 run 4 env steps per inference here
    (replan_steps 5 is clipped to the horizon)."""
    from dcvla.libero.evaluate import evaluate_task

    pol = pi0.with_config(ReuseConfig(mode="full", threshold=0.9))
    ds = evaluate_task(pol, "libero_spatial", 0, tmp_path, trials=1, max_steps=12, center_crop=False, progress=False)
    assert ds.attrs["uses_state"] == 1 and ds.attrs["action_convention"] == "libero"
    assert int(ds.steps[0]) == 12 and ds.error.values[0] == ""
    assert int(np.isfinite(ds.latency_ms[0].values).sum()) == 12 // pol.model.config.action_horizon
    assert len(pol.records) == 3 and not pol.records[0].gate  # one episode: the first inference recomputes all
