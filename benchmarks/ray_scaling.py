"""Units per minute of a closed-loop LIBERO evaluation (libero_benchmark's units: a method's trials on a task) in
process and on a local Ray cluster with 1 and 2 workers, and the time split of one LIBERO step into simulation,
rendering and the policy.

Every runner gets the same units in a fresh folder; the wall time includes what each pays once (Ray's start, each
actor's imports and policy load, each task's simulator). On a machine of C cores the Ray workers share them with
the driver, so the scaling is bounded by the cores, not by Ray: with simulation and rendering on the CPU and the
policy on a GPU, one worker per GPU scales as long as each has the CPU for its simulator.

    python benchmarks/ray_scaling.py --preset small --tasks 4 --max-steps 20
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dcvla import units as U  # noqa: E402
from dcvla.studies import libero_benchmark  # noqa: E402


def plan(runs_dir: str, preset: str, tasks: int, max_steps: int, methods: list[str]):
    return libero_benchmark.plan({"preset": preset, "methods": methods, "suites": ["libero_spatial"],
                                  "tasks": list(range(tasks)), "trials": 1, "max_steps": max_steps,
                                  "runs_dir": runs_dir})


def timed_run(runner: U.Runner, args) -> tuple[int, float]:
    with tempfile.TemporaryDirectory(prefix="dcvla-scaling-") as tmp:
        todo, factory = plan(tmp, args.preset, args.tasks, args.max_steps, args.methods)
        start = time.perf_counter()
        U.run_units(todo, factory, runner, progress=False)
        wall = time.perf_counter() - start
        assert all(u.complete() for u in todo)
    return len(todo), wall


def step_split(preset: str, steps: int) -> dict[str, float]:
    """Median ms of one env step with the agent view rendered, of one without any camera (the physics), and of
    one policy step on the rendered frame (vanilla, the preset's random weights)."""
    from dcvla.libero import protocol
    from dcvla.libero.env import close_env, make_env
    from dcvla.studies.common import PolicyParameters, base_policy

    out = {}
    for name, render in (("step with rendering", True), ("physics only", False)):
        env = make_env("libero_spatial", 0, render=render)
        env.reset()
        ms = []
        for _ in range(steps):
            t = time.perf_counter()
            obs, _, _, _ = env.step(list(protocol.DUMMY_ACTION))
            ms.append(1000 * (time.perf_counter() - t))
        out[name] = statistics.median(ms)
        if render:
            frame = obs["agentview_image"]
        close_env(env)
    policy = base_policy(PolicyParameters(preset=preset))
    image = protocol.policy_input(protocol.process_frame(frame))  # as the closed loop feeds it
    policy.reset()
    ms = []
    for _ in range(steps):
        t = time.perf_counter()
        policy.step(image, "pick up the black bowl")
        ms.append(1000 * (time.perf_counter() - t))
    out["policy step"] = statistics.median(ms)
    out["rendering"] = out["step with rendering"] - out["physics only"]
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small")
    parser.add_argument("--tasks", type=int, default=4, help="libero_spatial tasks 0..N-1 (one unit per method each)")
    parser.add_argument("--max-steps", type=int, default=20, help="policy steps per trial")
    parser.add_argument("--methods", nargs="+", default=["vanilla", "dual_cache"])
    parser.add_argument("--workers", nargs="*", type=int, default=[1, 2], help="Ray worker counts to time (none: skip Ray)")
    parser.add_argument("--split-steps", type=int, default=20, help="steps timed for the step split (0: skip)")
    args = parser.parse_args(argv)
    os.environ.setdefault("MUJOCO_GL", "egl")
    print(f"{os.cpu_count()} cores, preset {args.preset}, {len(args.methods)} methods x {args.tasks} tasks x 1 trial, "
          f"{args.max_steps} steps per trial")
    rows = {}
    n, wall = timed_run(U.Runner(), args)
    rows["in process"] = (1, n, wall)
    for workers in args.workers:
        import ray

        ray.init(num_cpus=max(args.workers), include_dashboard=False, log_to_driver=False)
        try:
            n, wall = timed_run(U.Runner(ray="local", num_workers=workers), args)
        finally:
            ray.shutdown()
        rows[f"Ray, {workers} worker{'s' if workers > 1 else ''}"] = (workers, n, wall)
    base = rows["in process"][2]
    print("\n| runner | workers | units | wall s | units / min | vs in process |\n|---|---|---|---|---|---|")
    for name, (workers, n, wall) in rows.items():
        print(f"| {name} | {workers} | {n} | {wall:.1f} | {60 * n / wall:.2f} | {base / wall:.2f}x |")
    split = step_split(args.preset, args.split_steps) if args.split_steps else {}
    if split:
        print("\n| one LIBERO step | median ms |\n|---|---|")
        for name in ("physics only", "rendering", "policy step"):
            print(f"| {name} | {split[name]:.1f} |")
    return {"rows": rows, "split": split}


if __name__ == "__main__":
    main()
