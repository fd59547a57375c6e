"""Does the evaluation seed change the scene a trial starts from? Per task: the env reset under each env seed, the
official init state loaded, the protocol's waits stepped; then the rendered agent views and the MuJoCo model's body
positions compared with the first seed's.

    MUJOCO_GL=egl .venv/bin/python scripts/scene_seeds.py libero_goal:8 libero_object:0 libero_spatial:0 libero_10:4

An init state fixes the joints (`qpos`, `qvel`), not what a reset places by moving bodies in the model: where that is
all a reset draws, a policy that draws nothing itself (OpenVLA-OFT's L1 head, OpenVLA's argmax) plays the same trial
under every evaluation seed, and a grid of two seeds holds each trial twice (`dcvla.success.replays` counts such a
replay once when the result files record trajectories).
"""

from __future__ import annotations

import argparse

import numpy as np

from dcvla.libero import protocol
from dcvla.libero.env import close_env, get_init_states, make_env
from dcvla.libero.evaluate import seeds_of


def scene_after_reset(env, init_state: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(agent view after the waits, the model's body positions) of one reset under evaluation seed `seed`."""
    env.seed(seeds_of(seed)[1])
    env.reset()
    obs = env.set_init_state(init_state)
    for _ in range(protocol.WAIT_STEPS):
        obs, *_ = env.step(list(protocol.DUMMY_ACTION))
    return obs["agentview_image"].astype(np.int16), np.array(env.env.sim.model.body_pos)


def seed_differences(suite: str, task: int, init: int = 0, seeds: tuple[int, ...] = (0, 1)) -> list[dict]:
    """Per seed after the first: the view's pixels that differ from the first seed's, and the bodies it moved."""
    env = make_env(suite, task, resolution=protocol.RENDER_RESOLUTION, seed=None)
    try:
        state = get_init_states(suite, task)[init]
        (view0, body0), rows = scene_after_reset(env, state, seeds[0]), []
        for seed in seeds[1:]:
            view, body = scene_after_reset(env, state, seed)
            moved = np.abs(body - body0).max(1)
            rows.append({"suite": suite, "task": task, "init": init, "seed": seed,
                         "pixels": int((view != view0).any(-1).sum()),
                         "bodies": [env.env.sim.model.body_id2name(i) for i in np.flatnonzero(moved > 1e-9)],
                         "moved_m": float(moved.max())})
        return rows
    finally:
        close_env(env)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("tasks", nargs="+", help="SUITE:TASK, e.g. libero_10:4")
    parser.add_argument("--init", type=int, default=0, help="official init state (default 0)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="evaluation seeds (default 0 1)")
    args = parser.parse_args(argv)
    for spec in args.tasks:
        suite, _, task = spec.partition(":")
        if not task.isdigit():
            parser.error(f"a task is SUITE:TASK (e.g. libero_10:4), got {spec!r}")
        for row in seed_differences(suite, int(task), args.init, tuple(args.seeds)):
            print(f"{suite} task {task}, init state {args.init}, seed {row['seed']} against {args.seeds[0]}: "
                  f"{row['pixels']} of the view's pixels differ; bodies moved: {', '.join(row['bodies']) or 'none'} "
                  f"(at most {row['moved_m']:.4f} m)", flush=True)


if __name__ == "__main__":
    main()
