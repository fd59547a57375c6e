"""Per-stage latency of one vanilla OpenVLA step on this machine, with the FLOPs of each stage.

Stages: dino, siglip (the two towers), projector, llm_prefill (BOS + 256 vision + prompt, last logits only),
llm_decode (the remaining action_dim - 1 single-token steps). Each repeat runs the stages in order on the same
frame; the table reports medians over repeats after warm-up, and GFLOP/s achieved.

    python benchmarks/step_latency.py --preset tiny --preset small --repeats 10
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from dcvla.cli import shipped_frame
from dcvla.config import get_preset
from dcvla.flops import vanilla_stage_flops
from dcvla.policy import VLAPolicy

STAGES = ("dino", "siglip", "projector", "llm_prefill", "llm_decode")


@torch.inference_mode()
def time_stages(policy: VLAPolicy, image: np.ndarray, instruction: str) -> dict[str, float]:
    """One step, stage by stage; returns milliseconds per stage."""
    model = policy.model
    input_ids, pixel_values = policy.processor(image, instruction)
    dino_px, siglip_px = torch.split(pixel_values, [3, 3], dim=1)
    ms: dict[str, float] = {}

    def timed(name, fn):
        start = time.perf_counter()
        out = fn()
        ms[name] = (time.perf_counter() - start) * 1e3
        return out

    dino = timed("dino", lambda: model.vision_backbone.featurizer(dino_px))
    siglip = timed("siglip", lambda: model.vision_backbone.fused_featurizer(siglip_px))
    patches = timed("projector", lambda: model.projector(torch.cat([dino, siglip], dim=2)))
    embeds = model.multimodal_embeddings(input_ids, patches)
    cache = model.new_kv_cache()
    out = timed("llm_prefill", lambda: model.language_model(inputs_embeds=embeds, past_key_values=cache, logits_to_keep=1))
    timed("llm_decode", lambda: model.decode_actions(out.logits[:, -1], cache))
    return ms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", action="append", help="preset(s) to time (default: tiny and small)")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args()
    image, instruction, _ = shipped_frame()  # first frame of the first shipped LIBERO episode
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; frame {image.shape}, instruction {instruction!r}")
    for preset in args.preset or ["tiny", "small"]:
        policy = VLAPolicy.from_preset(preset)
        seq_len = policy.processor.encode_prompt(instruction).shape[1] + get_preset(preset).num_patches
        flops = vanilla_stage_flops(get_preset(preset), seq_len)
        runs = [time_stages(policy, image, instruction) for _ in range(args.warmup + args.repeats)][args.warmup:]
        print(f"\npreset {preset}: sequence {seq_len} tokens, medians of {args.repeats} repeats")
        print(f"{'stage':<12} {'ms':>9} {'GFLOP':>9} {'GFLOP/s':>8}")
        total_ms = 0.0
        for stage in STAGES:
            ms = statistics.median(r[stage] for r in runs)
            total_ms += ms
            print(f"{stage:<12} {ms:9.2f} {flops[stage] / 1e9:9.3f} {flops[stage] / 1e6 / ms:8.1f}")
        end_to_end = statistics.median(sum(r.values()) for r in runs)
        print(f"{'total':<12} {end_to_end:9.2f} {sum(flops.values()) / 1e9:9.3f}")


if __name__ == "__main__":
    main()
