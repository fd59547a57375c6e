"""Measured speedup of each caching method against vanilla, next to its FLOPs ideal, on shipped LIBERO frames.

Every method streams the same frames of the same episodes in one process. For each frame the methods run one
after another, in an order that rotates from frame to frame, so machine noise falls on all of them alike
(`dcvla.timing.interleave`, the loop the studies' timing units run; every method first steps two frames untimed).
Per method it reports:
- reuse: the share of vision tokens whose LLM K/V came from the cache (averaged over layers and frames), and the
  share of ViT patches reused per tower (DINOv2 / SigLIP: TTF's own mask per tower; the K/V cache's unified mask);
- FLOPs ratio: vanilla FLOPs / method FLOPs over the same frames (the ideal speedup), end to end and LLM only;
- measured ratio: median vanilla latency / median method latency, end to end and LLM only (prefill + decode),
  and the ratio of total times over the same frames (comparable to the FLOPs ratio, which is also a total:
  with keyframes the per-frame latency of a cache is bimodal, so a median alone can mislead);
- the total-time ratio as a fraction of the ideal, and the paired estimate: per frame, (vanilla time / method
  time) / (vanilla FLOPs / method FLOPs), median over frames. Methods interleave per frame, so a frame's pair ran
  under the same machine load; this is the number least disturbed by other work on a shared machine.

On a GPU (`--device cuda --dtype bfloat16`) every step is timed between two device synchronisations, as the
policy's stage clock times each stage.

OpenVLA-OFT presets (`--preset oft-small`, `oft-tiny`, `openvla-oft-7b`) run `OFTCachedPolicy`: one bidirectional
pass and the L1 head instead of prefill + decode, so its LLM is the prefill alone and its last stage is `head`. The
agent view stands in for the wrist view of an episode recorded without one (said per episode), and the state is
the episode's eef_pos + axis-angle + gripper qpos.

    python benchmarks/cache_speedup.py --preset small --frames 9
    python benchmarks/cache_speedup.py --preset openvla-7b --device cuda --dtype bfloat16 --frames 9
    python benchmarks/cache_speedup.py --preset oft-small --frames 6 --suites libero_spatial
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _setup import DTYPES, OFT_NOTE, base_policy, has_wrist, is_oft, place_model, step_inputs  # noqa: E402

from dcvla.libero.episodes import list_episodes, load_episode  # noqa: E402
from dcvla.openvla import CacheConfig  # noqa: E402
from dcvla.timing import interleave, warm_up  # noqa: E402

DEFAULT_METHODS = ("vanilla", "vla_cache", "ttf", "ttf_vla_cache", "dual_cache")
VISION_STAGES = ("select", "dino", "siglip", "projector")


def stage_groups(oft: bool) -> dict[str, tuple[str, ...]]:
    """Stage groups reported separately. OpenVLA: decode is memory-bound and the same for every method; its LLM is
    prefill + decode. OpenVLA-OFT: one pass, then the head; its LLM is that pass."""
    last = "head" if oft else "llm_decode"
    llm = ("llm_prefill",) if oft else ("llm_prefill", "llm_decode")
    return {"vision": VISION_STAGES, "llm_prefill": ("llm_prefill",), last: (last,), "llm": llm}


def run(preset: str, methods: list[str], frames_per_episode: int, suites: list[str] | None, device: str = "cpu",
        dtype: torch.dtype = torch.float32, max_episodes: int | None = None) -> dict:
    base = base_policy(preset)
    place_model(base.model, device, dtype)
    groups = stage_groups(is_oft(preset))
    policies = {m: base.with_config(CacheConfig(method=m)) for m in methods}
    stats: dict[str, dict[str, list]] = {m: defaultdict(list) for m in methods}
    episodes = [p for p in list_episodes() if suites is None or any(p.name.startswith(s + "_task") for s in suites)]
    episodes = episodes[:max_episodes]
    turn = 0
    for path in episodes:
        episode = load_episode(path)
        frames = step_inputs(base, episode, frames_per_episode)
        if turn == 0:
            warm_up(policies, frames)
        for _, method, _, ms in interleave(policies, frames, device, first_turn=turn):
            policy = policies[method]
            record, s = policy.records[-1], stats[method]
            s["ms"].append(ms)
            s["llm_ms"].append(sum(record.latency_ms[k] for k in groups["llm"]))
            s["flops"].append(sum(record.flops.values()))
            s["llm_flops"].append(sum(record.flops[k] for k in groups["llm"]))
            s["llm_reuse"].append(record.llm_reuse.float().mean().item())
            for group, stages in groups.items():
                s[f"{group}_ms"].append(sum(record.latency_ms.get(k, 0.0) for k in stages))
                s[f"{group}_flops"].append(sum(record.flops.get(k, 0) for k in stages))
            s["vit_reuse"].append(vit_reuse(policy, record))
        turn += len(frames)
        wrist = "" if not is_oft(preset) else ", wrist view recorded" if has_wrist(episode) else ", agent view as wrist view"
        print(f"  {episode.name}: {len(frames)} frames x {len(methods)} methods{wrist}", flush=True)
    return stats


def vit_reuse(policy, record) -> tuple[float, float]:
    """Share of patches each tower (DINOv2, SigLIP) took from its cache: TTF's own mask per tower, the K/V cache's
    one unified mask for both."""
    if policy.method.vit == "ttf" and record.selection is not None:
        return tuple(record.selection.tower_reuse.float().mean(1).tolist())
    if policy.method.vit == "kv" and record.selection is not None:
        return (record.selection.reuse.float().mean().item(),) * 2
    return 0.0, 0.0


def summarise(stats: dict, groups: dict[str, tuple[str, ...]]) -> list[dict]:
    ref = stats["vanilla"]
    rows = []
    for method, s in stats.items():
        flops_ratio = sum(ref["flops"]) / sum(s["flops"])
        llm_flops_ratio = sum(ref["llm_flops"]) / sum(s["llm_flops"])
        median_ratio = statistics.median(ref["ms"]) / statistics.median(s["ms"])
        paired = statistics.median((tv / tm) / (fv / fm) for tv, tm, fv, fm in zip(ref["ms"], s["ms"], ref["flops"], s["flops"]))
        measured = sum(ref["ms"]) / sum(s["ms"])
        llm_measured = sum(ref["llm_ms"]) / sum(s["llm_ms"])
        rows.append(dict(
            method=method, llm_reuse=statistics.mean(s["llm_reuse"]), vit_reuse=tuple(map(statistics.mean, zip(*s["vit_reuse"]))),
            median_ratio=median_ratio, paired=paired,
            flops_ratio=flops_ratio, measured=measured, of_ideal=measured / flops_ratio,
            llm_flops_ratio=llm_flops_ratio, llm_measured=llm_measured, llm_of_ideal=llm_measured / llm_flops_ratio,
            median_ms=statistics.median(s["ms"]), llm_median_ms=statistics.median(s["llm_ms"]),
            gflops=statistics.mean(s["flops"]) / 1e9,
            groups={g: (sum(ref[f"{g}_flops"]) / sum(s[f"{g}_flops"]),
                        sum(ref[f"{g}_ms"]) / sum(s[f"{g}_ms"]),
                        statistics.median(s[f"{g}_ms"]), statistics.mean(s[f"{g}_flops"]) / 1e9) for g in groups},
        ))
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small")
    parser.add_argument("--frames", type=int, default=9, help="frames per shipped episode (from its start)")
    parser.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS))
    parser.add_argument("--suites", nargs="+", help="limit to these suites (default: every shipped episode)")
    parser.add_argument("--episodes", type=int, help="at most this many of the chosen episodes (default: all)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=list(DTYPES))
    args = parser.parse_args(argv)
    methods = ["vanilla"] + [m for m in args.methods if m != "vanilla"]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, preset {args.preset}, {args.device} "
          f"{args.dtype}, {args.frames} frames per episode, methods interleaved per frame")
    if is_oft(args.preset):
        print(OFT_NOTE)
    groups = stage_groups(is_oft(args.preset))
    stats = run(args.preset, methods, args.frames, args.suites, args.device, DTYPES[args.dtype], args.episodes)
    rows = summarise(stats, groups)
    print("\n| method | LLM reuse | ViT reuse (DINOv2 / SigLIP) | GFLOP/frame | median ms | FLOPs ratio | measured (total) | of ideal "
          "| measured (median) | of ideal (paired) | LLM median ms | LLM FLOPs ratio | LLM measured (total) | LLM of ideal |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {r['llm_reuse']:.1%} | {r['vit_reuse'][0]:.1%} / {r['vit_reuse'][1]:.1%} | {r['gflops']:.1f} | {r['median_ms']:.0f} "
              f"| {r['flops_ratio']:.2f}x | {r['measured']:.2f}x | {r['of_ideal']:.2f} | {r['median_ratio']:.2f}x | {r['paired']:.2f} "
              f"| {r['llm_median_ms']:.0f} "
              f"| {r['llm_flops_ratio']:.2f}x | {r['llm_measured']:.2f}x | {r['llm_of_ideal']:.2f} |")
    print("\nPer stage group (FLOPs ratio / measured total-time ratio / of ideal; median ms, mean GFLOP per frame):")
    print("| method | " + " | ".join(groups) + " |\n|---|" + "---|" * len(groups))
    for r in rows:
        cells = [f"{f:.2f}x / {m:.2f}x / {m / f:.2f} ({ms:.0f} ms, {gf:.1f} GF)" for f, m, ms, gf in r["groups"].values()]
        print(f"| {r['method']} | " + " | ".join(cells) + " |")
    return rows


if __name__ == "__main__":
    main()
