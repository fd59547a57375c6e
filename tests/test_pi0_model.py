"""The Pi0-style model (pi0-tiny, random weights): the expert reads exactly the prefix K/V in the store, the stage
FLOPs are what torch counts, and the LIBERO state statistics are the shipped episodes'."""

import copy

import numpy as np
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from dcvla.kv_store import LayerPlan
from dcvla.libero.episodes import list_episodes, load_episode
from dcvla.pi0 import ReuseConfig
from dcvla.pi0.config import LIBERO_STATE_STATS, STATE_STD_FLOOR
from dcvla.pi0.model import PrefixInputs, run_prefix

DEPTH = 4  # pi0-tiny's prefix LM


def prefix_spans(policy, instruction) -> dict[str, slice]:
    n_text = policy.encode_prompt(instruction).shape[1]
    n_vision = policy.model.config.num_image_tokens
    return {"vision": slice(0, n_vision), "text": slice(n_vision, n_vision + n_text),
            "state": slice(n_vision + n_text, n_vision + n_text + 1)}


def test_expert_reads_the_prefix_kv_from_the_store(pi0, pi0_clip):
    """The actions depend on the store's K and V of every span, and on nothing else of the prefix."""
    frames, states, instruction = pi0_clip
    pol = pi0.with_config(ReuseConfig(mode="none"))
    pol.step(frames[0], instruction, states[0])
    rec, store = pol.last, pol.store
    assert torch.equal(pol.model.sample_actions(copy.deepcopy(store), rec.noise), rec.chunk_normalized)
    for span in prefix_spans(pol, instruction).values():
        for kind in ("keys", "values"):
            changed = copy.deepcopy(store)
            getattr(changed, kind)[:, :, span] *= 0.5
            assert not torch.allclose(pol.model.sample_actions(changed, rec.noise), rec.chunk_normalized), (span, kind)


def test_stage_flops_match_torch_counter(pi0, pi0_clip):
    """A no-reuse step's stage FLOPs are what torch counts (the math SDPA backend spells attention as matmuls;
    the fused CPU kernel is invisible to the counter)."""
    frames, states, instruction = pi0_clip
    pol = pi0.with_config(ReuseConfig(mode="none"))
    pol.step(frames[0], instruction, states[0])
    rec, model = pol.last, pol.model
    px = pol.pixel_values(frames[0])
    counted = {}
    with torch.inference_mode():
        with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
            vision = model.embed_image(px)
            state = model.embed_state(pol.normalize_state(states[0]))
        counted["vision"] = counter.get_total_flops()
        inputs = PrefixInputs(vision, model.embed_text(pol.encode_prompt(instruction)), state)
        store = model.new_store(inputs.length)
        with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
            run_prefix(model, inputs, [LayerPlan.full(inputs.length)] * DEPTH, store, 0)
        counted["prefix"] = counter.get_total_flops()
        with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
            actions = model.sample_actions(store, rec.noise)
        counted["expert"] = counter.get_total_flops()
    # the same computation as the policy's step (the math backend rounds differently from the fused kernel)
    assert (actions - rec.chunk_normalized).abs().max() < 1e-5
    assert counted == rec.flops


def test_libero_state_stats_are_the_shipped_episodes():
    states = np.concatenate([load_episode(p).states for p in list_episodes()]).astype(np.float64)
    assert len(list_episodes()) >= 8 and states.shape[1] == 8
    mean, std = states.mean(0), np.maximum(states.std(0), STATE_STD_FLOOR)
    np.testing.assert_allclose(LIBERO_STATE_STATS["mean"], mean, atol=1e-3)
    np.testing.assert_allclose(LIBERO_STATE_STATS["std"], std, atol=1e-3)
    assert min(LIBERO_STATE_STATS["std"]) >= STATE_STD_FLOOR


def test_pi0_is_the_published_architecture_on_meta():
    """Built on the meta device: 3,238,082,320 parameters. PaliGemma-3B-224 (SigLIP So400m/14 + projector + Gemma-2B
    with the 257,152-token table) is 2,923,335,408 and openpi's Gemma-300M expert 311,464,960, as published; openpi's
    pi0 totals 3,238,048,528 with its state projected to the expert's width (1024); dcvla puts the state token in
    the prefix, so its state_proj maps to the LM's width (2048): 32 x 1024 + 1024 = 33,792 more."""
    from dcvla.pi0.config import get_pi0_preset
    from dcvla.pi0.model import Pi0Model

    with torch.device("meta"):
        model = Pi0Model(get_pi0_preset("pi0"))

    def count(module):
        return sum(p.numel() for p in module.parameters())

    assert count(model.vision) + count(model.projector) + count(model.language_model) == 2_923_335_408
    assert count(model.expert) == 311_464_960
    assert model.language_model.embed_tokens.weight.shape == (257152, 2048)
    assert model.expert.layers[0].self_attn.k_proj.weight.shape == (256, 1024)  # one K/V head of 256
    assert model.state_proj.weight.shape == (2048, 32)
    assert count(model) == 3_238_048_528 + 33_792 == 3_238_082_320


def test_text_tokens_are_scaled_by_sqrt_width_once(pi0):
    """Gemma scales its token embeddings by sqrt(width) inside the embedding module; a second scaling would
    make text tokens width times the table's rows."""
    import math

    model = pi0.model
    ids = torch.tensor([[1, 5, 9]])
    table = model.language_model.embed_tokens.weight[ids[0]]  # [text, width]
    expected = table * torch.tensor(math.sqrt(model.config.lm.hidden_size), dtype=table.dtype)
    assert torch.allclose(model.embed_text(ids)[0], expected, rtol=1e-6, atol=0)
