"""Recording a policy's run into labelled arrays: `with recorder_for(policy) as rec: ...; ds = rec.to_dataset()`.

A recorder attaches itself to a policy as its observer for the duration of the `with` block and is always
detached on exit, also after an exception. Per frame (a control step) it keeps the variable groups asked for
(`what`), with the dimension names of its family's `Schema`. With `path=` the frames stream to a netCDF file as
they come (nothing accumulates in memory) and the file appears, complete, only when the block exits cleanly: a
crash leaves no result file behind, and a clean exit with no frame recorded raises instead of writing nothing.
`record_episode` resumes: it keeps a complete file and records an unreadable or incomplete one again. With
`drift=True` a shadow pass of the same step with nothing reused gives the reference values; it doubles the cost.

This module is the lifecycle every family shares; a family's recorder subclasses `Recorder` (what one step gives
and how it is laid out) and registers itself for its policy type with `register_recorder`, so `recorder_for`
finds it without the engine importing any family.
"""

from __future__ import annotations

import functools
import json
import numbers
import subprocess
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
import xarray as xr

from . import __version__
from . import accessor  # noqa: F401  (registers ds.dcvla)
from .io import StreamWriter, label_coords
from .streaming import step_args

METRICS = ("cosine", "rel_l2")  # drift: cosine distance, relative L2 of used vs fresh values


@dataclass(frozen=True)
class Schema:
    """A family's recorded variables: each one's dims after `frame`, and the groups `what` selects."""

    variables: dict[str, tuple[str, ...]]
    groups: dict[str, tuple[str, ...]]
    patterns: dict[str, tuple[str, ...]] = field(default_factory=dict)  # name prefix -> dims (e.g. attention_l{i})

    def dims_of(self, name: str) -> tuple[str, ...]:
        if name == "time":
            return ()
        for prefix, dims in self.patterns.items():
            if name.startswith(prefix):
                return dims
        return self.variables[name]


_RECORDERS: dict[type, type["Recorder"]] = {}


def register_recorder(policy_type: type) -> Callable[[type["Recorder"]], type["Recorder"]]:
    """Class decorator: the decorated recorder records policies of `policy_type` (and its subclasses)."""

    def register(recorder: type[Recorder]) -> type[Recorder]:
        _RECORDERS[policy_type] = recorder
        return recorder

    return register


def recorder_for(policy, **kwargs) -> "Recorder":
    """The recorder registered for the policy's type, built with `kwargs` (see that family's recorder)."""
    for cls in type(policy).__mro__:
        if cls in _RECORDERS:
            return _RECORDERS[cls](policy, **kwargs)
    known = ", ".join(t.__name__ for t in _RECORDERS) or "none"
    raise TypeError(f"no recorder is registered for {type(policy).__name__}; registered policy types: {known}")


@functools.cache  # one subprocess per process, not per recorded episode
def git_revision() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


class Recorder:
    """The recording lifecycle. Subclasses set `schema`, `default_what` and `drift_note`, and implement
    `frame_arrays(record)`, `drift_arrays(record)`, `sizes()` and `coords()`.

    Args:
        policy: the policy to observe.
        what: variable groups to record (`schema.groups`; unknown names raise; None: `default_what`).
        drift: run a shadow pass with nothing reused per step, for the drift variables.
        path: stream frames to this netCDF file (written atomically on exit); None keeps them in memory.
        labels: scalar coordinates of the run (suite, task, episode, seed, ...), kept in the attrs too.
        control_hz: steps per second, for the frame `time` coordinate (LIBERO: 20 Hz).
    """

    schema: Schema
    default_what: tuple[str, ...] = ()
    drift_note: str = "a shadow pass with nothing reused, per step (doubles the cost)"

    def __init__(self, policy, what: Iterable[str] | None = None, drift: bool = False, path: str | Path | None = None,
                 labels: dict | None = None, control_hz: float = 20.0) -> None:
        if isinstance(what, str):  # tuple("actions") would be its letters
            raise ValueError(f"what must be a list of variable groups, got the str {what!r}; e.g. what=[{what!r}]")
        if labels is not None and not isinstance(labels, dict):
            raise ValueError(f"labels must be a dict of scalar labels (e.g. {{'suite': 'libero_10'}}), got {labels!r}")
        if not (isinstance(control_hz, numbers.Real) and control_hz > 0):
            raise ValueError(f"control_hz must be a positive number of steps per second, got {control_hz!r}")
        if path is not None and Path(path).is_dir():
            raise ValueError(f"path {path} is a directory; give the recording's file name (e.g. {Path(path) / 'run.nc'})")
        what = tuple(self.default_what if what is None else what)
        unknown = [w for w in what if w not in self.schema.groups]
        if unknown:
            raise ValueError(f"unknown recording variable(s) {unknown}; known: {', '.join(self.schema.groups)}")
        self.policy, self.what, self.drift, self.path = policy, what, drift, Path(path) if path else None
        self.control_hz = control_hz
        self.attrs = {
            "method": policy.name, "preset": policy.model.config.name,
            "config": json.dumps(vars(policy.config), default=list),
            "recorded": json.dumps(list(what)), "drift_recorded": int(drift),
            "drift_note": self.drift_note if drift else "drift not recorded (drift=True runs a shadow pass per step)",
            "dcvla_version": __version__, "git_revision": git_revision(), "control_hz": control_hz,
            "label_coords": json.dumps(sorted(labels or {})), **(labels or {}),
        }
        self._frames: list[dict[str, np.ndarray]] = []
        self._writer: StreamWriter | None = None
        self._kept_records: bool | None = None

    # ------------------------------------------------------------------------------------------- attach/detach
    def __enter__(self) -> "Recorder":
        if self.policy.observer is not None:
            raise RuntimeError("this policy already has a recorder attached")
        self.policy.observer = self
        self._attach()
        if self.path is not None:  # streamed: the policy need not keep every step's record in memory meanwhile
            self._kept_records, self.policy.keep_records = self.policy.keep_records, False
            self._writer = StreamWriter(self.path, self.sizes(), self.attrs, self.coords(), self.schema.dims_of)
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        self.policy.observer = None
        self._detach()
        if self._kept_records is not None:
            self.policy.keep_records, self._kept_records = self._kept_records, None
        if self._writer is not None:
            self._writer.close(commit=exc_type is None)  # a clean exit with no frame raises: no file is written
        return False

    def _attach(self) -> None:
        """Ask the policy for anything extra the recording needs (default: nothing)."""

    def _detach(self) -> None:
        """Undo `_attach`."""

    # --------------------------------------------------------------------------------------- policy callback
    def on_layer(self, component: str, layer: int, rows: torch.Tensor, q: torch.Tensor, keys: torch.Tensor,
                 values: torch.Tensor) -> None:
        """Per-layer values as used; a family that records drift from them overrides this."""

    def on_step(self, record) -> None:
        frame = self.frame_arrays(record)
        if self.drift:
            frame |= self.drift_arrays(record)
        if self._writer is not None:
            self._writer.append(frame)
        else:
            self._frames.append(frame)

    # -------------------------------------------------------------------------------------- the family's part
    def frame_arrays(self, record) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def drift_arrays(self, record) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def sizes(self) -> dict[str, int]:
        """Sizes of the fixed dims (every dim but frame)."""
        raise NotImplementedError

    def coords(self) -> dict[str, np.ndarray]:
        """Label coordinates of the fixed dims."""
        raise NotImplementedError

    # ------------------------------------------------------------------------------------------------ output
    def to_dataset(self) -> xr.Dataset:
        """The frames recorded so far (in-memory mode), with coordinates and attrs."""
        if self._writer is not None:
            raise RuntimeError(f"frames were streamed to {self.path}; open it with dcvla.io.open_recording")
        return frames_to_dataset(self._frames, self.attrs, self.coords(), self.schema)


def distances(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    """[head, token, head_dim] pairs -> [token, metric]: cosine distance and relative L2 over all heads."""
    a, b = a.float().transpose(0, 1).flatten(1), b.float().transpose(0, 1).flatten(1)  # [token, head * head_dim]
    same = (a == b).all(dim=-1)  # identical values are exactly 0 apart (1 - cos would leave rounding noise)
    cos = torch.where(same, 0.0, 1 - torch.nn.functional.cosine_similarity(a, b, dim=-1))
    rel = torch.where(same, 0.0, (a - b).norm(dim=-1) / b.norm(dim=-1).clamp_min(1e-12))
    return torch.stack([cos, rel], dim=-1).cpu().numpy()


def frames_to_dataset(frames: list[dict[str, np.ndarray]], attrs: dict, fixed_coords: dict[str, np.ndarray],
                      schema: Schema) -> xr.Dataset:
    """Stack per-frame arrays into a Dataset with the schema's dims and label coordinates."""
    if not frames:
        raise ValueError("nothing was recorded: the policy took no step inside the Recorder block")
    per_frame = [name for name in frames[0] if name not in ("frame", "time")]
    data_vars = {name: (("frame", *schema.dims_of(name)), np.stack([f[name] for f in frames])) for name in per_frame}
    used_dims = {d for dims, _ in data_vars.values() for d in dims}
    coords = {k: v for k, v in fixed_coords.items() if k in used_dims}
    coords["frame"] = np.array([int(f["frame"]) for f in frames])
    coords["time"] = ("frame", np.array([float(f["time"]) for f in frames]))
    return label_coords(xr.Dataset(data_vars, coords=coords, attrs=attrs))


def recording_problem(path: Path, frames: int) -> str | None:
    """Why the recording at `path` is not a complete recording of `frames` frames (None: it is), found cheaply:
    the file opens as netCDF (HDF5 checks a truncated file's length on open), its `frame` index reads back, and
    it holds `frames` frames, as its `frames_expected` attribute (written by `record_episode`) says too."""
    try:
        with xr.open_dataset(path, engine="h5netcdf") as ds:
            if "frame" not in ds.variables:
                return "it has no frame index (not a dcvla recording?)"
            held = len(ds["frame"].values)  # reads the index: a file cut inside its data fails here
            expected = ds.attrs.get("frames_expected")
    except (OSError, ValueError, KeyError, TypeError) as err:
        return f"it cannot be read ({type(err).__name__}: {err})"
    if expected is not None and int(expected) != held:
        return f"it holds {held} of the {int(expected)} frames it was started with"
    if held != frames:
        return f"it holds {held} frames, not the {frames} asked for"
    return None


def record_episode(policy, frames: np.ndarray, instruction: str, path: str | Path, states: np.ndarray | None = None,
                   **kwargs) -> Path:
    """Record one episode to `path` (streamed, atomic) with the policy's registered recorder; a complete file
    already there is kept (resume), an unreadable or incomplete one is recorded again, with a warning naming it.

    `frames`: [frame, H, W, 3]; for a policy that takes the wrist camera too (`uses_wrist`, OpenVLA-OFT)
    [frame, 2, H, W, 3], agent view then wrist view. `states` [frame, state_dim]: the robot state per frame, for
    policies that take it (`uses_state`).

    Raises:
        ValueError: no frames (nothing would be written to `path`), or a state count that does not match.
    """
    path = Path(path)
    if len(frames) == 0:
        raise ValueError(f"record_episode: no frames to record, so {path} would not be written; pass at least one frame")
    if path.is_file():  # (a directory there fails in the recorder, naming it)
        problem = recording_problem(path, len(frames))
        if problem is None:
            return path
        # A resumable study re-records a damaged run instead of stopping: the file holds nothing that the frames
        # and the policy cannot recompute, and stopping would make the researcher delete it by hand to go on. The
        # atomic write below replaces it; the warning says which file was redone and why.
        warnings.warn(f"{path} is not a complete recording ({problem}); recording it again", RuntimeWarning, stacklevel=2)
    steps = step_args(policy, frames, instruction, states)
    policy.reset()
    recorder = recorder_for(policy, path=path, **kwargs)
    recorder.attrs["frames_expected"] = len(frames)  # what a resumed run checks the file against
    with recorder:
        for args in steps:
            policy.step(*args)
    return path
