"""The model: presets, the blocks that run, greedy action decoding and the reference forward."""

import numpy as np
import pytest
import torch

from dcvla.openvla.config import PRESETS, get_preset
from dcvla.openvla.model import OpenVLA, random_model

TINY = get_preset("tiny")
IMAGE = np.random.default_rng(1).integers(0, 256, (224, 224, 3), dtype=np.uint8)


def test_published_dims():
    cfg = get_preset("openvla-7b")
    assert (cfg.dino.hidden_size, cfg.dino.depth, cfg.dino.num_prefix_tokens) == (1024, 24, 5)
    assert (cfg.siglip.hidden_size, cfg.siglip.depth, cfg.siglip.mlp_dim) == (1152, 27, 4304)
    assert cfg.projector_dims == (2176, 8704, 4096, 4096)
    assert (cfg.llm.hidden_size, cfg.llm.num_layers, cfg.llm.vocab_size) == (4096, 32, 32064)
    for preset in PRESETS.values():
        assert preset.num_patches == 256 and preset.llm.num_layers >= 16  # layer 15 exists for the selector


def test_openvla_7b_parameter_count_on_meta():
    with torch.device("meta"):
        model = OpenVLA(get_preset("openvla-7b"))
    # 7.54B in the published checkpoint minus the unused last blocks, DINOv2 norm and SigLIP head.
    total = sum(p.numel() for p in model.parameters()) - model.vision_backbone.featurizer.embeddings.mask_token.numel()
    assert 7.45e9 < total < 7.55e9


def test_only_the_used_blocks_are_built():
    model = random_model(TINY)
    assert len(model.vision_backbone.featurizer.blocks) == TINY.dino.depth - 1
    assert len(model.vision_backbone.fused_featurizer.blocks) == TINY.siglip.depth - 1


def test_unknown_preset_lists_known_ones():
    with pytest.raises(ValueError, match="unknown preset 'base'; known presets: openvla-7b, openvla-micro, small, tiny"):
        get_preset("base")


@torch.no_grad()
def test_greedy_decode_matches_a_full_recompute(base):
    """The KV-cached decode loop gives the same tokens as re-running the whole sequence each step."""
    model, processor = base.model, base.processor
    input_ids, pixel_values = processor(IMAGE, "pick up the bowl")
    embeds = model.multimodal_embeddings(input_ids, model.embed_image(pixel_values))
    tokens, logits = model.generate_action_tokens(embeds)
    assert embeds.shape[1] == input_ids.shape[1] + TINY.num_patches  # BOS + 256 vision + prompt
    seq = embeds
    for i in range(TINY.action_dim):
        full = model.language_model(inputs_embeds=seq).logits[:, -1]
        assert torch.allclose(full.float(), logits[i], atol=1e-4)
        assert full.argmax(-1).item() == tokens[i].item()
        seq = torch.cat([seq, model.language_model.get_input_embeddings()(tokens[i : i + 1])[None]], dim=1)


def test_random_model_is_seeded_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a, b = random_model(TINY, seed=5), random_model(TINY, seed=5)
    assert torch.equal(torch.rand(1), before)
    assert torch.equal(a.projector.fc1.weight, b.projector.fc1.weight)
    assert not torch.equal(a.projector.fc1.weight, random_model(TINY, seed=6).projector.fc1.weight)


def test_reference_action_takes_one_example(base):
    with pytest.raises(ValueError, match="batch 1"):
        base.model.reference_action(torch.ones(2, 4, dtype=torch.long), torch.zeros(2, 6, 224, 224))
    with pytest.raises(KeyError, match="unnorm_key 'bridge_orig' not found; available: random"):
        base.model.reference_action(*base.processor(IMAGE, "pick up the bowl"), unnorm_key="bridge_orig")


def test_openvla_7b_is_the_published_architecture_on_meta():
    """Built on the meta device (no memory): 7,498,158,752 parameters. The published openvla-7b has 7,541,237,184:
    the same minus DINOv2's mask token and the cls slot of its position embedding (transformers-only, zero), plus
    what dcvla never builds because its output is never used (each tower's last block, DINOv2's final norm,
    SigLIP's norm and attention-pool head)."""
    from dcvla.openvla.checkpoint import to_openvla_layout

    cfg = get_preset("openvla-7b")
    with torch.device("meta"):
        model = OpenVLA(cfg)

    def count(module):
        return sum(p.numel() for p in module.parameters())

    towers = model.vision_backbone
    llama = model.language_model
    assert (len(towers.featurizer.blocks), len(towers.fused_featurizer.blocks), len(llama.model.layers)) == (23, 26, 32)
    assert llama.model.embed_tokens.weight.shape == llama.lm_head.weight.shape == (32064, 4096)
    assert llama.model.layers[0].mlp.gate_proj.weight.shape == (11008, 4096)
    assert towers.featurizer.embeddings.position_embeddings.shape == (1, 257, 1024)
    assert towers.fused_featurizer.blocks[0].mlp.fc1.weight.shape == (4304, 1152)
    assert model.projector.fc1.weight.shape == (8704, 2176) and model.projector.fc3.weight.shape == (4096, 4096)
    assert count(model) == 7_498_158_752
    d, s, m = cfg.dino.hidden_size, cfg.siglip.hidden_size, cfg.siglip.mlp_dim
    # timm's AttentionPoolLatent: latent, q, kv, proj, norm, mlp (fc1, fc2)
    attn_pool = s + (s * s + s) + (s * 2 * s + 2 * s) + (s * s + s) + 2 * s + (s * m + m) + (m * s + s)
    never_built = count(towers.featurizer.blocks[0]) + 2 * d + count(towers.fused_featurizer.blocks[0]) + 2 * s + attn_pool
    in_checkpoint = sum(t.numel() for t in to_openvla_layout(model).values())
    assert in_checkpoint == count(model) - towers.featurizer.embeddings.mask_token.numel() - d  # no cls slot
    assert in_checkpoint + never_built == 7_541_237_184
