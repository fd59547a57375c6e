"""Per-stage latency of one OpenVLA step on this machine, with the FLOPs of each stage: the reference (the plain
transformers forward, `OpenVLA.reference_action`'s modules) next to the cache engine's methods (`CachedPolicy`).

Stages: select (the engine's reuse decision), dino, siglip (the two towers), projector, llm_prefill (BOS + 256
vision + prompt, last logits only), llm_decode (the remaining action_dim - 1 single-token steps). Each repeat runs
one full step on the same frame; an engine step follows a `reset()`, so it is an episode's first frame and
computes everything, as the reference does (what the engine itself costs; benchmarks/cache_speedup.py measures
reuse). The table reports medians over repeats after warm-up, and the reference's GFLOP/s.

On a GPU every stage is timed between two device synchronisations (the engine's stage clock does the same).

    python benchmarks/step_latency.py --preset tiny --preset small --repeats 10 --methods vanilla dual_cache
    python benchmarks/step_latency.py --preset openvla-7b --device cuda --dtype bfloat16
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _setup import DTYPES, place_model, timer  # noqa: E402

from dcvla.cli import shipped_frame  # noqa: E402
from dcvla.openvla import METHODS, CacheConfig, CachedPolicy, get_preset  # noqa: E402
from dcvla.openvla.flops import vanilla_stage_flops  # noqa: E402

STAGES = ("select", "dino", "siglip", "projector", "llm_prefill", "llm_decode")
REFERENCE = "reference (HF forward)"


@torch.inference_mode()
def time_reference(policy: CachedPolicy, image: np.ndarray, instruction: str) -> dict[str, float]:
    """One step of the plain transformers forward, stage by stage; returns milliseconds per stage."""
    model = policy.model
    input_ids, pixel_values = policy.processor(image, instruction)
    input_ids, pixel_values = input_ids.to(model.device), pixel_values.to(model.device, model.dtype)
    dino_px, siglip_px = torch.split(pixel_values, [3, 3], dim=1)
    ms: dict[str, float] = {}

    def timed(name, fn):
        with timer(model.device, ms, name):
            out = fn()
        return out

    dino = timed("dino", lambda: model.vision_backbone.featurizer(dino_px))
    siglip = timed("siglip", lambda: model.vision_backbone.fused_featurizer(siglip_px))
    patches = timed("projector", lambda: model.projector(torch.cat([dino, siglip], dim=2)))
    embeds = model.multimodal_embeddings(input_ids, patches)
    cache = model.new_kv_cache()
    out = timed("llm_prefill", lambda: model.language_model(inputs_embeds=embeds, cache=cache, logits_to_keep=1))
    timed("llm_decode", lambda: model.decode_actions(out.logits[:, -1], cache))
    return ms


def time_method(policy: CachedPolicy, image: np.ndarray, instruction: str) -> dict[str, float]:
    """One engine step on an episode's first frame; returns its stage clock's milliseconds per stage."""
    policy.reset()
    policy.step(image, instruction)
    return dict(policy.records[-1].latency_ms)


def main(argv: list[str] | None = None) -> dict[str, dict[str, list[dict[str, float]]]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", action="append", help="preset(s) to time (default: tiny and small)")
    parser.add_argument("--methods", nargs="*", default=["vanilla"], choices=list(METHODS),
                        help="engine methods timed next to the reference (default: vanilla)")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=list(DTYPES))
    args = parser.parse_args(argv)
    image, instruction, _ = shipped_frame()  # first frame of the first shipped LIBERO episode
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.device} {args.dtype}; "
          f"frame {image.shape}, instruction {instruction!r}")
    results = {}
    for preset in args.preset or ["tiny", "small"]:
        base = CachedPolicy.from_preset(preset, config=CacheConfig("vanilla"))
        place_model(base.model, args.device, DTYPES[args.dtype])
        seq_len = base.processor.encode_prompt(instruction).shape[1] + get_preset(preset).num_patches
        flops = vanilla_stage_flops(get_preset(preset), seq_len)
        timers = {REFERENCE: lambda: time_reference(base, image, instruction)}
        for method in args.methods:
            policy = base.with_config(CacheConfig(method))
            timers[method] = lambda policy=policy: time_method(policy, image, instruction)
        runs = {name: [run() for _ in range(args.warmup + args.repeats)][args.warmup:] for name, run in timers.items()}
        results[preset] = runs
        print(f"\npreset {preset}: sequence {seq_len} tokens, medians of {args.repeats} repeats (ms)")
        print(f"| stage | GFLOP | {' | '.join(runs)} | reference GFLOP/s |")
        print("|---|---|" + "---|" * len(runs) + "---|")
        for stage in STAGES:
            cells = [statistics.median(r.get(stage, np.nan) for r in rs) for rs in runs.values()]
            gflop = flops.get(stage, 0) / 1e9
            rate = f"{flops[stage] / 1e6 / cells[0]:.1f}" if stage in flops else "-"
            print(f"| {stage} | {gflop:.3f} | " + " | ".join("-" if np.isnan(c) else f"{c:.2f}" for c in cells) + f" | {rate} |")
        totals = [statistics.median(sum(r.values()) for r in rs) for rs in runs.values()]
        print(f"| total | {sum(flops.values()) / 1e9:.3f} | " + " | ".join(f"{t:.2f}" for t in totals) + " | |")
    return results


if __name__ == "__main__":
    main()
