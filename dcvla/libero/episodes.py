"""Recorded episodes: scripted LIBERO rollouts saved to disk, and open-loop replay of a policy over them.

Storage: one `.npz` per episode (no pickle). Frames are stored as the JPEG bytes that the evaluation pipeline's own
JPEG step produces (rotated 256x256 render, quality 95), so nothing is lost: loading redoes decode + lanczos resize and
yields bit-for-bit the 224 frames the live protocol would hand the policy (before the policy-time center crop). Per
step we also keep the robot state and the oracle's action. From format_version 2 on, the wrist camera
(`robot0_eye_in_hand_image`, rotated and JPEG'd the same way, as OpenVLA-OFT's evaluation processes it) is stored
beside the agent view. `format_version` lets later versions add arrays without breaking old files; unknown keys are
ignored, and a version-1 file loads with no wrist view.
"""

from __future__ import annotations

import contextlib
import json
import time
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np

from dcvla.io import atomic_path

from . import protocol

FORMAT_VERSION = 2  # 2: optional wrist view (wrist_jpeg, wrist_jpeg_offsets)
CAMERAS = ("agentview", "robot0_eye_in_hand")  # what an episode records: the agent view and the wrist camera
DEFAULT_DIR = Path(__file__).resolve().parents[2] / "data" / "episodes"
#: The episodes shipped in the repo: suite -> [(task id, init state index)]. Pick-and-place tasks the
#: oracle solves (scripts/record_episodes.py --shipped re-records them).
SHIPPED: dict[str, list[tuple[int, int]]] = {
    "libero_spatial": [(0, 0), (1, 0)],   # black bowl onto the plate
    "libero_object": [(0, 0), (2, 0)],    # alphabet soup / salad dressing into the basket
    "libero_goal": [(8, 0), (6, 0)],      # bowl onto the plate / cream cheese into the bowl
    "libero_10": [(4, 0), (6, 0)],        # two objects each: two mugs onto two plates / mug + pudding
}

#: The tasks demonstrations are recorded for (`scripts/record_demos.py`) and the micro policies are trained on: the
#: first shipped task of each suite, so the open-loop studies run on the trained tasks' scenes.
DEMO_TASKS: dict[str, int] = {suite: tasks[0][0] for suite, tasks in SHIPPED.items()}
DEMO_DIR = DEFAULT_DIR.parent / "demos"
#: The demonstrations' DART perturbation (`record_episode(action_noise=)`): behaviour cloning from clean scripted
#: demonstrations alone never sees a state off the oracle's path, so the policy's first error compounds.
DEMO_NOISE = 0.3


@dataclass
class Episode:
    """One recorded episode.

    Attributes:
        jpegs: per policy step, the JPEG bytes of the rotated 256x256 agent-view render.
        eef_pos, eef_quat, gripper_qpos: robot state at each frame, [n, 3], [n, 4] (xyzw), [n, 2].
        actions: the oracle's LIBERO-convention action taken after each frame, [n, 7].
        done: env `done` returned by the step that followed each frame, [n].
        meta: suite, task_id, task_name, instruction, init_state_index, seed, success, n_steps,
            success_step, render_ms, step_ms, wait_steps, format_version.
        wrist_jpegs: per policy step, the JPEG bytes of the rotated wrist-camera render; None when the episode
            was recorded without it (format_version 1).
    """

    jpegs: list[bytes]
    eef_pos: np.ndarray
    eef_quat: np.ndarray
    gripper_qpos: np.ndarray
    actions: np.ndarray
    done: np.ndarray
    meta: dict[str, Any]
    wrist_jpegs: list[bytes] | None = None
    _frames: np.ndarray | None = field(default=None, repr=False)
    _wrist_frames: np.ndarray | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.jpegs)

    @property
    def instruction(self) -> str:
        return str(self.meta["instruction"])

    @property
    def suite(self) -> str:
        return str(self.meta["suite"])

    @property
    def task_id(self) -> int:
        return int(self.meta["task_id"])

    @property
    def name(self) -> str:
        """Short id: "libero_spatial/task00/init00" (the benchmark's init state 0), or "libero_spatial/task00/seed0007"
        for a demonstration from the simulator's own placement sampling with seed 7."""
        if self.meta.get("placement_seed") is not None:
            return f"{self.suite}/task{self.task_id:02d}/seed{int(self.meta['placement_seed']):04d}"
        return f"{self.suite}/task{self.task_id:02d}/init{int(self.meta['init_state_index']):02d}"

    @property
    def states(self) -> np.ndarray:
        """[n, 8] float32: `protocol.robot_state` of each frame (eef pos, eef axis-angle, gripper qpos)."""
        return protocol.robot_state(self.eef_pos, self.eef_quat, self.gripper_qpos)

    @property
    def frames(self) -> np.ndarray:
        """[n, 224, 224, 3] uint8: the pipeline's frames (rotate, JPEG, lanczos), decoded once and cached."""
        if self._frames is None:
            self._frames = _decode_all(self.jpegs)
        return self._frames

    @property
    def has_wrist(self) -> bool:
        return self.wrist_jpegs is not None

    @property
    def wrist_frames(self) -> np.ndarray:
        """[n, 224, 224, 3] uint8: the wrist camera's frames, processed as the agent view's.

        Raises:
            ValueError: the episode was recorded without the wrist camera (re-record it:
                `python scripts/record_episodes.py --shipped --overwrite`).
        """
        if self.wrist_jpegs is None:
            raise ValueError(f"episode {self.name} has no wrist view (format_version "
                             f"{self.meta.get('format_version', 1)}); re-record it with scripts/record_episodes.py")
        if self._wrist_frames is None:
            self._wrist_frames = _decode_all(self.wrist_jpegs)
        return self._wrist_frames


def _decode_all(jpegs: list[bytes]) -> np.ndarray:
    if not jpegs:
        return np.zeros((0, protocol.POLICY_RESOLUTION, protocol.POLICY_RESOLUTION, 3), np.uint8)
    return np.stack([protocol.decode_frame(j) for j in jpegs])


def _pack(jpegs: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
    """JPEG byte strings -> (one uint8 blob, int64 offsets [n + 1])."""
    lengths = np.array([len(j) for j in jpegs], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    return np.frombuffer(b"".join(jpegs), dtype=np.uint8), offsets


def _unpack(blob: np.ndarray, offsets: np.ndarray) -> list[bytes]:
    return [blob[offsets[i]:offsets[i + 1]].tobytes() for i in range(len(offsets) - 1)]


def save_episode(ep: Episode, path: str | Path) -> Path:
    """Write an episode atomically to `path` (.npz, compressed, no pickled objects).

    Returns:
        The path written.
    """
    blob, offsets = _pack(ep.jpegs)
    wrist = {}
    if ep.wrist_jpegs is not None:
        if len(ep.wrist_jpegs) != len(ep.jpegs):
            raise ValueError(f"episode {ep.name}: {len(ep.wrist_jpegs)} wrist frames for {len(ep.jpegs)} agent-view frames")
        wrist = dict(zip(("wrist_jpeg", "wrist_jpeg_offsets"), _pack(ep.wrist_jpegs)))
    meta = dict(ep.meta, format_version=FORMAT_VERSION)
    path = Path(path)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:  # a file object stops numpy appending ".npz" to the temp name
            np.savez_compressed(
                f, format_version=np.int64(FORMAT_VERSION), meta=np.array(json.dumps(meta)),
                jpeg=blob, jpeg_offsets=offsets, eef_pos=ep.eef_pos.astype(np.float32),
                eef_quat=ep.eef_quat.astype(np.float32), gripper_qpos=ep.gripper_qpos.astype(np.float32),
                actions=ep.actions.astype(np.float32), done=ep.done.astype(bool), **wrist,
            )
    return path


EPISODE_KEYS = ("format_version", "meta", "jpeg", "jpeg_offsets", "eef_pos", "eef_quat", "gripper_qpos", "actions", "done")


def load_episode(path: str | Path) -> Episode:
    """Read an episode written by `save_episode` (any format_version up to the current one).

    Raises:
        FileNotFoundError: no file at `path`.
        ValueError: the file is not an episode (not an .npz, truncated, or an .npz without the episode arrays),
            or is from a newer, unknown format version; the message names the file.
    """
    path = Path(path)
    if not path.is_file():
        hint = f"; episodes in it: list_episodes({str(path)!r})" if path.is_dir() else ""
        raise FileNotFoundError(f"no episode file {path}{hint}")
    what = f"{path} is not a dcvla episode (an .npz written by save_episode)"
    if not zipfile.is_zipfile(path):  # numpy would speak of pickled data, or return a bare .npy array
        raise ValueError(f"{what}: it is not an .npz (zip) archive: truncated, or another format")
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = [k for k in EPISODE_KEYS if k not in z.files]
            if missing:
                raise ValueError(f"{what}: it has no {', '.join(missing)} (it has: {', '.join(z.files) or 'nothing'})")
            version = int(z["format_version"])
            if version > FORMAT_VERSION:
                raise ValueError(f"{path}: episode format_version {version} is newer than supported ({FORMAT_VERSION})")
            jpegs = _unpack(z["jpeg"], z["jpeg_offsets"])
            wrist = _unpack(z["wrist_jpeg"], z["wrist_jpeg_offsets"]) if "wrist_jpeg" in z.files else None
            if wrist is not None and len(wrist) != len(jpegs):
                raise ValueError(f"{path}: {len(wrist)} wrist frames for {len(jpegs)} agent-view frames")
            return Episode(jpegs=jpegs, eef_pos=z["eef_pos"], eef_quat=z["eef_quat"], gripper_qpos=z["gripper_qpos"],
                           actions=z["actions"], done=z["done"], meta=json.loads(str(z["meta"])), wrist_jpegs=wrist)
    except ValueError as err:
        if str(path) in str(err):
            raise
        raise ValueError(f"{what}: {type(err).__name__}: {err}") from err  # e.g. an array stored as objects
    except (OSError, EOFError, KeyError, zipfile.BadZipFile, zlib.error) as err:  # a damaged archive
        raise ValueError(f"{path}: the episode archive is damaged (truncated or corrupt): {type(err).__name__}: {err}") from err


def episode_path(out_dir: str | Path, suite: str, task_id: int, init_index: int) -> Path:
    """Canonical file name: `<out_dir>/<suite>_task<NN>_init<NN>.npz`."""
    return Path(out_dir) / f"{suite}_task{task_id:02d}_init{init_index:02d}.npz"


def demo_path(out_dir: str | Path, suite: str, task_id: int, placement_seed: int) -> Path:
    """A demonstration's file name: `<out_dir>/<suite>_task<NN>_seed<NNNN>.npz`."""
    return Path(out_dir) / f"{suite}_task{task_id:02d}_seed{placement_seed:04d}.npz"


def sample_init_state(env: Any, placement_seed: int) -> np.ndarray:
    """A fresh initial state from the simulator's own reset sampling (object placements drawn by the task's placement
    initializer), reproducible from `placement_seed`: never one of the benchmark's fixed init states, which the
    evaluation uses. The env's and numpy's generators are reseeded (robosuite's placement draws from numpy's)."""
    env.seed(placement_seed)
    np.random.seed(placement_seed)
    env.reset()
    return np.asarray(env.get_sim_state(), np.float64).copy()


def list_episodes(directory: str | Path = DEFAULT_DIR, suite: str | None = None) -> list[Path]:
    """Episode files under `directory` by name; of one suite, its trained task's (`DEMO_TASKS`) first."""
    first = f"{suite}_task{DEMO_TASKS[suite]:02d}_" if suite in DEMO_TASKS else "\0"  # the trained task's files
    paths = Path(directory).glob(f"{suite}_task*.npz" if suite else "*.npz")
    return sorted(paths, key=lambda p: (not p.name.startswith(first), p.name))


def load_episodes(directory: str | Path = DEFAULT_DIR, suite: str | None = None) -> list[Episode]:
    """Load every episode under `directory` (optionally of one suite)."""
    return [load_episode(p) for p in list_episodes(directory, suite)]


def record_episode(suite: str, task: int | str, init_index: int = 0, max_steps: int | None = None,
                   seed: int = protocol.SEED, env: Any = None, placement_seed: int | None = None,
                   action_noise: float = 0.0, finish: bool = False, oracle: Any = None) -> Episode:
    """Roll out the oracle on one task with rendering and capture what a policy would see.

    Args:
        suite, task: which task (`dcvla.libero.env.get_task` accepts an id or a name).
        init_index: which of the benchmark's fixed init states to start from.
        placement_seed: start instead from the simulator's own placement sampling with this seed
            (`sample_init_state`: a demonstration, away from the init states the benchmark evaluates on).
        max_steps: oracle step budget after the wait; defaults to the suite's protocol maximum.
        seed: numpy seed (protocol: 7); the env gets the protocol's env seed (0), as upstream.
        env: an env from `make_env(suite, task, cameras=CAMERAS)` to reuse (built and closed here when None).
        action_noise: the stationary standard deviation (action units) of the DART perturbation of the executed
            translation (`oracle.PositionNoise`, seeded like the placement); the episode keeps the oracle's actions.
        finish: the oracle lowers, releases and retreats after success; the goal must hold at the end (`run_oracle`).
        oracle: the `Oracle` to run, its options set (default `Oracle()`); the meta keeps its `options()`.

    Returns:
        The Episode (not yet saved). `meta["success"]` says whether the env reported `done`.
    """
    from .env import close_env, get_task, make_env
    from .oracle import Oracle, run_oracle

    info = get_task(suite, task)
    np.random.seed(seed)
    own = env is None
    env = env if env is not None else make_env(suite, info.task_id, resolution=protocol.RENDER_RESOLUTION,
                                               seed=protocol.ENV_SEED, cameras=CAMERAS)
    capture, oracle = _Capture(), oracle or Oracle()
    t0 = time.perf_counter()
    try:
        init_state, noise = _start(env, suite, info.task_id, init_index, placement_seed, seed, action_noise)
        with _timed_render(env) as render_s:
            result = run_oracle(env, init_state, max_steps or protocol.max_steps(suite), wait_steps=protocol.WAIT_STEPS,
                                on_step=capture.on_step, noise=noise, finish=finish, oracle=oracle)
    finally:
        if own:
            close_env(env)
    wall, n = time.perf_counter() - t0, len(capture.jpegs)
    meta = dict(suite=suite, task_id=info.task_id, task_name=info.name, instruction=info.instruction,
                init_state_index=-1 if placement_seed is not None else int(init_index), placement_seed=placement_seed,
                seed=int(seed), env_seed=protocol.ENV_SEED if placement_seed is None else int(placement_seed),
                success=bool(result["success"]), n_steps=n, action_noise=float(action_noise), wait_steps=protocol.WAIT_STEPS,
                success_step=result["success_step"], finish=int(finish), **oracle.options(),
                render_ms=1000 * float(np.mean(render_s)) if render_s else float("nan"),
                step_ms=1000 * wall / max(n + protocol.WAIT_STEPS, 1), jpeg_quality=protocol.JPEG_QUALITY,
                render_resolution=protocol.RENDER_RESOLUTION)
    return capture.episode(meta)


def _start(env: Any, suite: str, task_id: int, init_index: int, placement_seed: int | None, seed: int,
           action_noise: float) -> tuple[np.ndarray, Any]:
    """The benchmark's init state `init_index` or the simulator's placement under `placement_seed` (numpy reseeded
    with `seed` after, so the rollout draws as an official one does), and the `oracle.PositionNoise` of
    `action_noise` seeded by the same number (None when 0)."""
    from .env import get_init_state
    from .oracle import PositionNoise

    start = init_index if placement_seed is None else placement_seed
    noise = PositionNoise(action_noise, seed=start) if action_noise else None
    if placement_seed is None:
        return get_init_state(suite, task_id, init_index), noise
    init_state = sample_init_state(env, placement_seed)
    np.random.seed(seed)
    return init_state, noise


@contextlib.contextmanager
def _timed_render(env: Any) -> Iterator[list[float]]:
    """Time the camera render alone, separate from physics: yields the list the render times go into. Patched on
    the class because a hard reset replaces the env's sim object; restored on exit."""
    sim_cls = type(env.env.sim)
    render_s: list[float] = []
    original_render = sim_cls.render

    def timed_render(self, *args, **kwargs):
        t0 = time.perf_counter()
        out = original_render(self, *args, **kwargs)
        render_s.append(time.perf_counter() - t0)
        return out

    sim_cls.render = timed_render
    try:
        yield render_s
    finally:
        sim_cls.render = original_render


@dataclass
class _Capture:
    """What the oracle's rollout shows a policy, step by step: the frame (as the pipeline's JPEG) and the state."""

    jpegs: list[bytes] = field(default_factory=list)
    wrist_jpegs: list[bytes] = field(default_factory=list)
    eef_pos: list = field(default_factory=list)
    eef_quat: list = field(default_factory=list)
    gripper_qpos: list = field(default_factory=list)
    actions: list = field(default_factory=list)
    done: list = field(default_factory=list)

    def on_step(self, obs: dict, action: np.ndarray, done: bool) -> None:
        self.jpegs.append(protocol.encode_frame(obs["agentview_image"]))
        if "robot0_eye_in_hand_image" in obs:  # rotated like the agent view (OpenVLA-OFT's get_libero_wrist_image)
            self.wrist_jpegs.append(protocol.encode_frame(obs["robot0_eye_in_hand_image"]))
        self.eef_pos.append(obs["robot0_eef_pos"])
        self.eef_quat.append(obs["robot0_eef_quat"])
        self.gripper_qpos.append(obs["robot0_gripper_qpos"])
        self.actions.append(action)
        self.done.append(done)

    def episode(self, meta: dict) -> Episode:
        n = len(self.jpegs)
        return Episode(jpegs=self.jpegs, eef_pos=np.array(self.eef_pos).reshape(n, 3),
                       eef_quat=np.array(self.eef_quat).reshape(n, 4),
                       gripper_qpos=np.array(self.gripper_qpos).reshape(n, 2),
                       actions=np.array(self.actions).reshape(n, 7), done=np.array(self.done, dtype=bool), meta=meta,
                       wrist_jpegs=self.wrist_jpegs if len(self.wrist_jpegs) == n and n else None)


def replay(policy: Any, episode: Episode, center_crop: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Run a policy open-loop over an episode's frames, so every method sees exactly the same frames.

    Policies with `uses_state = True` also get the frame's robot state (`episode.states[i]`, [8] float32)
    as a third argument; policies with `uses_wrist = True` get [agent view, wrist view] as the first (the
    episode must have the wrist camera). A policy that returns an action chunk [horizon, 7] is still called on
    every frame (open loop has no plan to follow); the chunk's first row is recorded as that frame's action.

    Args:
        policy: object with `reset()` and `step(image uint8 [224,224,3], instruction) -> [7]`, or, with
            `uses_state = True`, `step(image, instruction, state [8]) -> [7] or [horizon, 7]`.
        episode: a recorded Episode.
        center_crop: apply the protocol's policy-time center crop (the LIBERO fine-tunes expect it).

    Returns:
        (actions [n_frames, 7] float32 as returned by the policy, un-postprocessed (first row of a chunk);
         latency_s [n_frames] float64 wall seconds per `policy.step`).
    """
    policy.reset()
    views = [episode.frames] + ([episode.wrist_frames] if getattr(policy, "uses_wrist", False) else [])
    states = episode.states if getattr(policy, "uses_state", False) else None
    actions = np.zeros((len(episode), 7), dtype=np.float32)
    latency = np.zeros(len(episode), dtype=np.float64)
    for i in range(len(episode)):
        images = [protocol.policy_input(view[i], crop=center_crop) for view in views]
        args = (images if len(images) > 1 else images[0], episode.instruction) + (() if states is None else (states[i],))
        t0 = time.perf_counter()
        raw = policy.step(*args)
        actions[i] = protocol.action_chunk(raw)[0]  # inside the timing, as before: may sync a device array
        latency[i] = time.perf_counter() - t0
    return actions, latency


def replay_many(policy: Any, episodes: Iterable[Episode], center_crop: bool = True) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """`replay` over several episodes, keyed by `Episode.name`."""
    return {ep.name: replay(policy, ep, center_crop) for ep in episodes}
