"""A shipped micro policy's closed-loop rollout as a GIF (the README's): one trial of the upstream protocol on an
official init state, the agent view as the policy saw it (rotated upright), every --every-th step.

    MUJOCO_GL=egl .venv/bin/python scripts/rollout_gif.py smolvla-micro        # figures/rollout_smolvla-micro.gif
    MUJOCO_GL=egl .venv/bin/python scripts/rollout_gif.py smolvla-micro --suite libero_10 --init 3
    MUJOCO_GL=egl .venv/bin/python scripts/rollout_gif.py smolvla-micro --checkpoint checkpoints/smolvla-micro-goal \
        --suite libero_goal --mode full --threshold 0.985    # the same policy reusing its prefix K/V
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from dcvla.io import atomic_path
from dcvla.libero import protocol
from dcvla.libero.env import close_env, get_init_states, get_task, make_env
from dcvla.libero.episodes import DEMO_TASKS
from dcvla.libero.evaluate import cameras_for, run_trial, seed_everything
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
    ap.add_argument("--replan-steps", type=int,
                    help="actions of each chunk executed before the next inference (default the family's protocol)")
    ap.add_argument("--out", type=Path, help="default figures/rollout_CHECKPOINT[_MODETHRESHOLD].gif")
    args = ap.parse_args(argv)
    name = args.checkpoint.name if args.checkpoint else args.preset
    tag = "" if args.mode == "none" else f"_{args.mode}{args.threshold:g}"
    out = args.out or ROOT / "figures" / f"rollout_{name}{tag}.gif"
    policy = load_micro(args.preset, checkpoint=args.checkpoint, replan_steps=args.replan_steps)
    if args.mode != "none":
        if MICRO_FAMILIES[args.preset] == "openvla":
            ap.error(f"--mode is a flow policy's reuse mode; {args.preset} is OpenVLA's")
        policy = policy.with_config(ReuseConfig(mode=args.mode, threshold=args.threshold,
                                                 replan_steps=policy.replan_steps))
    task = DEMO_TASKS[args.suite]
    info = get_task(args.suite, task)
    seed_everything()
    env = Filmed(make_env(args.suite, task, cameras=cameras_for(policy)))
    try:
        result = run_trial(policy, env, args.suite, get_init_states(args.suite, task)[args.init], info.instruction,
                           center_crop=center_crop(args.preset))
    finally:
        close_env(env.env)
    outcome = "success" if result.success else "failure"
    caption = "no reuse" if args.mode == "none" else f"{args.mode} reuse at {args.threshold:g}"
    write_gif(env.frames, out, f"{caption}: {outcome}", args.every, args.size)
    print(f"{args.suite} task {task} init {args.init}: {outcome} in {result.steps} steps -> {out}")
    summary = reuse_summary(args.preset, policy)
    if summary:
        print(summary)
    return 0


def reuse_summary(preset: str, policy: Any) -> str | None:
    """How a flow policy reused its prefix K/V over the trial's inferences; None for an OpenVLA-family policy (its
    step records hold the cache's masks, no gate) or one that recorded nothing."""
    records = getattr(policy, "records", []) if MICRO_FAMILIES[preset] != "openvla" else []
    if not records:
        return None
    return (f"{len(records)} inferences; the gate opened on {sum(bool(r.gate) for r in records)}, "
            f"{np.mean([r.reuse_fraction for r in records]):.2f} of the prefix K/V reused on average")


if __name__ == "__main__":
    sys.exit(main())
