"""What rendering on demand saves in a closed-loop LIBERO trial.

One trial of a micro policy (an official init state, the studies' seeds) is played again and again in one process,
alternating A B A B: A renders the cameras at every step (`run_trial(..., every_frame=True)`, how every trial ran
before), B only on the steps whose observation the policy reads (the default, `dcvla.libero.env.CamerasOnDemand`).
Per trial: wall seconds, seconds inside MuJoCo's render calls, and the number of those calls; the speedup is A/B pair
by pair (median), next to the ideal, the speedup if each skipped render saved exactly its mean time and nothing else
changed. Both must play the same trial: the script fails when any trajectory digest differs.

    MUJOCO_GL=egl .venv/bin/python benchmarks/trial_rendering.py smolvla-micro \
        --checkpoint checkpoints/smolvla-micro-goal --suite libero_goal --repeats 3
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from robosuite.utils.binding_utils import MjSim

from dcvla.libero.env import close_env, get_init_states, get_task, make_env
from dcvla.libero.episodes import DEMO_TASKS
from dcvla.libero.evaluate import cameras_for, run_trial, seed_everything, seeds_of
from dcvla.studies.micro import MICRO_FAMILIES, center_crop, load_micro


class RenderClock:
    """Counts MuJoCo's offscreen renders and the wall seconds spent in them: `MjSim.render` wrapped while the
    context is open."""

    def __init__(self) -> None:
        self.calls, self.seconds, self.real = 0, 0.0, MjSim.render

    def __enter__(self) -> "RenderClock":
        real = self.real

        def render(sim, *args, **kwargs):
            t0 = time.perf_counter()
            try:
                return real(sim, *args, **kwargs)
            finally:
                self.calls += 1
                self.seconds += time.perf_counter() - t0

        MjSim.render = render
        return self

    def __exit__(self, *exc: object) -> None:
        MjSim.render = self.real


def main(argv: list[str] | None = None) -> dict[str, list]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("preset", choices=sorted(MICRO_FAMILIES))
    ap.add_argument("--checkpoint", type=Path)
    ap.add_argument("--suite", default="libero_goal", choices=sorted(DEMO_TASKS))
    ap.add_argument("--init", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0, help="the evaluation seed (as the studies seed each trial)")
    ap.add_argument("--max-steps", type=int, default=None, help="the step budget (default the suite's)")
    ap.add_argument("--repeats", type=int, default=3, help="pairs of trials (A then B)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: a study's shard on one core)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    policy = load_micro(args.preset, checkpoint=args.checkpoint)
    task = DEMO_TASKS[args.suite]
    info, state = get_task(args.suite, task), get_init_states(args.suite, task)[args.init]
    env = make_env(args.suite, task, cameras=cameras_for(policy))
    rows: dict[str, list] = {"every_frame": [], "wall_s": [], "render_s": [], "renders": [], "steps": [], "trajectory": []}
    try:
        for every_frame in [True, False] * args.repeats:
            seed, env_seed = seeds_of(args.seed)
            seed_everything(seed)
            env.seed(env_seed)
            with RenderClock() as clock:
                result = run_trial(policy, env, args.suite, state, info.instruction, max_steps=args.max_steps,
                                   center_crop=center_crop(args.preset), every_frame=every_frame)
            for key, value in [("every_frame", every_frame), ("wall_s", result.wall_s), ("render_s", clock.seconds),
                               ("renders", clock.calls), ("steps", result.steps), ("trajectory", result.trajectory)]:
                rows[key].append(value)
    finally:
        close_env(env)
    report(rows, args)
    return rows


def report(rows: dict[str, list], args: argparse.Namespace) -> None:
    """The table and the ratios; raises when the two ways played different trials."""
    if len(set(rows["trajectory"])) != 1:
        raise SystemExit(f"the trials differ: trajectories {sorted(set(rows['trajectory']))}")
    a = [i for i, every in enumerate(rows["every_frame"]) if every]
    b = [i for i, every in enumerate(rows["every_frame"]) if not every]
    ratios = [rows["wall_s"][i] / rows["wall_s"][j] for i, j in zip(a, b)]
    ideal = []
    for i, j in zip(a, b):
        per_render = rows["render_s"][i] / rows["renders"][i]
        saved = (rows["renders"][i] - rows["renders"][j]) * per_render
        ideal.append(rows["wall_s"][i] / (rows["wall_s"][i] - saved))
    print(f"{args.preset} {args.checkpoint or ''} {args.suite} init {args.init} seed {args.seed}: "
          f"{rows['steps'][0]} steps, the same trajectory in all {len(rows['steps'])} trials; torch threads {args.threads}")
    print(f"{'rendering':<22}{'wall s (median)':>16}{'render s':>10}{'renders':>9}")
    for name, idx in [("every step (A)", a), ("on demand (B)", b)]:
        print(f"{name:<22}{statistics.median(rows['wall_s'][i] for i in idx):>16.1f}"
              f"{statistics.median(rows['render_s'][i] for i in idx):>10.1f}{rows['renders'][idx[0]]:>9d}")
    print(f"speedup A/B, pair by pair: median {statistics.median(ratios):.2f} (min {min(ratios):.2f}, max "
          f"{max(ratios):.2f}); ideal (each skipped render's mean time saved, nothing else) {statistics.median(ideal):.2f}")


if __name__ == "__main__":
    main()
