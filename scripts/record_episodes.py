"""Record scripted (oracle) LIBERO episodes to data/episodes/, rendering on the CPU.

Examples:
    MUJOCO_GL=egl .venv/bin/python scripts/record_episodes.py --suite libero_spatial --tasks 0 1 --out data/episodes
    MUJOCO_GL=egl .venv/bin/python scripts/record_episodes.py --shipped          # the set shipped in the repo
    MUJOCO_GL=egl .venv/bin/python scripts/record_episodes.py --suite libero_object --tasks 0 --inits 0 1 2

Each episode holds the agent view and the wrist camera (OpenVLA-OFT's second image), both as the pipeline's
JPEG bytes, and the robot state. Each episode is written atomically to <out>/<suite>_task<NN>_init<NN>.npz; existing files are skipped
unless --overwrite. An episode in which the oracle fails is still written (meta success=False) unless
--only-success, so the frames of near-misses stay usable.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("MUJOCO_GL", "egl")

from dcvla.libero.env import SUITES, close_env, get_task, make_env  # noqa: E402
from dcvla.libero.episodes import CAMERAS, DEFAULT_DIR, SHIPPED, episode_path, record_episode, save_episode  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--suite", choices=SUITES, help="suite to record from")
    ap.add_argument("--tasks", nargs="+", default=["0"], help="task ids or names (default: 0)")
    ap.add_argument("--inits", nargs="+", type=int, default=[0], help="init state indices (default: 0)")
    ap.add_argument("--shipped", action="store_true", help="record the default shipped set (ignores --suite/--tasks)")
    ap.add_argument("--out", type=Path, default=DEFAULT_DIR, help=f"output directory (default: {DEFAULT_DIR})")
    ap.add_argument("--max-steps", type=int, default=None, help="oracle step budget (default: the suite's protocol max)")
    ap.add_argument("--overwrite", action="store_true", help="re-record episodes that already exist")
    ap.add_argument("--only-success", action="store_true", help="do not write episodes where the oracle failed")
    args = ap.parse_args(argv)

    if args.shipped:
        jobs = [(s, t, i) for s, entries in SHIPPED.items() for t, i in entries]
    elif args.suite:
        jobs = [(args.suite, get_task(args.suite, t).task_id, i) for t in args.tasks for i in args.inits]
    else:
        ap.error("give --suite (with --tasks/--inits) or --shipped")

    n_ok = n_done = 0
    for suite, task, init in jobs:
        path = episode_path(args.out, suite, task, init)
        if path.exists() and not args.overwrite:
            print(f"skip {path} (exists)", flush=True)
            continue
        t0 = time.perf_counter()
        env = make_env(suite, task, cameras=CAMERAS)  # the agent view and the wrist camera
        try:
            ep = record_episode(suite, task, init, max_steps=args.max_steps, env=env)
        finally:
            close_env(env)
        m = ep.meta
        n_ok, n_done = n_ok + m["success"], n_done + 1
        if m["success"] or not args.only_success:
            save_episode(ep, path)
        size = path.stat().st_size / 1e6 if path.exists() else 0.0
        print(f"{suite} task {task} init {init}: success={m['success']} steps={m['n_steps']} "
              f"render={m['render_ms']:.0f} ms/step step={m['step_ms']:.0f} ms/step size={size:.2f} MB "
              f"wall={time.perf_counter() - t0:.0f} s -> {path}", flush=True)
    print(f"{n_ok}/{n_done} recorded episodes succeeded ({len(jobs) - n_done} skipped as existing)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
