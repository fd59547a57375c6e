"""A scripted pick-and-place controller that reads object poses from the simulator.

The oracle parses the task's BDDL goal (`(On obj target)`, `(In obj region)`, conjunctions of them) and
drives the Panda through approach, descend, grasp, lift, carry, lower, release, retreat for each goal
atom in turn, with a proportional law on OSC_POSE delta actions (LIBERO's default controller, actions in
[-1, 1], 0.05 m and 0.5 rad per unit). It exists to produce frames that look like real manipulation
episodes for the open-loop caching studies; it is not a policy and it cheats (it sees the true poses).

Unary goals (open/close/turn on) are not handled: `supported_goal` tells the recorder which tasks to use.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

#: LIBERO gripper convention: -1 opens, +1 closes.
GRIPPER_OPEN, GRIPPER_CLOSE = -1.0, 1.0
_POS_SCALE, _ROT_SCALE = 0.05, 0.5  # OSC_POSE output_max: metres / radians per unit action
_SUPPORTED = ("on", "in")
#: Hand orientation held throughout (xyzw): pointing down, fingers closing along world y.
_DOWN_QUAT = np.array([1.0, 0.0, 0.0, 0.0])


def goal_atoms(env: Any) -> list[list[str]]:
    """The task's goal as parsed by LIBERO, e.g. [["on", "akita_black_bowl_1", "plate_1"]]."""
    return [list(map(str, g)) for g in env.env.parsed_problem["goal_state"]]


def supported_goal(env: Any) -> bool:
    """True when every goal atom is a binary On/In that the pick-and-place oracle can attempt."""
    return all(len(g) == 3 and g[0].lower() in _SUPPORTED for g in goal_atoms(env))


def object_pos(env: Any, name: str) -> np.ndarray:
    """World position of a BDDL object or site of `env` (a LIBERO env from `make_env`), from its object state."""
    return np.array(env.env.object_states_dict[name].get_geom_state()["pos"])


def _subtree(model: Any, root: int) -> set[int]:
    out = {root}
    for b in range(model.nbody):
        p = b
        while p not in (0, root):
            p = model.body_parentid[p]
        if p == root:
            out.add(b)
    return out


def _quat_err(target: np.ndarray, current: np.ndarray) -> np.ndarray:
    """World-frame axis-angle rotating `current` onto `target` (both xyzw), shortest way round."""
    import robosuite.utils.transform_utils as T

    if np.dot(target, current) < 0:
        current = -current
    return T.quat2axisangle(T.quat_multiply(target, T.quat_inverse(current)))


@dataclass
class _Phase:
    name: str
    max_steps: int


_PHASES = [
    _Phase("approach", 60), _Phase("descend", 40), _Phase("grasp", 12), _Phase("lift", 40),
    _Phase("carry", 80), _Phase("lower", 40), _Phase("release", 10), _Phase("retreat", 20),
]


@dataclass
class Oracle:
    """Scripted controller for On/In goals. Call `reset(env)` after the env is reset, then `act(obs)`.

    Attributes:
        gain: proportional gain, action units per metre of position error.
        carry_clearance: height (m) the carried object's bottom keeps above the target's top.
        max_retries: re-grasp attempts per goal atom when a lift leaves the object on the table.
        lower_speed: 0 (the default, the shipped demonstrations'): the lower phase slows proportionally as the object
            nears its target, its last centimetres taken with near-zero actions. Above 0: it descends no slower than
            this (z, action units) until the object stops on something, then releases.
        approach_speed: 0 (the default): the hand slows proportionally to a near stop above the grasp point, then
            again at it. Above 0: the approach and descend phases move it no slower than this (action units, the
            translation's norm), so it goes on from one into the other, and into the grasp, without stopping.
        carry_tolerance: how close (m, xy) the carried object's centre must come to the point above its target's
            before the lower phase starts (which steers it the rest of the way, unperturbed). At the default 0.01 the
            DART noise of the demonstrations keeps it out for tens of steps, often to the carry's 80-step timeout:
            the hand hovers over the target, and the step the descent starts is not in the images.
    """

    gain: float = 12.0
    carry_clearance: float = 0.08
    max_retries: int = 2
    rim_inset: float = 0.012
    rim_depth: float = 0.03
    lower_speed: float = 0.0
    approach_speed: float = 0.0
    carry_tolerance: float = 0.01
    env: Any = field(default=None, repr=False)
    atoms: list = field(default_factory=list)

    def reset(self, env: Any) -> None:
        """Bind to `env` (already reset to its init state) and plan the goal atoms in BDDL order."""
        if not supported_goal(env):
            raise ValueError(f"oracle supports only goals made of {_SUPPORTED}; this task's goal is {goal_atoms(env)}")
        self.env = env
        self.atoms = goal_atoms(env)
        self._atom, self._phase, self._t, self._retries = 0, 0, 0, 0
        self._grasp_xy: np.ndarray | None = None
        self._lift_start: tuple[float, float] | None = None

    def options(self) -> dict[str, float]:
        """The options that shape a demonstration's moves (speeds 0: the proportional law's), as its meta records
        them."""
        return {"lower_speed": float(self.lower_speed), "approach_speed": float(self.approach_speed),
                "carry_tolerance": float(self.carry_tolerance)}

    @property
    def phase(self) -> str:
        """The current phase's name ("approach" ... "retreat"; "done" once every goal atom is worked through)."""
        return "done" if self.finished else _PHASES[self._phase].name

    @property
    def finished(self) -> bool:
        """All goal atoms have been worked through (the env decides whether it succeeded)."""
        return self._atom >= len(self.atoms)

    # --- simulator geometry ---------------------------------------------------------------------

    def _aabb(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """World axis-aligned box of an object's geoms (or a small box around a site)."""
        e = self.env.env
        m, d = e.sim.model._model, e.sim.data._data
        if name not in e.obj_body_id:
            p = np.array(e.sim.data.get_site_xpos(name))
            return p - 0.01, p + 0.01
        bodies = _subtree(m, e.obj_body_id[name])
        lo, hi = np.full(3, np.inf), np.full(3, -np.inf)
        geoms = np.flatnonzero(np.isin(m.geom_bodyid, list(bodies)))
        # Collision geoms only: the visual meshes' boxes are loose and would misjudge graspable widths.
        collide = geoms[(m.geom_contype[geoms] != 0) | (m.geom_conaffinity[geoms] != 0)]
        for g in collide if len(collide) else geoms:
            rot = d.geom_xmat[g].reshape(3, 3)
            c = d.geom_xpos[g] + rot @ m.geom_aabb[g, :3]
            h = np.abs(rot) @ m.geom_aabb[g, 3:]
            lo, hi = np.minimum(lo, c - h), np.maximum(hi, c + h)
        return lo, hi

    def _pos(self, name: str) -> np.ndarray:
        return object_pos(self.env, name)

    def _grasp_point(self, obj: str) -> np.ndarray:
        lo, hi = self._aabb(obj)
        center = (lo + hi) / 2
        width = hi[:2] - lo[:2]
        if "bowl" in obj or min(width) > 0.07:
            # Too wide for the Panda's ~8 cm stroke: pinch the rim on the +y side (fingers close along y).
            return np.array([center[0], hi[1] - self.rim_inset, hi[2] - self.rim_depth])
        return np.array([center[0], center[1], max(lo[2] + 0.02, hi[2] - 0.03)])

    def _place_target(self, kind: str, target: str) -> tuple[np.ndarray, float]:
        """(xy the object's centre should reach, z the object's bottom should be lowered to)."""
        lo, hi = self._aabb(target)
        if target in self.env.env.obj_body_id:
            # Aim the object's bottom 1.5 cm below the target's top: contact stops it on the target (a plate's dish
            # first) and the lower phase's timeout ends there. Releasing it above the target lets the opening
            # fingers of a rim grasp push a bowl off the plate (seen on some machines' physics).
            return self._pos(target)[:2], hi[2] - 0.015
        site = self._pos(target)
        return site[:2], site[2] + (0.0 if kind == "in" else 0.02)

    # --- control --------------------------------------------------------------------------------

    def _move(self, eef: np.ndarray, quat: np.ndarray, wp: np.ndarray, grip: float, speed: float = 0.0) -> np.ndarray:
        """The action toward waypoint `wp` by the proportional law, its translation scaled up to norm `speed` if it
        is slower."""
        a = np.zeros(7)
        a[:3] = np.clip((wp - eef) * self.gain, -1, 1)
        norm = np.linalg.norm(a[:3])
        if 0 < norm < speed:
            a[:3] *= speed / norm
        a[3:6] = np.clip(_quat_err(_DOWN_QUAT, quat) / _ROT_SCALE, -1, 1)
        a[6] = grip
        return a

    def _next(self) -> None:
        self._phase, self._t = self._phase + 1, 0
        if self._phase >= len(_PHASES):
            self._atom, self._phase, self._retries = self._atom + 1, 0, 0

    def act(self, obs: dict) -> np.ndarray:
        """One LIBERO action [dx, dy, dz, drx, dry, drz, gripper] in [-1, 1] for the current state."""
        eef, quat = np.asarray(obs["robot0_eef_pos"]), np.asarray(obs["robot0_eef_quat"])
        if self.finished:
            return self._move(eef, quat, eef, GRIPPER_OPEN)
        kind, obj, target = self.atoms[self._atom]
        kind = kind.lower()
        phase = _PHASES[self._phase].name
        self._t += 1
        timeout = self._t >= _PHASES[self._phase].max_steps
        obj_lo, obj_hi = self._aabb(obj)
        obj_pos = self._pos(obj)
        tgt_xy, tgt_bottom = self._place_target(kind, target)
        carry_z = eef[2] + (tgt_bottom + self.carry_clearance - obj_lo[2])

        if phase in ("approach", "descend"):
            if self._grasp_xy is None or phase == "approach":
                self._grasp = self._grasp_point(obj)
            wp = self._grasp + (np.array([0, 0, 0.08]) if phase == "approach" else 0)
            if np.linalg.norm(wp - eef) < (0.015 if phase == "approach" else 0.006) or timeout:
                self._next()
            return self._move(eef, quat, wp, GRIPPER_OPEN, self.approach_speed)
        if phase == "grasp":
            if timeout:
                self._lift_start = (eef[2], obj_pos[2])
                self._next()
            return self._move(eef, quat, self._grasp, GRIPPER_CLOSE)
        if phase == "lift":
            wp = np.array([eef[0], eef[1], max(carry_z, self._grasp[2] + 0.12)])
            rose_eef, rose_obj = eef[2] - self._lift_start[0], obj_pos[2] - self._lift_start[1]
            if rose_eef > 0.06 and rose_obj < 0.02 and self._retries < self.max_retries:
                self._retries, self._phase, self._t = self._retries + 1, 0, 0  # dropped it: try again
            elif abs(wp[2] - eef[2]) < 0.02 or timeout:
                self._next()
            return self._move(eef, quat, wp, GRIPPER_CLOSE)
        if phase in ("carry", "lower"):
            return self._move(eef, quat, self._transport(phase, eef, obj_pos, obj_lo, tgt_xy, tgt_bottom, carry_z, timeout),
                              GRIPPER_CLOSE)
        if phase == "release":
            if timeout:
                self._next()
            return self._move(eef, quat, eef, GRIPPER_OPEN)
        # retreat: straight up, away from the placed object
        if timeout or obj_hi[2] + 0.1 - eef[2] < 0.02:
            self._next()
        return self._move(eef, quat, np.array([eef[0], eef[1], obj_hi[2] + 0.1]), GRIPPER_OPEN)

    def hold(self, obs: dict, grip: float) -> np.ndarray:
        """An action that keeps the hand where it is, upright, with the gripper command `grip`."""
        eef, quat = np.asarray(obs["robot0_eef_pos"]), np.asarray(obs["robot0_eef_quat"])
        return self._move(eef, quat, eef, grip)

    def _transport(self, phase: str, eef: np.ndarray, obj_pos: np.ndarray, obj_lo: np.ndarray, tgt_xy: np.ndarray,
                   tgt_bottom: float, carry_z: float, timeout: bool) -> np.ndarray:
        """The carry and lower phases' waypoint (and the phase change when it is reached)."""
        # Steer by the object's live offset from the hand so a slipped grasp still lands on target.
        xy = tgt_xy + (eef[:2] - obj_pos[:2])
        z = carry_z if phase == "carry" else eef[2] + (tgt_bottom - obj_lo[2])
        if phase == "lower" and self.lower_speed:
            z = min(z, eef[2] - self.lower_speed / self.gain)
        wp = np.array([xy[0], xy[1], max(z, self._grasp[2] - 0.5)])
        err_xy = np.linalg.norm(obj_pos[:2] - tgt_xy)
        if phase == "carry" and (err_xy < self.carry_tolerance and abs(z - eef[2]) < 0.03 or timeout):
            self._next()
        elif phase == "lower" and (obj_lo[2] - tgt_bottom < 0.006 or timeout or self._resting(obj_lo[2])):
            self._next()
        return wp

    def _resting(self, bottom: float) -> bool:
        """With `lower_speed`: the lowered object has stopped on something (its bottom fell under 1 mm in 2 steps)."""
        if not self.lower_speed:
            return False
        self._bottoms = [bottom] if self._t == 1 else [*self._bottoms, bottom]
        return len(self._bottoms) > 3 and self._bottoms[-3] - bottom < 0.001


class OraclePolicy:
    """The oracle behind the policy interface (`reset`, `step(image, instruction)`), for closed-loop tests.

    It ignores the image and reads the state from `env`; it returns OpenVLA-convention actions (gripper
    1 = open, 0 = close) so the protocol's gripper post-processing maps them back to LIBERO's -1/+1.
    """

    name = "oracle"

    def __init__(self, env: Any):
        self.env = env
        self.oracle = Oracle()
        self._bound = False

    def reset(self) -> None:
        self._bound = False  # bind on the first step: after the init state is loaded and objects settled

    def step(self, image: np.ndarray, instruction: str) -> np.ndarray:
        if not self._bound:
            self.oracle.reset(self.env)
            self._bound = True
        obs = self.env.env._get_observations()  # cached observables: no extra render
        a = self.oracle.act(obs)
        return np.concatenate([a[:6], [(1.0 - a[6]) / 2.0]])


#: Phases executed unperturbed under `action_noise`: the precise moves onto, around and off an object.
_STEADY_PHASES = ("descend", "grasp", "lower", "release", "done")


class PositionNoise:
    """DART-style perturbation of the oracle's executed translation (Laskey et al. 2017): an AR(1) process per axis
    with stationary standard deviation `scale` (action units) and correlation `rho` per step, so the arm drifts off
    the oracle's path for a few steps and the recorded (unperturbed) actions show how to come back."""

    def __init__(self, scale: float, seed: int, rho: float = 0.9):
        self.scale, self.rho = scale, rho
        self.rng = np.random.default_rng(seed)
        self.value = np.zeros(3)

    def __call__(self, action: np.ndarray, phase: str) -> np.ndarray:
        self.value = self.rho * self.value + np.sqrt(1 - self.rho**2) * self.scale * self.rng.standard_normal(3)
        if phase in _STEADY_PHASES:
            return action
        out = action.copy()
        out[:3] = np.clip(action[:3] + self.value, -1, 1)
        return out


def run_oracle(env: Any, init_state: np.ndarray, max_steps: int, wait_steps: int = 10, extra_steps: int = 5,
               on_step: Any = None, noise: PositionNoise | None = None, finish: bool = False,
               oracle: Oracle | None = None) -> dict:
    """Run the oracle closed-loop from an init state, LIBERO-protocol style.

    Args:
        env: a LIBERO env from `make_env` (rendering optional).
        init_state: the flattened simulator state to start from.
        max_steps: oracle steps after the wait (use the suite's protocol max).
        wait_steps: dummy-action steps first, like the evaluation protocol (objects settle).
        extra_steps: steps kept after success, the arm holding still, so an episode ends with the goal achieved.
        on_step: optional callback `on_step(obs, action, done)` called for every oracle step with the
            observation the action was chosen from.
        noise: a `PositionNoise` perturbing the translation the env executes; `on_step` still gets the oracle's own
            action, the label a demonstration keeps.
        finish: after success, go on with the oracle's sequence (lower, release, retreat) until it has finished,
            then hold `extra_steps`; the run succeeds only if the goal still holds at its last step. Without it the
            arm holds still from the first success: a goal met while the object is held (a can entering a
            basket's region) then ends the episode with the object in the gripper, never released.
        oracle: the controller to run (its options set, e.g. `Oracle(lower_speed=0.5)`); a default `Oracle()` if None.

    Returns:
        {"success": bool, "steps": oracle steps taken, "success_step": first step with done or None}.
    """
    from .env import reset_to_init_state

    obs = reset_to_init_state(env, init_state)
    for _ in range(wait_steps):
        obs, _, _, _ = env.step([0, 0, 0, 0, 0, 0, -1])
    oracle = oracle or Oracle()
    oracle.reset(env)
    success_step, hold_step, t, action, done = None, None, 0, None, False
    while t < max_steps:
        # Once holding (from success, or with `finish` from the end of the oracle's sequence after success) the arm
        # holds still, gripper as it was, so the episode ends with the goal still achieved.
        if hold_step is None and success_step is not None and (not finish or oracle.finished):
            hold_step = t
        action = oracle.act(obs) if hold_step is None else oracle.hold(obs, action[6])
        prev = obs
        executed = action if noise is None or hold_step is not None else noise(action, oracle.phase)
        obs, _, done, _ = env.step(executed.tolist())
        t += 1
        if done and success_step is None:
            success_step = t
        if on_step is not None:
            on_step(prev, action, bool(done))
        if hold_step is not None and t >= hold_step + extra_steps:
            break
    success = success_step is not None and (bool(done) or not finish)
    return {"success": success, "steps": t, "success_step": success_step}
