"""The LLM prefill with per-layer plans on a real LIBERO frame (tiny preset): against transformers' Llama
forward, reuse of stored K/V (and Q) of the same frame, captured attention, and errors."""

import dataclasses

import pytest
import torch

from dcvla.kv_store import LayerPlan
from dcvla.openvla.llm_cache import PrefillRequest, new_llm_store, prefill

ATOL = 1e-5  # fp32; only the summation order differs from transformers' forward
LAYERS, TEXT_START = 16, 257


@pytest.fixture(scope="module")
def inputs(base, spatial_episode):
    """(language model, embeddings of frame 0 [1, seq, hidden], of frame 4)."""
    frames, instruction = spatial_episode
    model = base.model
    with torch.no_grad():
        embeds = [model.multimodal_embeddings(ids, model.embed_image(px))
                  for ids, px in (base.processor(frames[i], instruction) for i in (0, 4))]
    return model.language_model, *embeds


def full(seq):
    return [LayerPlan.full(seq)] * LAYERS


def reuse_plans(seq, static, queries):
    """Static slots (BOS + every third vision token) take K/V from the store at every layer; with `queries` they
    are dropped from the prefill (their Q and outputs are never read), else computed with a fresh Q."""
    slot_static = torch.zeros(seq, dtype=torch.bool)
    slot_static[: static.numel()] = static
    rows = (~slot_static).nonzero().squeeze(1) if queries else torch.arange(seq)
    kv_fresh = ~slot_static[rows]
    return [LayerPlan(rows, kv_fresh, kv_fresh.clone() if queries else torch.ones_like(kv_fresh))] * LAYERS


@torch.no_grad()
def test_engine_without_reuse_equals_the_transformers_forward(inputs):
    lm, embeds, _ = inputs
    seq = embeds.shape[1]
    ours = prefill(lm, embeds, seq, full(seq), PrefillRequest(None, 0, text_start=TEXT_START))
    theirs = lm(inputs_embeds=embeds, use_cache=True)
    assert (ours.logits - theirs.logits[:, -1]).abs().max() < ATOL
    for layer in range(LAYERS):  # the K/V handed to the decode are transformers' own
        assert (ours.cache.layers[layer].keys - theirs.past_key_values.layers[layer].keys).abs().max() < ATOL
        assert (ours.cache.layers[layer].values - theirs.past_key_values.layers[layer].values).abs().max() < ATOL
    assert [w.q_rows for w in ours.work] == [seq] * LAYERS


@torch.no_grad()
@pytest.mark.parametrize("queries", [False, True])
def test_reuse_of_the_same_frame_is_the_full_prefill(inputs, queries):
    """Fill the store from a frame, then prefill the same frame with a third of the vision tokens and BOS from the
    store: the logits are the full prefill's; filled from another frame they are not (the store is really read)."""
    lm, embeds, other = inputs
    seq = embeds.shape[1]
    expected = prefill(lm, embeds, seq, full(seq), PrefillRequest(None, 0, text_start=TEXT_START)).logits
    static = torch.zeros(TEXT_START, dtype=torch.bool)
    static[0], static[1::3] = True, True
    plans = reuse_plans(seq, static, queries)
    for first, same in ((embeds, True), (other, False)):
        store = new_llm_store(lm, TEXT_START, store_queries=queries)
        prefill(lm, first, seq, full(seq), PrefillRequest(store, 0, text_start=TEXT_START))
        kept = store.keys.clone()
        out = prefill(lm, embeds[:, plans[0].rows], seq, plans, PrefillRequest(store, 1, text_start=TEXT_START))
        diff = (out.logits - expected).abs().max()
        assert (diff < ATOL) if same else (diff > 1e-3), (queries, same, float(diff))
        assert torch.equal(store.keys[:, :, static], kept[:, :, static]) and (store.computed_at[:, static] == 0).all()
        assert (store.computed_at[:, ~static] == 1).all()
    n_static = int(static.sum())
    assert out.work[0].kv_rows == seq - n_static and out.work[0].keys == seq
    assert out.work[0].q_rows == (seq - n_static if queries else seq)


@torch.no_grad()
def test_captured_attention_and_entropy(inputs):
    lm, embeds, _ = inputs
    seq = embeds.shape[1]
    request = PrefillRequest(None, 0, text_start=TEXT_START, prob_layers=frozenset({3, 15}), entropy_layers=frozenset({3}))
    out = prefill(lm, embeds, seq, full(seq), request)
    assert set(out.text_probs) == {3, 15} and set(out.entropy) == {3}
    probs = out.text_probs[15]  # [head, text row, key]
    assert probs.shape == (2, seq - TEXT_START, seq)
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, seq - TEXT_START))
    assert (probs[:, 0, TEXT_START + 1 :] == 0).all()  # causal: the first text row sees nothing after itself
    assert 0 < float(out.entropy[3]) < float(torch.log(torch.tensor(float(seq))))  # nats, below uniform


def test_bad_plans_raise(inputs):
    lm, embeds, _ = inputs
    seq = embeds.shape[1]
    request = PrefillRequest(None, 0, text_start=TEXT_START)
    with pytest.raises(ValueError, match="15 layer plans for 16 layers"):
        prefill(lm, embeds, seq, full(seq)[:15], request)
    store = new_llm_store(lm, TEXT_START, store_queries=False)
    short = LayerPlan.full(seq - 1)  # every position but the last
    with pytest.raises(ValueError, match="the last position must be computed at every layer"):
        prefill(lm, embeds[:, :-1], seq, [short] * LAYERS, dataclasses.replace(request, store=store))
