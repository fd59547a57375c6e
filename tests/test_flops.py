"""The FLOP accounting (engine `dcvla.flops`, OpenVLA's stages `dcvla.openvla.flops`) against torch's own counter:
the vanilla forward stage by stage, and a cached frame whose towers and LLM compute fewer rows."""

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from dcvla.openvla.config import get_preset
from dcvla.openvla.flops import vanilla_stage_flops
from dcvla.openvla.model import random_model

TINY = get_preset("tiny")


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
    prefill = _counted(lambda: model.language_model(inputs_embeds=embeds, cache=cache, logits_to_keep=1))
    assert prefill == expected["llm_prefill"]
    token = torch.tensor([[31900]])
    decode = _counted(lambda: [model.language_model(input_ids=token, cache=cache) for _ in range(TINY.action_dim - 1)])
    assert decode == expected["llm_decode"]


@torch.no_grad()
def test_flop_counter_matches_torch_on_a_cached_frame(make_policy, spatial_episode):
    frames, instruction = spatial_episode
    pol = make_policy(method="dual_cache")
    pol.step(frames[0], instruction)
    # the fused CPU attention kernel is invisible to torch's counter; the math backend spells it as matmuls
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        pol.step(frames[1], instruction)
    record = pol.records[1]
    assert record.selection.reuse.any()
    assert record.vit_work["dino"][0].q_rows < 261 and record.llm_work[0].q_rows < record.seq_len  # fewer rows
    # the selector's pixel test and the recorder's probability rows are not model FLOPs: the counter sees
    # only matmuls; the recorded attention probabilities add 2 * heads * text * seq * head_dim per layer asked.
    heads, head_dim = 2, 16
    text = record.seq_len - 257
    extra = 2 * heads * text * record.seq_len * head_dim
    assert counter.get_total_flops() == sum(record.flops.values()) + extra
