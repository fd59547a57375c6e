"""Closed-loop success of a micro policy without caching, on the official init states of its trained tasks: the
upstream protocol of its family (`dcvla.libero.evaluate`), one trial per job over --workers processes (each
renders on one core), each trial's result in its own file, so a rerun resumes trial by trial; then the success
per task with its Wilson 95% interval.

    MUJOCO_GL=egl .venv/bin/python scripts/eval_micro.py smolvla-micro                          # shipped, 4 tasks
    MUJOCO_GL=egl .venv/bin/python scripts/eval_micro.py smolvla-micro --suites libero_goal \\
        --checkpoint data/train/smolvla-micro/checkpoint --out data/eval/goal                  # a training run's

A trial's result depends on its init state and the evaluation seed only (`evaluate_task` reseeds every RNG before
each trial, and every trial resets the policy's noise generator), not on which process ran it or after which trial.
Each worker runs the policy on one thread beside its renders; torch's thread count changes the policy's float sums,
so a grid's shards on another count (`dcvla run --shard --threads`) play other trajectories of the same trials
(each result file records its `torch_threads`).
`--replan-steps N` executes N actions of each chunk before the next inference instead of the family's protocol
(OFT 8, SmolVLA 5); each result file records it, and a rerun into the same --out with another N is refused.
`--against DIR` pairs each task's trials with those of another --out (another checkpoint, --replan-steps or seed) on
the same init states and prints the exact McNemar test of the difference:

    MUJOCO_GL=egl .venv/bin/python scripts/eval_micro.py oft-micro --suites libero_10 \
        --checkpoint checkpoints/oft-micro-10 --replan-steps 4 --out results/replan/oft-micro-10-r4 \
        --against results/replan/oft-micro-10-r8
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
_WORKER: dict[str, Any] = {}  # per process: the policy, and the env of the task it last ran


def trial_path(out: Path, suite: str, task: int, trial: int) -> Path:
    return out / f"{suite}_task{task:02d}" / f"trial{trial:02d}.nc"


def run_job(job: tuple[str, str | None, str, int, int, Path, int, int | None, int | None, int]
            ) -> tuple[str, int, int, int, float]:
    """One trial: (preset, checkpoint, suite, task, trial, out, evaluation seed, step budget, actions executed per
    chunk, parent pid) ->
    (suite, task, trial, success, seconds); success -1 when the parent is gone and the trial was not run."""
    from dcvla.libero import protocol
    from dcvla.libero.env import close_env, make_env
    from dcvla.libero.evaluate import cameras_for, evaluate_task
    from dcvla.studies.micro import center_crop, load_micro

    preset, checkpoint, suite, task, trial, out, seed, max_steps, replan_steps, parent = job
    if os.getppid() != parent:  # a killed launch's pool worker: stop rather than run beside the next launch
        return suite, task, trial, -1, 0.0
    if "policy" not in _WORKER:
        import torch

        torch.set_num_threads(1)  # one core per worker: its renders and its policy take turns
        _WORKER["policy"] = load_micro(preset, checkpoint=checkpoint, replan_steps=replan_steps)
    policy = _WORKER["policy"]
    if _WORKER.get("task") != (suite, task):
        if "env" in _WORKER:
            close_env(_WORKER.pop("env"))
        _WORKER["env"] = make_env(suite, task, resolution=protocol.RENDER_RESOLUTION, seed=None,
                                  cameras=cameras_for(policy))
        _WORKER["task"] = (suite, task)
    t0 = time.perf_counter()
    ds = evaluate_task(policy, suite, task, out, trials=[trial], center_crop=center_crop(preset),
                       progress=False, env=_WORKER["env"], path=trial_path(out, suite, task, trial), seed=seed,
                       max_steps=max_steps)
    return suite, task, trial, int(ds.success.sel(trial=trial)), time.perf_counter() - t0


def against(other: Path, results: dict[tuple[str, int], dict[int, int]]) -> list[str]:
    """Per task of `results` ({(suite, task): {init state: success}}), its trials paired with `other`'s result files of
    the same init states (those it holds): both won, only this run, only `other`, the exact McNemar p."""
    import numpy as np

    from dcvla.io import read_dataset
    from dcvla.success import mcnemar_exact

    lines = []
    for (suite, task), trials in sorted(results.items()):
        paths = {t: trial_path(other, suite, task, t) for t in sorted(trials)}
        theirs = {t: int(read_dataset(path).success.values.ravel()[0]) for t, path in paths.items() if path.is_file()}
        if not theirs:
            lines.append(f"{suite} task {task} against {other}: no trial of these init states there")
            continue
        mine, others = (np.array([run[t] for t in theirs], bool) for run in (trials, theirs))
        only_mine, only_theirs, p = mcnemar_exact(mine, others)
        lines.append(f"{suite} task {task} against {other}: {len(theirs)} paired trials, {int((mine & others).sum())} "
                     f"both won, {only_mine} only this run ({sorted(t for t in theirs if trials[t] > theirs[t])}), "
                     f"{only_theirs} only that one ({sorted(t for t in theirs if theirs[t] > trials[t])}); "
                     f"McNemar p = {p:.3g}")
    return lines


def main(argv: list[str] | None = None) -> int:
    from dcvla.libero.episodes import DEMO_TASKS
    from dcvla.studies.micro import MICRO_FAMILIES
    from dcvla.success import wilson_interval

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("preset", choices=list(MICRO_FAMILIES))
    ap.add_argument("--checkpoint", type=Path, help="checkpoint directory (default: the shipped checkpoints/PRESET)")
    ap.add_argument("--suites", nargs="+", default=list(DEMO_TASKS), choices=list(DEMO_TASKS),
                    help="suites whose trained task to evaluate (default: all four)")
    ap.add_argument("--trials", type=int, default=20, help="init states 0..N-1 per task (default 20)")
    ap.add_argument("--seed", type=int, default=0, help="evaluation seed (0: the protocol's)")
    ap.add_argument("--workers", type=int, default=2, help="processes (default 2)")
    ap.add_argument("--max-steps", type=int,
                    help="a shorter step budget than the suite's (smoke tests; not the protocol)")
    ap.add_argument("--replan-steps", type=int,
                    help="actions of each chunk executed before the next inference (default the family's "
                         "protocol: OFT 8, SmolVLA 5; recorded in each result file)")
    ap.add_argument("--out", type=Path, help="results (default data/eval/PRESET)")
    ap.add_argument("--against", type=Path, help="another run's --out: pair the trials, McNemar test")
    args = ap.parse_args(argv)
    if args.against is not None and not args.against.is_dir():
        ap.error(f"--against {args.against}: no such results folder")
    if args.trials < 1 or args.workers < 1 or (args.replan_steps is not None and args.replan_steps < 1):
        ap.error("--trials, --workers and --replan-steps must be at least 1")
    out = args.out or ROOT / "data" / "eval" / args.preset
    checkpoint = None if args.checkpoint is None else str(args.checkpoint)
    jobs = [(args.preset, checkpoint, suite, DEMO_TASKS[suite], t, out, args.seed, args.max_steps, args.replan_steps,
             os.getpid())
            for suite in args.suites for t in range(args.trials)]
    results: dict[tuple[str, int], dict[int, int]] = {}
    t0 = time.perf_counter()
    with mp.get_context("spawn").Pool(args.workers) as pool:
        for suite, task, trial, success, seconds in pool.imap_unordered(run_job, jobs):
            results.setdefault((suite, task), {})[trial] = success
            print(f"{suite} task {task} init state {trial}: {'success' if success else 'failure'} "
                  f"({seconds:.0f} s)", flush=True)
    print(f"{len(jobs)} trials in {time.perf_counter() - t0:.0f} s with {args.workers} processes -> {out}")
    for (suite, task), trials in sorted(results.items()):
        wins, n = sum(trials.values()), len(trials)
        low, high = wilson_interval(wins, n)
        print(f"{suite} task {task}: {wins}/{n} = {wins / n:.2f} (Wilson 95% {low:.2f}-{high:.2f}); "
              f"succeeded on init states {sorted(t for t, s in trials.items() if s)}")
    if args.against is not None:
        print("\n".join(against(args.against, results)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
