"""`dcvla.devices.place`: a model moved and cast to bfloat16 keeps RoPE's inverse frequencies in float32, for the
OpenVLA Llama and both Pi0 Gemma stacks, on every path that casts a model (the studies' random presets, the
checkpoint loader); `parse_dtype` names a bad dtype."""

import pytest
import torch
from torch import nn
from transformers.models.gemma.modeling_gemma import GemmaRotaryEmbedding
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from dcvla.devices import parse_dtype, place, rotary_modules
from dcvla.openvla.checkpoint import load_pretrained, save_pretrained
from dcvla.openvla.config import get_preset
from dcvla.openvla.model import llama_config, random_model
from dcvla.pi0.config import get_preset as get_pi_preset
from dcvla.pi0.model import gemma_config
from dcvla.pi0.model import random_model as random_pi
from dcvla.studies.common import StudyConfig, base_policy
from dcvla.studies.stability_cliff import CliffConfig, pi0_base

POSITIONS = torch.arange(301)[None]  # a prompt of about 300 tokens: BOS + 256 vision tokens + text


def cos_sin(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """The rotary embedding's float32 cos/sin at positions 0..300."""
    return module(torch.zeros(1, dtype=torch.float32), POSITIONS)


def max_rope_error(model: nn.Module, reference: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    return max(max((c - rc).abs().max().item(), (s - rs).abs().max().item())
               for (c, s), (rc, rs) in zip(map(cos_sin, rotary_modules(model)), reference))


def rope_7b_dims() -> nn.Module:
    """The rotary embeddings at the published dims (head_dim 128 for Llama-2-7B, 256 for Gemma): bf16 hurts most."""
    pi0 = get_pi_preset("pi0")
    return nn.ModuleList([LlamaRotaryEmbedding(llama_config(get_preset("openvla-7b").llm)),
                          GemmaRotaryEmbedding(gemma_config(pi0.lm, pi0, pi0.vocab_size))])


def rope_llama3_scaled() -> nn.Module:
    """A scaled RoPE variant (Llama-3.1's): its inverse frequencies come from ROPE_INIT_FUNCTIONS, not the default."""
    from dataclasses import replace

    config = llama_config(replace(get_preset("tiny").llm, hidden_size=1024, num_heads=8))
    config.rope_parameters = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                              "high_freq_factor": 4.0, "original_max_position_embeddings": 256}
    return nn.ModuleList([LlamaRotaryEmbedding(config)])


BUILDERS = {
    "openvla-tiny (Llama)": lambda: random_model(get_preset("tiny")),
    "pi0-tiny (Gemma prefix LM + expert)": lambda: random_pi("pi0-tiny"),
    "pi05-tiny (Gemma prefix LM + adaRMS expert)": lambda: random_pi("pi05-tiny"),
    "published dims": rope_7b_dims,
    "scaled RoPE (llama3)": rope_llama3_scaled,
}


@pytest.mark.parametrize("build", BUILDERS.values(), ids=BUILDERS.keys())
def test_place_bfloat16_keeps_rope_float32(build):
    model = build()
    reference = [cos_sin(m) for m in rotary_modules(model)]
    assert reference, "no rotary embedding found"
    # what a plain cast does: the test can fail
    naive = build().to(dtype=torch.bfloat16)
    assert all(m.inv_freq.dtype == torch.bfloat16 for m in rotary_modules(naive))
    assert max_rope_error(naive, reference) > 1e-2
    placed = place(model, "cpu", torch.bfloat16)
    assert placed is model
    for module in rotary_modules(model):
        assert module.inv_freq.dtype == module.original_inv_freq.dtype == torch.float32
        assert "inv_freq" in module._buffers and "inv_freq" in module._non_persistent_buffers_set
    assert max_rope_error(model, reference) <= 1e-6
    weights = [p for p in model.parameters()]
    assert not weights or all(p.dtype == torch.bfloat16 for p in weights)


def test_place_repairs_a_model_cast_before():
    """A model already cast with `.to(bfloat16)` gets exact float32 RoPE back (recomputed, not up-cast)."""
    reference = [cos_sin(m) for m in rotary_modules(rope_7b_dims())]
    model = rope_7b_dims().to(torch.bfloat16)
    assert max_rope_error(place(model), reference) <= 1e-6


def test_loading_a_bf16_checkpoint_keeps_rope_float32(tmp_path):
    model = random_model(get_preset("tiny"), seed=2)
    reference = [cos_sin(m) for m in rotary_modules(model)]
    save_pretrained(model, tmp_path)  # bfloat16 on disk, as published
    for dtype in (torch.bfloat16, torch.float32):
        loaded = load_pretrained(tmp_path, dtype=dtype)
        assert loaded.dtype == dtype
        assert [m.inv_freq.dtype for m in rotary_modules(loaded)] == [torch.float32]
        assert max_rope_error(loaded, reference) <= 1e-6


def test_study_paths_place_their_models():
    """The studies' random presets go through `place`: bf16 weights, float32 RoPE, for both families."""
    openvla = base_policy(StudyConfig(preset="tiny", dtype="bfloat16")).model
    pi0 = pi0_base(CliffConfig(preset="tiny", dtype="bfloat16")).model
    for model in (openvla, pi0):
        assert model.dtype == torch.bfloat16
        assert {m.inv_freq.dtype for m in rotary_modules(model)} == {torch.float32}


def test_parse_dtype():
    assert parse_dtype("bfloat16") is torch.bfloat16
    assert parse_dtype("torch.float16") is torch.float16
    assert parse_dtype(torch.float32) is torch.float32
    for bad in ("bf16", "float64", torch.int64, None):
        with pytest.raises(ValueError, match=r"is not a model dtype; expected one of float32, bfloat16, float16"):
            parse_dtype(bad)
    with pytest.raises(ValueError, match=r"^StudyConfig.dtype: 'bf16' is not a model dtype"):
        base_policy(StudyConfig(preset="tiny", dtype="bf16"))
    with pytest.raises(ValueError, match=r"^CliffConfig.dtype: 'half' is not a model dtype"):
        pi0_base(CliffConfig(preset="tiny", dtype="half"))
