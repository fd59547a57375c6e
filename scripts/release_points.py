"""Where a pick-and-place task's objects are let go: the hand's position at each release (the gripper action
switching from close to open) in scripted demonstrations, and in closed-loop rollouts of a micro policy on official
init states, where the rollouts also say how far the released object was from its goal target, and where every goal
object ends.

    .venv/bin/python scripts/release_points.py --demos data/demos-10-finish
    MUJOCO_GL=egl .venv/bin/python scripts/release_points.py oft-micro --suite libero_10 \\
        --checkpoint data/train/oft28-10finish/checkpoint --inits 0 1 2 3 4 --replan-steps 8

Positions are the simulator's world frame, in metres (the robot's base behind the table, +y to its left). A rollout
runs OFT's or SmolVLA's protocol, as `scripts/eval_micro.py` does, one init state after another in this process.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np

from dcvla.libero.oracle import goal_atoms, object_pos

GRIPPER = 6  # the gripper's column of a LIBERO action: +1 closes, -1 opens


def releases(gripper: np.ndarray) -> np.ndarray:
    """Indices of the actions that open a hand the previous action closed."""
    closed = np.asarray(gripper) > 0
    return np.flatnonzero(closed[:-1] & ~closed[1:]) + 1


def hover_steps(hand: np.ndarray, gripper: np.ndarray, speed: float = 0.005, height: float = 0.05) -> list[int]:
    """Per release, the steps since the hand last closed that it spent nearly still (moving under `speed` m a step)
    more than `height` m above the release point: a carry that hovers before its descent."""
    closed = np.asarray(gripper) > 0
    closes = np.flatnonzero(~closed[:-1] & closed[1:]) + 1
    moved = np.r_[np.linalg.norm(np.diff(hand, axis=0), axis=-1), np.inf]  # step t's move to t + 1
    out = []
    for r in releases(gripper):
        start = closes[closes < r].max(initial=0)
        out.append(int(np.sum((moved[start:r] < speed) & (hand[start:r, 2] - hand[r, 2] > height))))
    return out


def fmt(xyz: np.ndarray) -> str:
    return "(" + ", ".join(f"{v:+.3f}" for v in xyz) + ")"


def demo_releases(folder: Path) -> list[tuple[str, np.ndarray, list[int]]]:
    """(file name, hand positions [releases, 3], `hover_steps`) of every demonstration (.npz) in `folder`."""
    files = sorted(folder.glob("*.npz"))
    if not files:
        raise FileNotFoundError(f"no demonstrations (*.npz) in {folder}")
    out = []
    for f in files:
        with np.load(f, allow_pickle=False) as d:
            hand, gripper = d["eef_pos"], d["actions"][:, GRIPPER]
            out.append((f.name, hand[releases(gripper)], hover_steps(hand, gripper)))
    return out


def _spread(values: np.ndarray, form: str) -> str:
    return f"{np.median(values):{form}} ({values.min():{form}} to {values.max():{form}})"


def summarise(rows: list[tuple[str, np.ndarray, list[int]]]) -> list[str]:
    """The n-th release over the rows that have one: the hand's position and the steps it hovered above it first,
    median and range."""
    lines, most = [], max((len(p) for _, p, _ in rows), default=0)
    for n in range(most):
        points = np.array([p[n] for _, p, _ in rows if len(p) > n])
        hovers = np.array([h[n] for _, p, h in rows if len(p) > n])
        axes = ", ".join(f"{a} {_spread(points[:, i], '+.3f')}" for i, a in enumerate("xyz"))
        lines.append(f"release {n + 1}: {len(points)} of {len(rows)}; hand {axes}; hovered above it "
                     f"{_spread(hovers, '.0f')} steps")
    return lines


class Watched:
    """The env, keeping the hand's position, the gripper action and each goal atom's object and target positions
    before every action."""

    def __init__(self, env: Any) -> None:
        self.env, self.atoms = env, [a for a in goal_atoms(env) if len(a) == 3]
        self.hand: list[np.ndarray] = []
        self.gripper: list[float] = []
        self.places: list[np.ndarray] = []  # [atoms, 2 (object, target), 3] per action

    def where(self) -> np.ndarray:
        """[atoms, 2 (object, target), 3]: where each goal atom's object and target are now."""
        return np.array([[object_pos(self.env, obj), object_pos(self.env, target)] for _, obj, target in self.atoms])

    def set_init_state(self, state: np.ndarray) -> dict:
        self.hand, self.gripper, self.places = [], [], []
        self._obs = self.env.set_init_state(state)
        return self._obs

    def step(self, action: list) -> tuple:
        self.hand.append(np.asarray(self._obs["robot0_eef_pos"], dtype=float))
        self.gripper.append(float(action[GRIPPER]))
        self.places.append(self.where())
        self._obs, *rest = self.env.step(action)
        return (self._obs, *rest)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.env, name)


def describe_rollout(env: Watched, result: Any, init: int) -> list[str]:
    """One line per release (the step after the protocol's wait; the hand; the goal object nearest it, and its xy
    distance from its target's centre) and one for where every goal object ended."""
    from dcvla.libero.protocol import WAIT_STEPS

    lines = [f"init state {init}: {'success' if result.success else 'failure'} in {result.steps} steps"]
    hand, places = np.array(env.hand), np.array(env.places)
    for i in releases(np.array(env.gripper)):
        near = int(np.argmin(np.linalg.norm(places[i, :, 0] - hand[i], axis=-1)))
        _, obj, target = env.atoms[near]
        gap = 100 * np.linalg.norm(places[i, near, 0, :2] - places[i, near, 1, :2])
        lines.append(f"  release at step {i - WAIT_STEPS}: hand {fmt(hand[i])}; {obj} {gap:.1f} cm from {target} "
                     "(xy)")
    ends = "; ".join(f"{obj} {100 * np.linalg.norm(o[:2] - t[:2]):.1f} cm from {target} (xy), "
                     f"{100 * (o[2] - t[2]):+.1f} cm above it"
                     for (_, obj, target), (o, t) in zip(env.atoms, env.where()))
    grip = "closed" if env.gripper and env.gripper[-1] > 0 else "open"
    lines.append(f"  end: hand {fmt(np.asarray(env._obs['robot0_eef_pos']))}, gripper {grip}; {ends}")
    return lines


def rollouts(preset: str, suite: str, checkpoint: Path | None, inits: list[int], replan_steps: int | None,
             max_steps: int | None = None) -> list[tuple[str, np.ndarray, list[int]]]:
    """Each init state's closed-loop trial under the family's protocol, described as it ends (`describe_rollout`):
    (init, hand at each release, `hover_steps`)."""
    from dcvla.libero.env import close_env, get_init_states, get_task, make_env
    from dcvla.libero.episodes import DEMO_TASKS
    from dcvla.libero.evaluate import cameras_for, run_trial, seed_everything
    from dcvla.studies.micro import center_crop, load_micro

    policy = load_micro(preset, checkpoint=checkpoint, replan_steps=replan_steps)
    task = DEMO_TASKS[suite]
    info, states = get_task(suite, task), get_init_states(suite, task)
    env = Watched(make_env(suite, task, cameras=cameras_for(policy)))
    out = []
    try:
        for init in inits:
            seed_everything()  # as evaluate_task does before each trial
            result = run_trial(policy, env, suite, states[init], info.instruction, max_steps=max_steps,
                               center_crop=center_crop(preset))
            hand, gripper = np.array(env.hand).reshape(-1, 3), np.array(env.gripper)
            out.append((f"init{init:02d}", hand[releases(gripper)], hover_steps(hand, gripper)))
            print("\n".join(describe_rollout(env, result, init)), flush=True)
    finally:
        close_env(env.env)
    return out


def main(argv: list[str] | None = None) -> int:
    from dcvla.libero.episodes import DEMO_TASKS
    from dcvla.studies.micro import MICRO_FAMILIES

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("preset", nargs="?", choices=list(MICRO_FAMILIES), help="roll this micro policy out")
    ap.add_argument("--demos", type=Path, help="a folder of demonstrations (.npz) to read instead")
    ap.add_argument("--suite", default="libero_10", choices=list(DEMO_TASKS))
    ap.add_argument("--checkpoint", type=Path, help="checkpoint directory (default: the shipped checkpoints/PRESET)")
    ap.add_argument("--inits", type=int, nargs="+", default=[0], help="official init states (default 0)")
    ap.add_argument("--replan-steps", type=int, help="actions of each chunk executed before the next inference")
    ap.add_argument("--max-steps", type=int, help="a shorter step budget than the suite's (smoke tests)")
    args = ap.parse_args(argv)
    if (args.preset is None) == (args.demos is None):
        ap.error("give a micro preset to roll out or --demos, not both")
    if args.demos is not None:
        rows = demo_releases(args.demos)
        for name, hand, hover in rows:
            print(f"{name}: {len(hand)} releases, hand at " + ", ".join(fmt(h) for h in hand)
                  + f"; hovered above them {hover} steps")
    else:
        rows = rollouts(args.preset, args.suite, args.checkpoint, args.inits, args.replan_steps, args.max_steps)
    print("\n".join(summarise(rows)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
