"""The flow-matching policies (pi0-tiny, pi05-tiny, smolvla-tiny, random weights) on real shipped LIBERO frames
(agent and wrist views) and states: each mode skips exactly its span's rows (pi0's state: its expert K/V), each gate
opens when its rule says, the reference, episode isolation, the seed, errors, the FLOPs of reused inferences, the
closed loop."""

import copy

import numpy as np
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from dcvla.libero.episodes import list_episodes, load_episode
from dcvla.libero.protocol import policy_input
from dcvla.pi0 import GATES, MODES, Pi0Policy, ReuseConfig
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
DEPTH = 2  # the tiny pi0 presets' prefix LM (smolvla-tiny keeps 4 text layers)


@pytest.fixture(scope="module", params=["pi0", "pi05", "smolvla"])
def model(request, pi0, pi05, smolvla):
    """Each model behind a no-reuse policy."""
    return {"pi0": pi0, "pi05": pi05, "smolvla": smolvla}[request.param]


def depth(policy) -> int:
    return policy.model.config.prefix_depth


def run(policy, frames, states, instruction):
    policy.reset()
    for frame, state in zip(frames, states):
        policy.step(frame, instruction, state)
    return list(policy.records)


def expected_reuse(mode: str, lwf: int, layers: int = DEPTH) -> torch.Tensor:
    """[span, layer] bool: what the mode reuses when its gate opens."""
    reuse = torch.zeros(len(SPANS), layers, dtype=torch.bool)
    first = lwf if mode == "layer_wise" else 0
    for span in EXPECTED_SPANS[mode]:
        reuse[SPANS.index(span), first:] = True
    return reuse


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.float().flatten(), b.float().flatten(), dim=0))


def test_modes_and_gates_are_the_documented_ones(pi0, pi05):
    assert set(MODES) == set(EXPECTED_SPANS)
    assert GATES == ("cosine", "synchronized", "max_age", "pixel_mae", "phase_aware")
    assert pi0.model.config.lm.depth == pi05.model.config.lm.depth == DEPTH
    assert ReuseConfig(mode="synchronized").gate_name == "synchronized" and ReuseConfig(mode="full").gate_name == "cosine"


def test_the_spans_are_where_each_model_puts_them(pi0, pi05, pi0_clip):
    """pi0: vision and text in the prefix, the state in the expert (no prefix rows); pi0.5: the state's bin tokens
    inside the prompt ("Task: ..., State: b0 .. b7;\\nAction: "), between the words."""
    frames, states, instruction = pi0_clip
    pi0.reset()
    pi0.step(frames[0], instruction, states[0])
    spans = pi0.last.spans
    n_vision = 2 * pi0.model.config.tokens_per_image  # agent + wrist; the empty third camera is never computed
    assert np.array_equal(spans["vision"], np.arange(n_vision)) and len(spans["state"]) == 0
    assert spans["text"][0] == n_vision and len(spans["text"]) == pi0.store.num_slots - n_vision
    pi05.reset()
    pi05.step(frames[0], instruction, states[0])
    spans = pi05.last.spans
    state_n = pi05.normalize_state(states[0])
    bins = np.digitize(state_n, np.linspace(-1, 1, 257)[:-1]) - 1
    ids, words, state_rows = pi05.encode_prompt(instruction, state_n)
    decoded = pi05.tokenizer.decode([ids[i] for i in state_rows])
    assert decoded.split() == [str(b) for b in bins]  # exactly the bins' tokens
    assert pi05.tokenizer.decode(ids, skip_special_tokens=True).startswith(f"Task: {instruction.strip()}, State: ")
    assert np.array_equal(spans["state"], n_vision + state_rows) and np.array_equal(spans["text"], n_vision + words)
    assert words[0] == 0 and words[-1] == len(ids) - 1  # BOS and the trailing "Action: " are words
    assert sorted([*spans["vision"], *spans["text"], *spans["state"]]) == list(range(pi05.store.num_slots))


def test_a_policy_given_no_config_reuses_nothing(pi0, pi0_clip):
    """What a user loading a checkpoint to evaluate it expects: no mode named, every inference computed in full, even
    on a repeated frame (the default of `ReuseConfig` itself, mode "full", is what a caching study names)."""
    frames, states, instruction = pi0_clip
    frames, states = [frames[0], frames[0]], [states[0], states[0]]
    plain = Pi0Policy(pi0.model, pi0.tokenizer, seed=pi0.seed)
    assert plain.name == "none" and ReuseConfig().mode == "full"
    got, ref = run(plain, frames, states, instruction), run(pi0, frames, states, instruction)
    assert got[1].vision_similarity > 0.9999 and not got[1].gate and not got[1].span_reuse.any()
    assert all(np.array_equal(a.chunk, b.chunk) for a, b in zip(got, ref))
    reusing = run(pi0.with_config(ReuseConfig()), frames, states, instruction)
    assert reusing[1].gate and reusing[1].span_reuse.any()  # the same frames do open a named mode's gate


# ----------------------------------------------------------------------------- 1. a threshold above 1
@pytest.mark.parametrize("mode", sorted(EXPECTED_SPANS))
def test_threshold_above_one_is_exactly_no_reuse(model, pi0_clip, mode):
    """Cosine similarity <= 1 (up to rounding): a 1.001 threshold never opens the gate, even on a repeated frame,
    and every inference is bit for bit the no-reuse computation."""
    frames, states, instruction = pi0_clip
    frames, states = [frames[0], *frames[:3]], [states[0], *states[:3]]
    ref = run(model.with_config(ReuseConfig(mode="none")), frames, states, instruction)
    pol = model.with_config(ReuseConfig(mode=mode, threshold=1.001))
    got = run(pol, frames, states, instruction)
    assert got[1].vision_similarity > 0.9999 and got[1].state_similarity > 0.9999  # the repeat is as similar as it gets
    for k, (a, b) in enumerate(zip(got, ref)):
        assert a.gate is False and not a.span_reuse.any() and a.reuse_fraction == 0 and (a.staleness == 0).all()
        assert np.array_equal(a.chunk, b.chunk) and torch.equal(a.noise, b.noise) and a.flops == b.flops, (mode, k)
    assert (pol.store.computed_at == len(frames) - 1).all()


# ----------------------------------------------------------------- 2. each mode skips exactly its spans
@pytest.mark.parametrize("mode", sorted(EXPECTED_SPANS))
def test_mode_skips_exactly_its_spans(model, pi0_clip, mode):
    frames, states, instruction = pi0_clip
    where, layers = model.model.config.state_token, depth(model)
    reference = run(model.with_config(ReuseConfig(mode="none")), frames, states, instruction)
    pol = model.with_config(ReuseConfig(mode=mode, threshold=-1.0))  # the gate opens whenever the layout allows
    lwf = pol.layer_wise_from
    assert lwf == layers // 2
    pol.reset()
    assert pol.last_reuse is None  # no inference yet
    pol.step(frames[0], instruction, states[0])
    assert pol.last.gate is False and (pol.store.computed_at == 0).all()
    opened = 0
    for k in range(1, len(frames)):
        before, state_kv = copy.deepcopy(pol.store), pol.state_kv
        pol.step(frames[k], instruction, states[k])
        rec, store, ref = pol.last, pol.store, reference[k]
        if mode == "none":
            assert not rec.gate and not rec.span_reuse.any() and rec.flops == ref.flops and np.array_equal(rec.chunk, ref.chunk)
            continue
        moved = rec.spans["state"].tolist() != pol.records[-2].spans["state"].tolist()
        assert rec.moved == (("text", "state") if moved else ()) and (not moved or where == "prompt")
        expected = expected_reuse(mode, lwf, layers)
        if moved:  # pi0.5's state bins changed the prompt: its spans are computed afresh, the image tokens may reuse
            expected[SPANS.index("text")] = expected[SPANS.index("state")] = False
        if not expected.any():
            assert not rec.gate and (store.computed_at == k).all()
            continue
        opened += 1
        assert rec.gate and torch.equal(rec.span_reuse, expected), (mode, k, rec.span_reuse)
        for i, span in enumerate(SPANS):
            rows = torch.from_numpy(rec.spans[span])
            for layer in range(layers):
                at = store.computed_at[layer, rows]
                if expected[i, layer]:  # skipped: the previous computation's K/V, bit for bit (same rows: vision first)
                    assert (at < k).all() and torch.equal(at, before.computed_at[layer, rows]), (span, layer)
                    assert torch.equal(store.keys[layer][:, rows], before.keys[layer][:, rows]), (span, layer)
                    assert torch.equal(store.values[layer][:, rows], before.values[layer][:, rows]), (span, layer)
                else:
                    assert (at == k).all(), (mode, span, layer, at.unique())
        skipped = sum(int(expected[SPANS.index(s)].sum()) * len(rec.spans[s]) for s in SPANS)
        state_skipped = bool(expected[SPANS.index("state")].any()) and where == "expert"  # pi0's: its expert K/V
        assert rec.reuse_fraction == pytest.approx(skipped / (layers * store.num_slots), abs=1e-6)
        assert pol.last_reuse == rec.reuse_fraction  # what the closed-loop evaluation records per call
        assert rec.flops["vision"] == ref.flops["vision"]  # the gates need the image tokens every inference
        if where == "expert":
            assert (pol.state_kv is state_kv) == state_skipped
        assert (rec.flops["expert"] < ref.flops["expert"]) == state_skipped
        assert not np.array_equal(rec.chunk, ref.chunk), "the reused K/V must change the actions"
        if mode in ("full", "synchronized") and not moved:
            assert rec.flops["prefix"] == 0 and rec.reuse_fraction == 1.0
            assert torch.equal(rec.chunk_normalized, pol.model.sample_actions(before, rec.noise, state_kv=state_kv))
        elif skipped:
            assert 0 < rec.flops["prefix"] < ref.flops["prefix"], rec.flops
        else:  # pi0's state_only: the whole prefix is computed
            assert rec.flops["prefix"] == ref.flops["prefix"]
    assert opened >= (0 if mode == "none" else 2), "the clip must exercise the mode"


def test_layer_wise_bounds(model, pi0_clip):
    """layer_wise from layer 0 is vision_only; from the last layer it reuses only that layer's vision K/V."""
    frames, states, instruction = pi0_clip
    vision_only = run(model.with_config(ReuseConfig(mode="vision_only", threshold=-1.0)), *pi0_clip)
    from0 = run(model.with_config(ReuseConfig(mode="layer_wise", threshold=-1.0, layer_wise_from=0)), *pi0_clip)
    for a, b in zip(vision_only, from0):
        assert np.array_equal(a.chunk, b.chunk) and torch.equal(a.span_reuse, b.span_reuse)
    layers = depth(model)
    last = model.with_config(ReuseConfig(mode="layer_wise", threshold=-1.0, layer_wise_from=layers - 1))
    run(last, [frames[0], frames[1]], [states[0], states[0]], instruction)  # the same state: pi0.5's prompt stays
    assert torch.equal(last.last.span_reuse, expected_reuse("layer_wise", layers - 1, layers))
    computed_at = last.store.computed_at[:, torch.from_numpy(last.last.spans["vision"])]
    assert (computed_at[: layers - 1] == 1).all() and (computed_at[layers - 1] == 0).all()


# ------------------------------------------------------------------------------------------------ 3. gates
def test_synchronized_gate_needs_vision_and_state(pi0, pi0_clip):
    frames, states, instruction = pi0_clip
    far = states[0] + np.array([0.3, -0.3, 0.3, 0, 0, 0, 0, 0], np.float32)  # same scene, the arm elsewhere
    steps = [(frames[0], states[0]), (frames[0], far), (frames[0], far), (frames[1], far)]
    threshold = 0.99
    full = pi0.with_config(ReuseConfig(mode="full", threshold=threshold))
    sync = pi0.with_config(ReuseConfig(mode="synchronized", threshold=threshold))
    explicit = pi0.with_config(ReuseConfig(mode="full", gate="synchronized", threshold=threshold))
    for pol in (full, sync, explicit):
        run(pol, [f for f, _ in steps], [s for _, s in steps], instruction)
    f, s = full.records, sync.records
    assert s[1].vision_similarity >= threshold > s[1].state_similarity
    assert s[2].vision_similarity >= threshold and s[2].state_similarity >= threshold
    assert s[3].vision_similarity < threshold <= s[3].state_similarity
    assert [r.gate for r in f] == [False, True, True, False]
    assert [r.gate for r in s] == [False, False, True, False] == [r.gate for r in explicit.records]
    assert f[1].flops["prefix"] == 0 and s[1].flops["prefix"] == s[0].flops["prefix"]
    assert [int(r.staleness.max()) for r in f] == [0, 1, 2, 0]
    assert [int(r.staleness.max()) for r in s] == [0, 0, 1, 0]


@pytest.mark.parametrize("max_age, gates", [(1, [False] * 5), (2, [False, True, False, True, False]),
                                            (3, [False, True, True, False, True])])
def test_max_age_refreshes_at_least_every_n_inferences(model, pi0_clip, max_age, gates):
    """A cache interval: whatever the frames, one computation of the image tokens serves max_age inferences."""
    pol = model.with_config(ReuseConfig(mode="full", gate="max_age", max_age=max_age))
    got = run(pol, *pi0_clip)
    assert [r.gate for r in got] == gates  # pi0.5 too: a moved prompt is recomputed, the image tokens still reuse
    assert all(int(r.staleness.max()) < max_age for r in got)


def test_pixel_mae_reuses_while_the_cameras_barely_change(pi0, pi0_clip):
    frames, states, instruction = pi0_clip
    steps = [frames[0], frames[0], [np.clip(f.astype(int) + 3, 0, 255).astype(np.uint8) for f in frames[0]], frames[3]]
    pol = pi0.with_config(ReuseConfig(mode="full", gate="pixel_mae", pixel_threshold=0.02))
    run(pol, steps, [states[0]] * 4, instruction)
    changes = [r.pixel_change for r in pol.records]
    assert np.isnan(changes[0]) and changes[1] == 0
    assert changes[2] == pytest.approx(3 / 255, abs=1e-3) and changes[3] > 0.02
    assert [r.gate for r in pol.records] == [False, True, True, False]


def test_phase_aware_is_stricter_near_a_gripper_flip(pi0, pi0_clip, monkeypatch):
    """Away from contact the cosine threshold applies; after a chunk whose gripper command flips, the stricter one."""
    frames, states, instruction = pi0_clip
    pol = pi0.with_config(ReuseConfig(mode="full", gate="phase_aware", threshold=0.5, phase_threshold=1.001))
    chunks = iter([np.ones(7), np.ones(7), np.array([1.0, -1.0]), np.ones(7)])
    real = Pi0Policy.unnormalize

    def scripted(self, actions, state):  # the gripper command of each inference's executed actions, as scripted
        out = real(self, actions, state)
        signs = next(chunks)
        out[:, 6] = np.resize(signs, len(out))
        return out

    monkeypatch.setattr(Pi0Policy, "unnormalize", scripted)
    run(pol, frames[:4], states[:4], instruction)
    assert [r.near_contact for r in pol.records] == [False, False, False, True]
    assert [r.gate for r in pol.records] == [False, True, True, False]  # near contact, 1.001 never opens


# ------------------------------------------------------------------------------- 4. episode boundaries
def test_reuse_never_crosses_an_episode_boundary(model, pi0_clip):
    frames, states, instruction = pi0_clip
    other = load_episode(list_episodes(suite="libero_object")[0])
    frame_b = [policy_input(other.frames[0], crop=False), policy_input(other.wrist_frames[0], crop=False)]
    fresh = model.with_config(ReuseConfig(mode="none"))
    fresh.step(frame_b, other.instruction, other.states[0])
    for mode in ("full", "synchronized", "vision_only"):
        pol = model.with_config(ReuseConfig(mode=mode, threshold=-1.0))
        run(pol, frames[:3], states[:3], instruction)
        pol.reset()
        assert pol.records == [] and pol.store is None and pol.ref is None
        chunk = pol.step(frame_b, other.instruction, other.states[0])
        rec = pol.last
        assert rec.step == 0 and rec.gate is False and np.isnan(rec.vision_similarity)
        assert (rec.staleness == 0).all() and rec.reuse_fraction == 0 and not rec.span_reuse.any()
        assert np.array_equal(chunk, fresh.last.chunk), mode  # same noise, nothing of the previous episode


def test_prompt_change_needs_a_reset(model, pi0_clip):
    frames, states, instruction = pi0_clip
    pol = model.with_config(ReuseConfig(mode="full", threshold=-1.0))
    pol.reset()
    pol.step(frames[0], instruction, states[0])
    with pytest.raises(RuntimeError, match="prompt changed within an episode.*reset"):
        pol.step(frames[1], "open the top drawer", states[1])
    assert pol.step_index == 1 and len(pol.records) == 1  # the refused step changed nothing
    pol.step(frames[0], instruction, states[0])  # the episode goes on (pi0.5's changing state bins are not a new prompt)
    assert pol.last.gate and pol.last.step == 1


def test_a_step_that_fails_mid_way_breaks_the_policy_until_reset(pi0, pi0_clip, monkeypatch):
    """The expert fails after the prefix has refreshed the store (out of memory, say): the next step refuses, naming
    reset(), rather than reuse a store that mixes two inferences; after reset() the policy is a fresh one."""
    frames, states, instruction = pi0_clip
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
    with pytest.raises(RuntimeError, match="previous step .* failed mid-way.*call reset"):
        pol.step(frames[1], instruction, states[1])
    assert pol.step_index == 1 and len(pol.records) == 1
    got = [r.chunk for r in run(pol, frames[:3], states[:3], instruction)]  # run() resets first
    assert all(np.array_equal(a, b) for a, b in zip(got, expected))


# -------------------------------------------------------------------------------------------- 5. errors
@pytest.mark.parametrize("kwargs, match", [
    ({"mode": "turbo"}, "unknown mode 'turbo'"),
    ({"gate": "lucky"}, "unknown gate 'lucky'"),
    ({"threshold": float("nan")}, "threshold must be a finite"),
    ({"threshold": -1.5}, "threshold must be a finite"),
    ({"phase_threshold": "high"}, "phase_threshold must be a finite"),
    ({"max_age": 0}, "max_age must be an int >= 1"),
    ({"pixel_threshold": -0.1}, "pixel_threshold must be a mean pixel change >= 0"),
    ({"compare_to": "first"}, "compare_to must be one of"),
    ({"layer_wise_from": -1}, "layer_wise_from must be >= 0"),
    ({"replan_steps": 0}, "replan_steps must be >= 1"),
])
def test_bad_config_is_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ReuseConfig(**kwargs)


def test_the_state_width_comes_from_the_statistics_the_mode_uses(pi0, pi0_clip):
    """lerobot's statistics files may hold a one-value `count` beside the per-dim statistics: it is no state width."""
    from dataclasses import replace

    _, states, _ = pi0_clip
    norm = pi0.model.normalization
    counted = replace(norm, stats={k: dict(v, count=np.array([1234.0])) for k, v in norm.stats.items()})
    assert counted.width("observation.state") == 8
    pi0.model.normalization = counted
    try:
        np.testing.assert_array_equal(pi0.normalize_state(states[1]), norm.normalize(states[1], "observation.state"))
        with pytest.raises(ValueError, match="state has 7 values; the checkpoint's statistics have 8"):
            pi0.normalize_state(states[1][:7])
    finally:
        pi0.model.normalization = norm


def test_layer_wise_from_past_the_depth(pi0):
    with pytest.raises(ValueError, match=f"layer_wise_from={DEPTH} is past the prefix LM's {DEPTH} layers"):
        pi0.with_config(ReuseConfig(mode="layer_wise", layer_wise_from=DEPTH))


@pytest.mark.parametrize("what, error, match", [
    ("nan_state", ValueError, "state has non-finite values"),
    ("2d_state", ValueError, r"state must be a 1-D array of at most 32 values.*\(1, 8\)"),
    ("short_state", ValueError, "state has 7 values; the checkpoint's statistics have 8"),
    ("int_image", TypeError, "image dtype must be uint8"),
    ("four_images", ValueError, "4 images; the model has 3 camera slots"),
    ("chw_image", ValueError, "3 channels"),
    ("empty_prompt", ValueError, "instruction is empty"),
    ("long_prompt", ValueError, r"the prompt is \d+ tokens, past the model's \d+ \(tokenizer_max_length\)"),
])
def test_bad_step_inputs_are_named_and_change_nothing(pi0, pi0_clip, what, error, match):
    frames, states, instruction = pi0_clip
    image, state, prompt = frames[1], states[1], instruction
    if what == "nan_state":
        state = states[1].copy()
        state[2] = np.nan
    elif what == "2d_state":
        state = states[1][None]
    elif what == "short_state":
        state = states[1][:7]
    elif what == "int_image":
        image = [frames[1][0].astype(np.int32), frames[1][1]]
    elif what == "four_images":
        image = [*frames[1], *frames[1]]
    elif what == "chw_image":
        image = [frames[1][0].transpose(2, 0, 1), frames[1][1]]
    elif what == "empty_prompt":
        prompt = "  \n"
    elif what == "long_prompt":
        prompt = "pick up the bowl " * 40
    pol = pi0.with_config(ReuseConfig(mode="full", threshold=-1.0))
    pol.reset()
    pol.step(frames[0], instruction, states[0])
    with pytest.raises(error, match=match):
        pol.step(image, prompt, state)
    assert pol.step_index == 1 and len(pol.records) == 1
    assert pol.step(frames[1], instruction, states[1]).shape == (pi0.model.config.chunk_size, 7)


# ---------------------------------------------------------------------------------------------- 6. FLOPs
@pytest.mark.parametrize("mode", ["none", "vision_only", "text_fixed", "state_only", "layer_wise", "full"])
def test_an_inference_costs_the_recorded_flops(model, pi0_clip, mode):
    """A whole inference under torch's counter: exactly the recorded stages (a reused one's too)."""
    frames, states, instruction = pi0_clip
    pol = model.with_config(ReuseConfig(mode=mode, threshold=-1.0))
    pol.reset()
    pol.step(frames[0], instruction, states[0])
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        pol.step(frames[0], instruction, states[0])
    assert pol.last.gate == (mode != "none")
    assert counter.get_total_flops() == sum(pol.last.flops.values()), (counter.get_total_flops(), pol.last.flops)


# ----------------------------------------------------------------------------- 7. the gate's reference
def test_anchor_follows_the_last_closed_gate(pi0, pi0_clip):
    """Each gate compares with the reference its rule names: the previous inference, or the last one whose gate
    was closed."""
    frames, states, instruction = pi0_clip
    threshold = 0.82  # between the clip's similarities (0.75 .. 0.85 for these random weights)
    with torch.inference_mode():
        emb = [pi0.model.embed_images(pi0.pixel_values(f)[1]).flatten() for f in frames]
    gates = {}
    for compare_to in ("previous", "anchor"):
        pol = pi0.with_config(ReuseConfig(mode="vision_only", threshold=threshold, compare_to=compare_to))
        run(pol, frames, states, instruction)
        ref = 0
        for k in range(1, len(frames)):
            rec = pol.records[k]
            assert rec.vision_similarity == pytest.approx(cosine(emb[k], emb[ref]), abs=1e-6), (compare_to, k, ref)
            assert rec.gate == (rec.vision_similarity >= threshold)
            if compare_to == "previous" or not rec.gate:
                ref = k
        gates[compare_to] = [r.gate for r in pol.records[1:]]
    assert any(gates["anchor"]) and not all(gates["anchor"]), gates
    assert gates["previous"] != gates["anchor"], gates


def test_image_size_change_needs_a_reset(pi0, pi0_clip):
    frames, states, instruction = pi0_clip
    pol = pi0.with_config(ReuseConfig(mode="full", threshold=-1.0))
    pol.reset()
    pol.step(frames[0], instruction, states[0])
    with pytest.raises(RuntimeError, match="image size changed"):
        pol.step([np.zeros((256, 256, 3), np.uint8), frames[0][1]], instruction, states[0])


def test_the_seed_seeds_the_noise(pi0_clip):
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
    assert not torch.equal(runs["seeded"][0].noise, runs["seeded"][1].noise)  # a fresh draw every inference


def test_relative_action_dims_get_the_raw_state_back(pi0, pi0_clip):
    """A pi0_libero-style checkpoint predicts its first 6 dims relative to the state: un-normalising adds it back."""
    from dataclasses import replace

    frames, states, instruction = pi0_clip
    absolute = run(pi0.with_config(ReuseConfig(mode="none")), frames[:1], states[:1], instruction)[0]
    model = copy.copy(pi0.model)
    model.config = replace(pi0.model.config, delta_action_dims=6)
    relative = run(Pi0Policy(model, pi0.tokenizer, ReuseConfig(mode="none")), frames[:1], states[:1], instruction)[0]
    assert np.allclose(relative.chunk[:, :6], absolute.chunk[:, :6] + states[0][:6])
    assert np.array_equal(relative.chunk[:, 6], absolute.chunk[:, 6])


def test_closed_loop_libero_with_both_cameras_and_the_state(pi0, tmp_path):
    """The simulator's agent and wrist views and robot state drive the policy; 5 of each 10-action chunk run."""
    from dcvla.libero.evaluate import evaluate_task

    pol = pi0.with_config(ReuseConfig(mode="full", threshold=0.9))
    ds = evaluate_task(pol, "libero_spatial", 0, tmp_path, trials=1, max_steps=10, center_crop=False, progress=False)
    assert ds.attrs["uses_state"] == 1 and ds.attrs["uses_wrist"] == 1 and ds.attrs["action_convention"] == "libero"
    assert int(ds.steps[0]) == 10 and ds.error.values[0] == ""
    assert len(pol.records) == 2 and not pol.records[0].gate  # one episode: the first inference computes all
