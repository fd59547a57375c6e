"""The FLOP accounting agrees with a hand count and with torch's own counter on the real forward."""

import torch
from torch.utils.flop_counter import FlopCounterMode

from dcvla.config import get_preset
from dcvla.flops import LayerWork, attention_layer_flops, vanilla_stage_flops, vit_flops
from dcvla.model import random_model

TINY = get_preset("tiny")


def test_hand_count_dino_tiny():
    # 261 tokens (cls + 4 registers + 256 patches), width 32, MLP 128, 3 blocks run; patch embed 256 x 588 x 32.
    per_layer = 2 * 261 * 32 * 32 * 4 + 4 * 261 * 261 * 32 + 2 * 261 * 32 * 128 * 2
    assert vit_flops(TINY.dino) == 3 * per_layer + 2 * 256 * 588 * 32 == 55_035_264


def test_fewer_rows_cost_less():
    full = attention_layer_flops(LayerWork(261, 261, 261), 32, 32, 128, 2)
    assert attention_layer_flops(LayerWork(100, 261, 261), 32, 32, 128, 2) < full
    assert attention_layer_flops(LayerWork(261, 100, 261), 32, 32, 128, 2) < full


def _counted(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


@torch.no_grad()
def test_stage_flops_match_torch_counter():
    model = random_model(TINY, attn_implementation="eager")
    pixel_values = torch.randn(1, 6, 224, 224)
    dino_px, siglip_px = torch.split(pixel_values, [3, 3], dim=1)
    input_ids = torch.tensor([[1, 323, 324, 326, 290]])
    seq_len = input_ids.shape[1] + TINY.num_patches
    expected = vanilla_stage_flops(TINY, seq_len)

    assert _counted(lambda: model.vision_backbone.featurizer(dino_px)) == expected["dino"]
    assert _counted(lambda: model.vision_backbone.fused_featurizer(siglip_px)) == expected["siglip"]
    features = model.vision_backbone(pixel_values)
    assert _counted(lambda: model.projector(features)) == expected["projector"]
    embeds = model.multimodal_embeddings(input_ids, model.projector(features))
    cache = model.new_kv_cache()
    prefill = _counted(lambda: model.language_model(inputs_embeds=embeds, past_key_values=cache, logits_to_keep=1))
    assert prefill == expected["llm_prefill"]
    token = torch.tensor([[31900]])
    decode = _counted(lambda: [model.language_model(input_ids=token, past_key_values=cache) for _ in range(TINY.action_dim - 1)])
    assert decode == expected["llm_decode"]
