"""A shipped micro policy's closed-loop rollout as a GIF (the README's): one trial of the upstream protocol on an
official init state, the agent view as the policy saw it (rotated upright), every --every-th step.

    MUJOCO_GL=egl .venv/bin/python scripts/rollout_gif.py smolvla-micro        # figures/rollout_smolvla-micro.gif
    MUJOCO_GL=egl .venv/bin/python scripts/rollout_gif.py smolvla-micro --suite libero_10 --init 3
    MUJOCO_GL=egl .venv/bin/python scripts/rollout_gif.py smolvla-micro --checkpoint checkpoints/smolvla-micro-goal \
        --suite libero_goal --mode full --threshold 0.985    # the same policy reusing its prefix K/V
    MUJOCO_GL=egl .venv/bin/python scripts/rollout_gif.py oft-micro --checkpoint checkpoints/oft-micro-10 \
        --suite libero_10 --init 1 --method dual_cache       # an OpenVLA-family cache method

The trial is the `libero_benchmark` / `stability_cliff` study's of that init state and evaluation seed (`--seed`):
the same seeds before it, so the same steps.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from dcvla.io import atomic_path
from dcvla.libero import protocol
from dcvla.libero.env import close_env, get_init_states, get_task, make_env
from dcvla.libero.episodes import DEMO_TASKS
from dcvla.libero.evaluate import cameras_for, run_trial, seed_everything, seeds_of
from dcvla.openvla import METHODS
from dcvla.prefix_reuse import MODES, ReuseConfig
from dcvla.studies.micro import MICRO_FAMILIES, center_crop, load_micro

ROOT = Path(__file__).resolve().parents[1]


class Filmed:
    """The env, keeping the agent view of every step's observation."""

    def __init__(self, env: Any) -> None:
        self.env, self.frames = env, []

    def _keep(self, obs: dict) -> dict:
        self.frames.append(protocol.rotate180(obs["agentview_image"]))
        return obs

    def set_init_state(self, state: np.ndarray) -> dict:
        return self._keep(self.env.set_init_state(state))

    def step(self, action: list) -> tuple:
        obs, *rest = self.env.step(action)
        return (self._keep(obs), *rest)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.env, name)


def write_gif(frames: list[np.ndarray], path: Path, caption: str, every: int, size: int) -> None:
    images = []
    for i, frame in enumerate(frames[::every]):
        image = Image.fromarray(frame).resize((size, size), Image.LANCZOS)
        ImageDraw.Draw(image).text((4, 4), f"{caption}  step {i * every}", fill=(255, 255, 255))
        images.append(image.convert("P", palette=Image.ADAPTIVE))
    with atomic_path(path) as tmp:
        images[0].save(tmp, format="GIF", save_all=True, append_images=images[1:], duration=100, loop=0)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("preset", choices=list(MICRO_FAMILIES))
    ap.add_argument("--suite", default="libero_spatial", choices=list(DEMO_TASKS))
    ap.add_argument("--init", type=int, default=0, help="official init state (default 0)")
    ap.add_argument("--every", type=int, default=4, help="keep every N-th step (default 4)")
    ap.add_argument("--size", type=int, default=192, help="GIF side in pixels (default 192)")
    ap.add_argument("--checkpoint", type=Path, help="checkpoint directory (default: the shipped checkpoints/PRESET)")
    ap.add_argument("--mode", default="none", choices=list(MODES), help="a flow preset's reuse mode (default none)")
    ap.add_argument("--threshold", type=float, default=0.985, help="the mode's gate threshold (default 0.985)")
    ap.add_argument("--method", default="vanilla", choices=list(METHODS),
                    help="an OpenVLA-family preset's cache method, at its published settings (default vanilla)")
    ap.add_argument("--seed", type=int, default=0, help="evaluation seed (default 0, the protocol's)")
    ap.add_argument("--replan-steps", type=int,
                    help="actions of each chunk executed before the next inference (default the family's protocol)")
    ap.add_argument("--out", type=Path, help="default figures/rollout_CHECKPOINT[_MODETHRESHOLD].gif")
    args = ap.parse_args(argv)
    name = args.checkpoint.name if args.checkpoint else args.preset
    openvla = MICRO_FAMILIES[args.preset] == "openvla"
    if args.mode != "none" and openvla:
        ap.error(f"--mode is a flow policy's reuse mode; {args.preset} is OpenVLA's (--method)")
    if args.method != "vanilla" and not openvla:
        ap.error(f"--method is an OpenVLA-family cache method; {args.preset} is a flow policy (--mode)")
    tag = (f"_{args.method}" if args.method != "vanilla" else "") + (
        f"_{args.mode}{args.threshold:g}" if args.mode != "none" else "") + (f"_seed{args.seed}" if args.seed else "")
    out = args.out or ROOT / "figures" / f"rollout_{name}{tag}.gif"
    policy = with_reuse(load_micro(args.preset, checkpoint=args.checkpoint, replan_steps=args.replan_steps), args)
    task = DEMO_TASKS[args.suite]
    info = get_task(args.suite, task)
    env = Filmed(make_env(args.suite, task, cameras=cameras_for(policy)))
    seed, env_seed = seeds_of(args.seed)  # as the studies seed every trial (dcvla.libero.evaluate)
    seed_everything(seed)
    env.seed(env_seed)
    try:
        result = run_trial(policy, env, args.suite, get_init_states(args.suite, task)[args.init], info.instruction,
                           center_crop=center_crop(args.preset), every_frame=True)
    finally:
        close_env(env.env)
    outcome = "success" if result.success else "failure"
    caption = (args.method if openvla else "no reuse" if args.mode == "none" else
               f"{args.mode} reuse at {args.threshold:g}")
    write_gif(env.frames, out, f"{caption}: {outcome}", args.every, args.size)
    print(f"{args.suite} task {task} init {args.init} seed {args.seed}: {outcome} in {result.steps} steps -> {out}")
    summary = reuse_summary(args.preset, policy, result.reuse)
    if summary:
        print(summary)
    return 0


def with_reuse(policy: Any, args: argparse.Namespace) -> Any:
    """The loaded policy (no reuse) under `--method` (OpenVLA family) or `--mode` (flow policies)."""
    if args.method != "vanilla":
        cached = policy.with_config(dataclasses.replace(policy.config, method=args.method))
        cached.replan_steps = policy.replan_steps  # load_micro's, not the config's
        return cached
    if args.mode != "none":
        return policy.with_config(ReuseConfig(mode=args.mode, threshold=args.threshold,
                                              replan_steps=policy.replan_steps))
    return policy


def reuse_summary(preset: str, policy: Any, reuse: np.ndarray | None = None) -> str | None:
    """How the policy reused over the trial's inferences: a flow policy's gate openings and prefix K/V reused (its
    records); an OpenVLA-family policy's vision tokens taken from earlier frames (`reuse`: its `last_reuse` after
    each call, as the result files record it). None when there is nothing to say (no records, no reuse)."""
    if MICRO_FAMILIES[preset] == "openvla":
        reuse = np.asarray([] if reuse is None else reuse, dtype=float)
        if not (np.nan_to_num(reuse) > 0).any():  # vanilla, or a policy that does not report it
            return None
        return (f"{reuse.size} inferences; {int((reuse > 0).sum())} reused vision tokens, "
                f"{np.nanmean(reuse):.3f} of them on average (min {np.nanmin(reuse):.3f}, max {np.nanmax(reuse):.3f})")
    records = getattr(policy, "records", [])
    if not records:
        return None
    return (f"{len(records)} inferences; the gate opened on {sum(bool(r.gate) for r in records)}, "
            f"{np.mean([r.reuse_fraction for r in records]):.2f} of the prefix K/V reused on average")


if __name__ == "__main__":
    sys.exit(main())
