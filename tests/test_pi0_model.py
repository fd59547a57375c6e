"""The pi0 / pi0.5 model (tiny presets, random weights): the expert reads exactly the prefix K/V in the store, the
stage FLOPs are what torch counts, pi0's state token is exact to compute once per inference, the published sizes
on the meta device, and the LIBERO state statistics of the random presets are the shipped episodes'."""

import copy
import math

import numpy as np
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from dcvla.attention import attend, project_qkv
from dcvla.libero.episodes import list_episodes, load_episode
from dcvla.pi0 import PiModel, ReuseConfig, get_preset, run_prefix
from dcvla.pi0.config import LIBERO_STATE_STATS, STATE_STD_FLOOR


@pytest.fixture(params=["pi0", "pi05"])
def policy(request, pi0, pi05, pi0_clip):
    """A no-reuse policy of each model after one inference on the clip's first frame."""
    frames, states, instruction = pi0_clip
    pol = {"pi0": pi0, "pi05": pi05}[request.param].with_config(ReuseConfig(mode="none"))
    pol.step(frames[0], instruction, states[0])
    return pol


def test_the_expert_reads_the_prefix_kv_from_the_store(policy):
    """The actions depend on the store's K and V of every span, and on nothing else of the prefix."""
    rec, store, model = policy.last, policy.store, policy.model
    state = policy.state_kv
    assert torch.equal(model.sample_actions(copy.deepcopy(store), rec.noise, None, state), rec.chunk_normalized)
    for span, rows in rec.spans.items():
        if not len(rows):
            continue
        for kind in ("keys", "values"):
            changed = copy.deepcopy(store)
            getattr(changed, kind)[:, :, torch.from_numpy(rows)] *= 0.5
            moved = model.sample_actions(changed, rec.noise, None, state)
            assert not torch.allclose(moved, rec.chunk_normalized), (span, kind)


def test_pi0s_state_token_is_exact_to_compute_once(pi0, pi0_clip):
    """The state token attends to the prefix and itself only: the chunk from its K/V computed once equals lerobot's
    way, the whole suffix (state + actions) through the expert at every Euler step, with big_vision's mask."""
    frames, states, instruction = pi0_clip
    pol = pi0.with_config(ReuseConfig(mode="none"))
    pol.step(frames[0], instruction, states[0])
    model, store, rec = pol.model, pol.store, pol.last
    state = torch.zeros(model.config.max_state_dim)
    state[:8] = torch.from_numpy(pol.normalize_state(states[0])).float()
    with torch.inference_mode():
        x = rec.noise.float()
        for step in range(model.config.num_steps):
            t = torch.tensor([1.0 - step / model.config.num_steps])
            actions, _ = model.embed_actions(x, t)
            hidden = torch.cat([model.state_proj(state)[None, None], actions], dim=1)  # [1, 1 + chunk, width]
            n = hidden.shape[1]
            positions = torch.arange(store.num_slots, store.num_slots + n)
            mask = torch.ones(n, store.num_slots + n, dtype=torch.bool)
            mask[0, store.num_slots + 1:] = False  # the state row sees no action
            for layer, block in enumerate(model.expert.layers):
                h = block.input_layernorm(hidden)
                cos, sin = model.expert.rotary_emb(h, positions[None])
                d = model.config.expert
                q, k, v = project_qkv(block.self_attn, h, None, None, cos, sin, d.num_heads, d.num_kv_heads, d.head_dim)
                keys = torch.cat([store.keys[layer][None], k], dim=2)
                values = torch.cat([store.values[layer][None], v], dim=2)
                out, _ = attend(q, keys, values, block.self_attn.scaling, mask)
                hidden = hidden + block.self_attn.o_proj(out)
                hidden = hidden + block.mlp(block.post_attention_layernorm(hidden))
            velocity = model.action_out_proj(model.expert.norm(hidden)[:, 1:].float())
            x = x + (-1.0 / model.config.num_steps) * velocity
    assert (x - rec.chunk_normalized).abs().max() < 1e-5


def test_stage_flops_match_torch_counter(policy, pi0_clip):
    """A no-reuse inference's stage FLOPs are what torch counts, stage by stage (the math SDPA backend spells
    attention as matmuls; the fused CPU kernel is invisible to the counter)."""
    frames, states, instruction = pi0_clip
    model, rec = policy.model, policy.last
    images, pixels = policy.pixel_values(frames[0])
    state_n = policy.normalize_state(states[0])
    ids, _, _ = policy.encode_prompt(instruction, state_n)
    counted = {}
    with torch.inference_mode(), sdpa_kernel(SDPBackend.MATH):
        with FlopCounterMode(display=False) as counter:
            prefix = model.prefix_inputs(pixels, [True, True, False], torch.tensor([ids]))
        counted["vision"] = counter.get_total_flops()
        store = model.new_store(prefix.length)
        with FlopCounterMode(display=False) as counter:
            run_prefix(model, prefix, None, store, 0)
        counted["prefix"] = counter.get_total_flops()
        state = None
        if not model.config.pi05:
            state = torch.zeros(model.config.max_state_dim)
            state[:8] = torch.from_numpy(state_n).float()
        with FlopCounterMode(display=False) as counter:
            actions = model.sample_actions(store, rec.noise, state)
        counted["expert"] = counter.get_total_flops()
    assert (actions - rec.chunk_normalized).abs().max() < 1e-5  # the same computation as the policy's
    assert counted == rec.flops


def test_the_published_sizes_on_meta():
    """pi0 on the meta device is openpi's 3,238,048,528 parameters: PaliGemma-3B-224 (SigLIP So400m/14, projector,
    Gemma-2B with its 257,152-token table) 2,923,335,408, the Gemma-300M expert 311,464,960 and the heads; pi0.5
    trades state_proj and the action-time MLP for the time MLP and adaRMS modulations in the expert's 37 norms."""
    def count(module):
        return sum(p.numel() for p in module.parameters())

    with torch.device("meta"):
        pi0, pi05 = PiModel(get_preset("pi0")), PiModel(get_preset("pi05"))
    parts = pi0.paligemma_with_expert.paligemma.model
    assert count(parts) == 2_923_335_408 and count(pi0.expert) == 311_464_960
    assert parts.language_model.embed_tokens.weight.shape == (257152, 2048)
    assert pi0.expert.layers[0].self_attn.k_proj.weight.shape == (256, 1024)  # one K/V head of 256
    assert count(pi0) == 3_238_048_528
    w = 1024
    ada = 37 * ((w * 3 * w + 3 * w) - w)  # each expert norm: a dense modulation instead of a scale
    assert count(pi05) == count(pi0) - (32 * w + w) - (2 * w * w + w) + (w * w + w) + ada == 3_353_433_872


def test_text_tokens_are_scaled_by_sqrt_width_once(pi0):
    model = pi0.model
    ids = torch.tensor([[1, 5, 9]])
    table = model.language_model.embed_tokens.weight[ids[0]]  # [text, width]
    expected = table * torch.tensor(math.sqrt(model.config.lm.width), dtype=table.dtype)
    assert torch.allclose(model.embed_text(ids)[0], expected, rtol=1e-6, atol=0)


def test_libero_state_stats_are_the_shipped_episodes():
    states = np.concatenate([load_episode(p).states for p in list_episodes()]).astype(np.float64)
    assert len(list_episodes()) >= 8 and states.shape[1] == 8
    mean, std = states.mean(0), np.maximum(states.std(0), STATE_STD_FLOOR)
    np.testing.assert_allclose(LIBERO_STATE_STATS["mean"], mean, atol=1e-3)
    np.testing.assert_allclose(LIBERO_STATE_STATS["std"], std, atol=1e-3)
    assert min(LIBERO_STATE_STATS["std"]) >= STATE_STD_FLOOR
