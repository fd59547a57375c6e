"""Record the demonstrations the micro policies train on: the scripted oracle on each task of `DEMO_TASKS` (the first
shipped task of libero_spatial, libero_object, libero_goal and libero_10), from initial states the simulator samples
itself (`sample_init_state`: the task's placement initializer under a seed), never the benchmark's fixed init states
that the evaluation uses. The executed translation is perturbed (DART, `--noise`) while the oracle's own actions are
recorded, so the demonstrations show the way back to the oracle's path. Each demonstration is an episode (agent
view, wrist view, state, the oracle's actions) at <out>/<suite>_task<NN>_seed<NNNN>.npz, written atomically.

    MUJOCO_GL=egl .venv/bin/python scripts/record_demos.py                 # 50 per task, 2 processes
    MUJOCO_GL=egl .venv/bin/python scripts/record_demos.py --per-task 5 --suites libero_spatial
    MUJOCO_GL=egl .venv/bin/python scripts/record_demos.py --suites libero_object --finish --out data/demos-object2

Demonstration k of a task (k < --per-task) tries placement seeds k, k + per_task, k + 2 * per_task, ... until the
oracle succeeds (at most --tries); a failed seed leaves <name>.failed (its steps), so a rerun resumes where the last
one stopped and never retries it. Only successful rollouts are kept.

By default an episode ends 5 steps after the env first reports success. On libero_object's basket tasks that comes
while the can is still held (it enters the basket's region as it is carried or lowered), so a policy learns to stop
there, holding it; --finish lets the oracle lower, release and retreat first, and keeps the episode only if the
goal still holds at its end. --lower-speed sets `Oracle.lower_speed`: the oracle lowers the carried object no slower
than that until it rests on the target, instead of slowing proportionally over the last centimetres;
--approach-speed sets `Oracle.approach_speed`: the hand goes on from the approach into the descent and the grasp
without stopping; --carry-tolerance sets `Oracle.carry_tolerance`: how near (m) the carried object must come to the
point above its target before the lower phase starts (the default 0.01 lets the hand hover there under the noise).

A folder holds one recipe: a rerun whose --noise, --finish or oracle options differ from the demonstrations already
there stops, naming the file.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("MUJOCO_GL", "egl")

from dcvla.io import atomic_path  # noqa: E402
from dcvla.libero.episodes import (  # noqa: E402
    CAMERAS, DEMO_DIR, DEMO_NOISE, DEMO_TASKS, demo_path, load_episode, record_episode, save_episode)
from dcvla.libero.oracle import Oracle  # noqa: E402


def slot_seeds(k: int, per_task: int, tries: int) -> list[int]:
    return [k + i * per_task for i in range(tries)]


def slot_done(out: Path, suite: str, task: int, seeds: list[int]) -> bool:
    """Whether demonstration slot `seeds` is settled: one seed succeeded, or every seed failed."""
    paths = [demo_path(out, suite, task, s) for s in seeds]
    return any(p.exists() for p in paths) or all(p.with_suffix(".failed").exists() for p in paths)


def check_recipe(out: Path, suite: str, task: int, recipe: dict) -> None:
    """Raise SystemExit naming the file when a demonstration already in `out` was recorded with another recipe
    (`action_noise`, `finish` and the oracle's options; a file from before an option existed recorded its default,
    0 for a speed)."""
    path = next(iter(sorted(out.glob(f"{suite}_task{task:02d}_seed*.npz"))), None)  # demo_path's names
    if path is None:
        return
    meta = load_episode(path).meta  # a damaged file is named by the loader
    defaults = {"action_noise": 0.0, "finish": 0.0, **Oracle().options()}
    have = {k: float(meta.get(k, defaults[k])) for k in recipe}
    if have != recipe:
        raise SystemExit(f"{path} was recorded with {have}, this run asks for {recipe}: use another --out")


def orphaned(parent: int) -> bool:
    """Whether the process that started this worker is gone (killed: a pool's workers outlive a killed parent)."""
    return os.getppid() != parent


def record_slots(job: tuple[str, int, list[int], Path, int, int, float, bool, dict, int]
                 ) -> tuple[str, int, int, int, float]:
    """One process's share of a task's slots: (suite, task, slot indices, out, per_task, tries, noise, finish,
    the oracle's options (`Oracle` keyword arguments), parent pid).
    Builds the env once; stops before the next demonstration once the parent is gone.
    Returns (suite, task, demonstrations written, failed seeds, seconds)."""
    from dcvla.libero.env import close_env, make_env
    from dcvla.libero import protocol

    suite, task, slots, out, per_task, tries, noise, finish, options, parent = job
    todo = [k for k in slots if not slot_done(out, suite, task, slot_seeds(k, per_task, tries))]
    written = failed = 0
    t0 = time.perf_counter()
    if not todo:
        return suite, task, 0, 0, 0.0
    env = make_env(suite, task, resolution=protocol.RENDER_RESOLUTION, seed=protocol.ENV_SEED, cameras=CAMERAS)
    try:
        for k in todo:
            for seed in slot_seeds(k, per_task, tries):
                path = demo_path(out, suite, task, seed)
                if orphaned(parent):
                    return suite, task, written, failed, time.perf_counter() - t0
                if path.with_suffix(".failed").exists():
                    continue
                t = time.perf_counter()
                ep = record_episode(suite, task, env=env, placement_seed=seed, action_noise=noise, finish=finish,
                                    oracle=Oracle(**options))
                if ep.meta["success"]:
                    save_episode(ep, path)
                    written += 1
                else:
                    with atomic_path(path.with_suffix(".failed")) as tmp:
                        tmp.write_text(f"the oracle did not succeed in {ep.meta['n_steps']} steps\n")
                    failed += 1
                print(f"{ep.name}: success={ep.meta['success']} steps={ep.meta['n_steps']} "
                      f"{time.perf_counter() - t:.0f} s", flush=True)
                if ep.meta["success"]:
                    break
    finally:
        close_env(env)
    return suite, task, written, failed, time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--suites", nargs="+", default=list(DEMO_TASKS), choices=list(DEMO_TASKS))
    ap.add_argument("--per-task", type=int, default=50, help="successful demonstrations per task (default 50)")
    ap.add_argument("--tries", type=int, default=3, help="placement seeds tried per demonstration (default 3)")
    ap.add_argument("--workers", type=int, default=2, help="processes (each renders on one core; default 2)")
    ap.add_argument("--noise", type=float, default=DEMO_NOISE,
                    help=f"DART perturbation of the executed translation, action units (default {DEMO_NOISE}; 0: none)")
    ap.add_argument("--finish", action="store_true",
                    help="after success the oracle lowers, releases and retreats before the episode ends")
    ap.add_argument("--lower-speed", type=float, default=0.0,
                    help="the oracle lowers objects no slower than this, z action units (default 0: proportional)")
    ap.add_argument("--approach-speed", type=float, default=0.0,
                    help="the oracle approaches and descends to a grasp no slower than this, action units (default 0)")
    ap.add_argument("--carry-tolerance", type=float, default=Oracle.carry_tolerance,
                    help="metres (xy) the carried object must come to above its target before it is lowered "
                         f"(default {Oracle.carry_tolerance})")
    ap.add_argument("--out", type=Path, default=DEMO_DIR, help=f"output directory (default {DEMO_DIR})")
    args = ap.parse_args(argv)
    if args.per_task < 1 or args.tries < 1 or args.workers < 1:
        ap.error("--per-task, --tries and --workers must be at least 1")
    options = dict(lower_speed=args.lower_speed, approach_speed=args.approach_speed)
    for name, value in options.items():
        if not 0 <= value <= 1:
            ap.error(f"--{name.replace('_', '-')} is in action units, 0 to 1; got {value}")
    if not 0 < args.carry_tolerance <= 0.1:
        ap.error(f"--carry-tolerance is in metres, above 0 and at most 0.1; got {args.carry_tolerance}")
    options["carry_tolerance"] = args.carry_tolerance
    args.out.mkdir(parents=True, exist_ok=True)
    recipe = dict(action_noise=args.noise, finish=float(args.finish), **options)
    for suite in args.suites:
        check_recipe(args.out, suite, DEMO_TASKS[suite], recipe)
    jobs = [(suite, DEMO_TASKS[suite], list(range(w, args.per_task, args.workers)), args.out, args.per_task, args.tries,
             args.noise, args.finish, options, os.getpid()) for suite in args.suites for w in range(args.workers) if w < args.per_task]
    t0 = time.perf_counter()
    with mp.get_context("spawn").Pool(args.workers) as pool:
        results = pool.map(record_slots, jobs, chunksize=1)
    for suite in args.suites:
        task = DEMO_TASKS[suite]
        have = sum(demo_path(args.out, suite, task, s).exists()
                   for k in range(args.per_task) for s in slot_seeds(k, args.per_task, args.tries))
        new = sum(r[2] for r in results if r[0] == suite)
        failed = sum(r[3] for r in results if r[0] == suite)
        print(f"{suite} task {task}: {have}/{args.per_task} demonstrations ({new} new, {failed} failed seeds this run)")
    print(f"done in {time.perf_counter() - t0:.0f} s with {args.workers} processes -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
