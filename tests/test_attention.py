"""The attention pieces every family's layer loop shares: gathering fresh and stored K/V by slot, the attention
core and its probabilities, and Q/K/V projection of chosen rows, each against a direct computation."""

import math

import pytest
import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaAttention, LlamaRotaryEmbedding

from dcvla.attention import attend, gather_kv, project_qkv
from dcvla.kv_store import KVStore

GEN = torch.Generator().manual_seed(0)


def randn(*shape):
    return torch.randn(*shape, generator=GEN)


def test_gather_kv_puts_fresh_rows_at_their_slots_and_the_store_elsewhere():
    store = KVStore(2, 5, 2, 2, 4, torch.float32, torch.device("cpu"))
    store.keys[1], store.values[1] = randn(2, 5, 4), randn(2, 5, 4)
    fresh = torch.tensor([1, 3, 5, 6])  # slots 1 and 3 recomputed; 5 and 6 are beyond the store (text)
    k, v = randn(1, 2, 4, 4), randn(1, 2, 4, 4)
    keys, values = gather_kv(store, 1, 7, fresh, k, v)
    assert keys.shape == values.shape == (1, 2, 7, 4)
    for slot in (0, 2, 4):  # reused: the store's values of that very slot
        assert torch.equal(keys[0, :, slot], store.keys[1, :, slot]) and torch.equal(values[0, :, slot], store.values[1, :, slot])
    for i, slot in enumerate(fresh.tolist()):
        assert torch.equal(keys[0, :, slot], k[0, :, i]) and torch.equal(values[0, :, slot], v[0, :, i])


def test_gather_kv_without_reuse_is_the_fresh_rows():
    k, v = randn(1, 2, 6, 4), randn(1, 2, 6, 4)
    keys, values = gather_kv(None, 0, 6, torch.arange(6), k, v)
    assert keys is k and values is v


@pytest.mark.parametrize("kv_heads", [4, 2])  # plain and grouped K/V heads
def test_attend_is_masked_softmax_attention(kv_heads):
    heads, rows, n, dim = 4, 3, 6, 8
    q, k, v = randn(1, heads, rows, dim), randn(1, kv_heads, n, dim), randn(1, kv_heads, n, dim)
    mask = torch.tensor([[True] * 4 + [False] * 2, [True] * 5 + [False], [True] * 6])  # causal rows 3..5
    out, probs = attend(q, k, v, 0.3, mask, prob_rows=torch.tensor([0, 2]))
    groups = heads // kv_heads
    k_full, v_full = k.repeat_interleave(groups, 1)[0], v.repeat_interleave(groups, 1)[0]  # [head, n, dim]
    expected_p = ((q[0] @ k_full.transpose(-1, -2)) * 0.3).masked_fill(~mask, -math.inf).softmax(-1)  # [head, row, n]
    expected = (expected_p @ v_full).transpose(0, 1).reshape(1, rows, heads * dim)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(probs, expected_p[:, [0, 2]], rtol=0, atol=1e-6)
    assert (probs[:, 0, 4:] == 0).all()  # masked keys get no probability
    assert attend(q, k, v, 0.3, mask)[1] is None  # probabilities only when asked


def test_project_qkv_projects_and_rotates_the_chosen_rows():
    cfg = LlamaConfig(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                      rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    torch.manual_seed(0)
    attn, rope = LlamaAttention(cfg, 0), LlamaRotaryEmbedding(cfg)
    x = randn(1, 5, 32)
    positions = torch.tensor([[0, 3, 4, 7, 9]])  # rows at absolute positions, as a plan carries them
    cos, sin = rope(x, positions)
    q_rows, kv_rows = torch.tensor([1, 4]), torch.tensor([0, 1, 3])
    q, k, v = project_qkv(attn, x, q_rows, kv_rows, cos, sin, 4, 2, 8)
    # all rows, then pick: a row's projection and rotation depend on that row and its position only
    q_all, k_all, v_all = project_qkv(attn, x, torch.arange(5), torch.arange(5), cos, sin, 4, 2, 8)
    assert q.shape == (1, 4, 2, 8) and k.shape == v.shape == (1, 2, 3, 8)
    torch.testing.assert_close(q, q_all[:, :, q_rows], rtol=0, atol=1e-6)
    torch.testing.assert_close(k, k_all[:, :, kv_rows], rtol=0, atol=1e-6)
    torch.testing.assert_close(v, v_all[:, :, kv_rows], rtol=0, atol=1e-6)
    # V is the plain projection; Q and K are rotated by the row's own position (position 0: no rotation)
    torch.testing.assert_close(v[0, :, 2], attn.v_proj(x[0, 3]).view(2, 8), rtol=0, atol=1e-6)
    q0, k0, _ = project_qkv(attn, x, kv_rows, kv_rows, *rope(x, torch.zeros(1, 5, dtype=torch.long)), 4, 2, 8)
    torch.testing.assert_close(q0[0, :, 0], attn.q_proj(x[0, 0]).view(4, 8), rtol=0, atol=1e-6)
    torch.testing.assert_close(k0[0, :, 0], attn.k_proj(x[0, 0]).view(2, 8), rtol=0, atol=1e-6)
    assert not torch.allclose(k[0, :, 1], k0[0, :, 1])  # row 1 sits at position 3: rotated


def test_rotate_is_transformers_rope_bit_for_bit():
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    from dcvla.attention import rotate

    cfg = LlamaConfig(hidden_size=32, num_attention_heads=4, head_dim=8,
                      rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    x, k = randn(1, 4, 5, 8), randn(1, 4, 5, 8)
    cos, sin = LlamaRotaryEmbedding(cfg)(x, torch.tensor([[0, 3, 4, 7, 9]]))
    q_ref, k_ref = apply_rotary_pos_emb(x, k, cos, sin)
    assert torch.equal(rotate(x, cos, sin), q_ref) and torch.equal(rotate(k, cos, sin), k_ref)


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_attend_takes_probability_rows_as_a_slice(kv_heads):
    q, k, v = randn(1, 4, 5, 8), randn(1, kv_heads, 7, 8), randn(1, kv_heads, 7, 8)
    mask = torch.arange(7)[None, :] <= torch.arange(2, 7)[:, None]  # rows at positions 2..6, causal
    out, by_index = attend(q, k, v, 0.3, mask, prob_rows=torch.tensor([3, 4]))
    out_s, by_slice = attend(q, k, v, 0.3, mask, prob_rows=slice(3, None))
    assert torch.equal(out, out_s) and torch.equal(by_index, by_slice)
    torch.testing.assert_close(attend(q, k, v, 0.3, mask, prob_rows=slice(None))[1][:, 3:], by_index, rtol=0, atol=1e-6)
