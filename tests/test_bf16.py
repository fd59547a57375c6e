"""The GPU path's dtype, run on the CPU: every OpenVLA method, every Pi0 mode and every study notebook at the
tiny presets in bfloat16 (a GPU run differs in the kernels, not in these code paths)."""

import numpy as np
import pytest
import torch

from dcvla.devices import place
from dcvla.libero.protocol import policy_input
from dcvla.openvla import METHODS, CacheConfig, CachedPolicy
from dcvla.pi0 import MODES, Pi0Policy, ReuseConfig
from dcvla.studies.mechanism_equivalence import EQUIVALENCE_TOLERANCE, equivalence_tolerance

BF16 = torch.bfloat16


@pytest.fixture(scope="module")
def vanilla_bf16():
    policy = CachedPolicy.from_preset("tiny", config=CacheConfig("vanilla"))
    place(policy.model, dtype=BF16)
    return policy


@pytest.fixture(scope="module", params=["pi0-tiny", "pi05-tiny"])
def pi0_bf16(request):
    policy = Pi0Policy.from_preset(request.param, seed=0, config=ReuseConfig(mode="none"))
    place(policy.model, dtype=BF16)
    return policy


def test_the_equivalence_tolerance_scales_with_the_dtype():
    assert equivalence_tolerance("float32") == EQUIVALENCE_TOLERANCE
    # a few bfloat16 ulps of a logit of magnitude ~20, float16's eight times finer
    assert equivalence_tolerance("bfloat16") == pytest.approx(4 * 2**-7 * 20)
    assert equivalence_tolerance("float16") == pytest.approx(equivalence_tolerance("bfloat16") / 8)
    with pytest.raises(ValueError, match="bfloat61"):
        equivalence_tolerance("bfloat61")


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_runs_in_bfloat16_and_a_frozen_scene_is_the_reference(vanilla_bf16, spatial_episode, method):
    frames, instruction = spatial_episode
    frame = policy_input(frames[0])
    ref = vanilla_bf16.model.reference_action(*vanilla_bf16.processor(frame, instruction))
    policy = vanilla_bf16.with_config(CacheConfig(method, fusion="pixel", keyframe_interval=100))
    policy.reset()
    for _ in range(3):
        action = policy.step(frame, instruction)
    assert policy.model.dtype == BF16 and np.isfinite(action).all()
    record = policy.records[-1]
    if METHODS[method].unified_selector:
        assert int(record.selection.reuse.sum()) == 256  # everything reused on the frozen scene
    assert torch.equal(policy.last.token_ids, ref.token_ids), method
    diff = float((policy.last.logits - ref.logits).abs().max())
    assert diff <= equivalence_tolerance("bfloat16"), (method, diff)


def test_a_changing_scene_in_bfloat16_records_finite_drift(vanilla_bf16, spatial_episode):
    from dcvla.recording import recorder_for

    frames, instruction = spatial_episode
    policy = vanilla_bf16.with_config(CacheConfig("dual_cache"))
    policy.reset()
    with recorder_for(policy, drift=True) as rec:
        for frame in frames[:4]:
            policy.step(policy_input(frame), instruction)
    ds = rec.to_dataset()
    k = ds.k_drift.sel(tower="llm").values
    assert np.isfinite(k[~np.isnan(k)]).all() and np.nanmax(k) > 0  # stale K/V on non-keyframes
    assert np.isfinite(ds.logit_kl.values).all()


@pytest.mark.parametrize("mode", sorted(MODES))
def test_every_pi0_mode_runs_in_bfloat16_with_a_float32_flow(pi0_bf16, pi0_clip, mode):
    frames, states, instruction = pi0_clip
    policy = pi0_bf16.with_config(ReuseConfig(mode=mode, threshold=0.5))  # the gate opens after the first step
    policy.reset()
    chunks = [policy.step(f, instruction, states[0]) for f in frames[:3]]  # one state: pi0.5's prompt keeps its layout
    assert all(np.isfinite(c).all() for c in chunks)
    assert policy.last.chunk_normalized.dtype == torch.float32  # integrated in float32 whatever the model dtype
    assert policy.last.gate == (mode != "none")


def test_the_bf16_flow_is_closer_to_float32_than_a_bf16_integration(pi0_bf16, pi0_clip):
    """The Euler sum in float32: a chunk integrated in bfloat16 rounds at every one of the 10 steps."""
    frames, states, instruction = pi0_clip
    policy = pi0_bf16.with_config(ReuseConfig(mode="none"))
    policy.reset()
    policy.step(frames[0], instruction, states[0])
    store, noise, model, state_kv = policy.store, policy.last.noise, policy.model, policy.state_kv
    dt = -1.0 / model.config.num_steps
    t = [torch.tensor([1.0 + i * dt]) for i in range(model.config.num_steps)]
    x = noise.to(BF16)
    for i in range(model.config.num_steps):  # the rounding a bf16 integration would add
        x = x + dt * model.velocity(store, x, t[i], state_kv).to(BF16)
    exact = noise.double()
    for i in range(model.config.num_steps):
        exact = exact + dt * model.velocity(store, exact.to(BF16), t[i], state_kv).double()
    ours = policy.last.chunk_normalized
    assert (ours.double() - exact).abs().max() < (x.double() - exact).abs().max()


def test_faithful_vla_cache_keeps_upstreams_bfloat16_entropy_schedule(vanilla_bf16, spatial_episode):
    """Upstream computes VLA-Cache's entropy schedule in the attention's dtype; `faithful=True` does too (its
    selection against upstream's code: tests/test_selector_parity.py), the default in float32."""
    frames, instruction = spatial_episode
    schedules = {}
    for faithful in (False, True):
        policy = vanilla_bf16.with_config(CacheConfig("vla_cache", faithful=faithful))
        policy.reset()
        for frame in frames[:2]:
            policy.step(policy_input(frame), instruction)
        assert policy.prev_entropy.dtype == (BF16 if faithful else torch.float32)
        schedules[faithful] = policy.prev_entropy.float()
    # bfloat16 sums a row's ~280 terms p log p with 8 bits of mantissa: measured 4.594-4.656 against float32's
    # 4.666-4.692 here, and the layers' differences (what the schedule normalises) are mostly rounded away
    assert not torch.equal(schedules[False], schedules[True])
    assert torch.allclose(schedules[False], schedules[True], rtol=0.05)


def test_every_method_runs_on_openvla_oft_in_bfloat16(spatial_episode):
    """OpenVLA-OFT's cached policy (two images, bidirectional prefill, the L1 head) in bfloat16: on a frozen scene
    every method's chunk stays within a few bf16 ulps of the plain forward's."""
    from dcvla.openvla.oft import OFTCachedPolicy, normalize_proprio
    from dcvla.libero.episodes import list_episodes, load_episode

    episode = load_episode(list_episodes(suite="libero_spatial")[0])
    images, state = [policy_input(episode.frames[0]), policy_input(episode.wrist_frames[0])], episode.states[0]
    base = OFTCachedPolicy.from_preset("oft-tiny", config=CacheConfig("vanilla"))
    place(base.model, dtype=BF16)
    input_ids, pixel_values = base.processor(images, episode.instruction)
    proprio = torch.tensor(normalize_proprio(np.asarray(state, np.float64), base.model.stats(None)["proprio"]),
                           dtype=torch.float32)
    ref = base.model.reference_forward(input_ids, pixel_values, proprio).normalized
    for method in sorted(METHODS):
        policy = base.with_config(CacheConfig(method, fusion="pixel", keyframe_interval=100))
        policy.reset()
        for _ in range(3):
            chunk = policy.step(images, episode.instruction, state)
        assert policy.model.dtype == BF16 and np.isfinite(chunk).all() and chunk.shape == (8, 7)
        diff = float((torch.from_numpy(policy.last.normalized) - ref).abs().max())
        assert diff <= 4 * 2**-7, (method, diff)  # a few bf16 ulps of values in [-1, 1]
