"""Measured speedup of each pi0 / pi0.5 / SmolVLA reuse mode against no reuse, next to its FLOPs ideal, on shipped LIBERO
frames (agent and wrist views) and robot states (one inference every `--replan-steps` frames, as openpi's LIBERO
client). `--gate` picks the gate for every mode ("" = each mode's own).

Every mode streams the same inferences in one process; for each inference the modes run one after another in an
order that rotates from inference to inference, so machine noise falls on all of them alike
(`dcvla.timing.interleave`, the loop the stability_cliff study's timing units run; every mode first steps two
inferences untimed). Per mode: the share of inferences whose gate opened, the FLOPs ratio (no-reuse FLOPs / mode
FLOPs, the ideal), the measured ratio of total times, Hz (inferences per second, median latency), the paired
estimate (per inference, measured ratio / FLOPs ratio, median over the inferences that reused) and the per-stage
times.

On a GPU (`--device cuda --dtype bfloat16`) every inference is timed between two device synchronisations.

    python benchmarks/pi0_reuse_speedup.py --preset pi0-small --threshold 0.985 --steps 8
    python benchmarks/pi0_reuse_speedup.py --preset pi05-small --threshold 0.985 --steps 8
    python benchmarks/pi0_reuse_speedup.py --preset smolvla-small --threshold 0.985 --steps 8

No reuse ("none") is each model's own inference: the prefix computed once and read by every Euler step (for SmolVLA,
lerobot's within-call prefix cache), the baseline of every ratio.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _setup import DTYPES, place_model  # noqa: E402

from dcvla.libero.episodes import list_episodes, load_episode  # noqa: E402
from dcvla.flow_record import FLOW_STAGES  # noqa: E402
from dcvla.prefix_reuse import MODES, ReuseConfig  # noqa: E402
from dcvla.streaming import step_args  # noqa: E402
from dcvla.timing import interleave, warm_up  # noqa: E402
from dcvla.studies.stability_cliff import FLOW_PRESETS, pi0_episode_inputs  # noqa: E402


def run(preset: str, modes: list[str], threshold: float, steps: int, replan_steps: int, device: str = "cpu",
        dtype: torch.dtype = torch.float32, max_episodes: int | None = None, gate: str = "") -> dict:
    if preset not in FLOW_PRESETS:
        raise SystemExit(f"unknown preset {preset!r}; known: {', '.join(FLOW_PRESETS)}")
    base = FLOW_PRESETS[preset].from_preset(preset, seed=0, config=ReuseConfig(mode="none"))
    place_model(base.model, device, dtype)
    policies = {m: base.with_config(ReuseConfig(mode=m, gate=gate if m != "none" else "", threshold=threshold,
                                                replan_steps=replan_steps)) for m in modes}
    stats: dict[str, dict[str, list]] = {m: defaultdict(list) for m in modes}
    turn = 0
    for path in list_episodes()[:max_episodes]:
        episode = load_episode(path)
        frames, states = pi0_episode_inputs(episode, steps, replan_steps)
        inputs = step_args(base, frames, episode.instruction, states)
        if turn == 0:
            warm_up(policies, inputs)
        for _, mode, _, ms in interleave(policies, inputs, device, first_turn=turn):
            s, record = stats[mode], policies[mode].last
            s["ms"].append(ms)
            s["flops"].append(sum(record.flops.values()))
            s["reused"].append(record.gate)
            for stage in FLOW_STAGES:
                s[f"{stage}_ms"].append(record.latency_ms[stage])
        turn += len(inputs)
        print(f"  {episode.name}: {len(frames)} inferences x {len(modes)} modes", flush=True)
    return stats


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="pi0-small")
    parser.add_argument("--threshold", type=float, default=0.985)
    parser.add_argument("--gate", default="", help="a gate of dcvla.prefix_reuse.GATES for every mode ('' = each mode's own)")
    parser.add_argument("--steps", type=int, default=8, help="inferences per shipped episode")
    parser.add_argument("--replan-steps", type=int, default=5)
    parser.add_argument("--modes", nargs="+", default=[m for m in MODES if m != "none"])
    parser.add_argument("--episodes", type=int, help="at most this many shipped episodes (default: all)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=list(DTYPES))
    args = parser.parse_args(argv)
    modes = ["none"] + [m for m in args.modes if m != "none"]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, preset {args.preset}, {args.device} {args.dtype}, "
          f"threshold {args.threshold}, {args.steps} inferences per episode every {args.replan_steps} frames, modes interleaved")
    stats = run(args.preset, modes, args.threshold, args.steps, args.replan_steps, args.device, DTYPES[args.dtype],
                args.episodes, args.gate)
    ref = stats["none"]
    print("\n| mode | reuse rate | GFLOP/inference | FLOPs ratio | measured (total) | of ideal | paired (reused) "
          "| median ms | Hz | " + " | ".join(f"{s} ms" for s in FLOW_STAGES) + " |")
    print("|---|---|---|---|---|---|---|---|---|" + "---|" * len(FLOW_STAGES))
    for mode, s in stats.items():
        flops_ratio = sum(ref["flops"]) / sum(s["flops"])
        measured = sum(ref["ms"]) / sum(s["ms"])
        reused = [(tr / tm) / (fr / fm) for tr, tm, fr, fm, g in zip(ref["ms"], s["ms"], ref["flops"], s["flops"], s["reused"]) if g]
        paired = f"{statistics.median(reused):.2f}" if reused else "-"
        median_ms = statistics.median(s["ms"])
        stages = " | ".join(f"{statistics.median(s[f'{stage}_ms']):.1f}" for stage in FLOW_STAGES)
        print(f"| {mode} | {statistics.mean(s['reused']):.1%} | {statistics.mean(s['flops']) / 1e9:.2f} | {flops_ratio:.2f}x "
              f"| {measured:.2f}x | {measured / flops_ratio:.2f} | {paired} | {median_ms:.0f} | {1e3 / median_ms:.1f} | {stages} |")
    return stats


if __name__ == "__main__":
    main()
