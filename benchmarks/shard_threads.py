"""What a shard's torch thread count does when shards share a machine's cores.

A closed-loop grid run as `dcvla run libero_benchmark --shard I/N` in N background processes on one machine: by
default each process's torch takes every core, so N shards on N cores run N x N compute threads, beside one
llvmpipe render thread each. This script runs the same small grid (one trial per shard, a fixed step budget short
of success so every trial does the same number of steps) in N concurrent shards, alternating A B A B: A with
`--threads T` (default 1: cores / shards on the 2-core machine), B with torch's default. Each round starts from an
empty runs folder. Per arm: the trials' wall seconds (read from their result files: the closed loop alone, without
process start-up and model load) and the wall of the whole round (the slowest shard); the speedup is B/A pair by
pair (median). Both arms do the same work (a FLOPs ratio of 1): what differs is how the compute threads share the
cores. The script fails unless every trial of A recorded T threads (`torch_threads` in its result file).

    MUJOCO_GL=egl .venv/bin/python benchmarks/shard_threads.py --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def grid(runs_dir: Path, preset: str, suite: str, task: int, shards: int, max_steps: int) -> list[str]:
    """The -p pairs of a libero_benchmark grid of `shards` units of one vanilla trial each."""
    params = {"preset": preset, "suites": [suite], "tasks": [task], "trials": shards, "seeds": [0],
              "max_steps": max_steps, "methods": ["vanilla"], "trials_per_unit": 1, "runs_dir": str(runs_dir),
              "figures_dir": str(runs_dir / "figures")}
    return [x for name, value in params.items() for x in ("-p", name, json.dumps(value))]


def round_of(threads: int, args: argparse.Namespace) -> tuple[float, list[float], list[int]]:
    """One round: the shards run at once; (the round's wall seconds, each trial's wall seconds, each trial's torch
    threads)."""
    from dcvla.io import read_dataset

    with tempfile.TemporaryDirectory(prefix="shard_threads.") as tmp:
        runs = Path(tmp) / "runs"
        base = [sys.executable, "-m", "dcvla", "run", "libero_benchmark",
                *grid(runs, args.preset, args.suite, args.task, args.shards, args.max_steps)]
        extra = ["--threads", str(threads)] if threads else []
        t0 = time.perf_counter()
        procs = [subprocess.Popen([*base, "--shard", f"{i}/{args.shards}", *extra], cwd=ROOT,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
                 for i in range(args.shards)]
        errors = [p.communicate()[1] for p in procs]
        wall = time.perf_counter() - t0
        failed = [(p.args, e[-2000:]) for p, e in zip(procs, errors) if p.returncode]
        if failed:
            raise RuntimeError(f"a shard failed: {failed[0]}")
        files = [read_dataset(f) for f in sorted(runs.rglob("*.nc"))]
        trials = [float(w) for ds in files for w in ds.wall_s.values.ravel()]
        used = [int(n) for ds in files for n in ds.torch_threads.values.ravel()]
    if len(trials) != args.shards:
        raise RuntimeError(f"expected {args.shards} trials, the result files hold {len(trials)}")
    if threads and set(used) != {threads}:
        raise RuntimeError(f"--threads {threads}: the trials ran on {used} threads")
    return wall, trials, used


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="oft-micro-10", help="a shipped micro policy (default oft-micro-10)")
    ap.add_argument("--suite", default="libero_10")
    ap.add_argument("--task", type=int, default=4)
    ap.add_argument("--shards", type=int, default=os.cpu_count() or 2, help="concurrent shards (default: the cores)")
    ap.add_argument("--threads", type=int, default=1, help="arm A's --threads (default 1)")
    ap.add_argument("--max-steps", type=int, default=120, help="every trial's steps (default 120: none succeeds)")
    ap.add_argument("--repeats", type=int, default=3, help="A B rounds (default 3)")
    args = ap.parse_args(argv)
    if min(args.shards, args.threads, args.max_steps, args.repeats) < 1:
        ap.error("--shards, --threads, --max-steps and --repeats must be at least 1")
    rows: dict[str, list] = {"A": [], "B": []}
    for r in range(args.repeats):
        for arm, threads in (("A", args.threads), ("B", 0)):
            wall, trials, used = round_of(threads, args)
            rows[arm].append((wall, statistics.median(trials), used))
            print(f"round {r} {arm} ({'--threads ' + str(threads) if threads else 'torch default'}): round "
                  f"{wall:.1f} s, trial walls {', '.join(f'{t:.1f}' for t in trials)} s", flush=True)
    for i, what in enumerate(("round wall", "trial wall (median per round)")):
        a, b = ([row[i] for row in rows[arm]] for arm in "AB")
        ratios = sorted(y / x for x, y in zip(a, b))
        print(f"{what}: A median {statistics.median(a):.1f} s, B median {statistics.median(b):.1f} s; speedup B/A "
              f"median {statistics.median(ratios):.2f} ({ratios[0]:.2f}-{ratios[-1]:.2f})")
    print(f"{args.shards} shards, {args.max_steps} steps a trial, {args.preset} on {args.suite} task {args.task}; "
          f"torch default threads here: {torch_default()}")
    return rows


def torch_default() -> int:
    import torch

    return torch.get_num_threads()


if __name__ == "__main__":
    main()
