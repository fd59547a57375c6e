"""What every study shares: the config, the policies and episodes, the recorded runs, tables and figures.

A study records (method, episode) runs with the family's recorder, each to its own netCDF file under
`<runs_dir>/<study>/<method>/<suite>_task<NN>_init<NN>.nc` (resumable: complete files are kept), then reduces
the datasets to tables. A notebook's `parameters` cell mirrors its study's config (`StudyConfig`, or the study's
own: `libero_benchmark.BenchmarkConfig`, `stability_cliff.CliffConfig`) plus the study's own knobs.
"""

from __future__ import annotations

import json
import numbers
import time
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import pandas as pd
import xarray as xr

from ..devices import parse_dtype
from ..io import open_recording, write_dataset
from ..libero.env import SUITES as LIBERO_SUITES
from ..libero.episodes import DEFAULT_DIR, DEMO_TASKS, Episode, list_episodes, load_episode
from ..libero.protocol import policy_input
from ..openvla import METHODS, CacheConfig
from ..openvla.cache_policy import CachePolicyBase
from ..openvla.loading import check_preset, vanilla_policy
from ..openvla.record import action_kl
from ..recording import record_episode
from ..units import Unit, make_unit, run_units
from .micro import resolve_micro, shipped_checkpoints

SUITES = ("libero_spatial", "libero_object", "libero_goal", "libero_10")
PAPER_METHODS = ("vanilla", "vla_cache", "ttf", "ttf_vla_cache", "dual_cache")


def conforms(value, hint) -> bool:
    """`value` fits a config field's declared type: an int (not a bool) for int, any real number for float, True or
    False for bool, a str for str, a list (or tuple) of such for list[...]; other hints accept anything."""
    if typing.get_origin(hint) is list:
        (item,) = typing.get_args(hint) or (typing.Any,)
        return isinstance(value, (list, tuple)) and all(conforms(v, item) for v in value)
    if hint is bool:
        return isinstance(value, (bool, np.bool_))
    if hint is int:
        return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))
    if hint is float:
        return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))
    if hint is str:
        return isinstance(value, str)
    return True


def describe(hint) -> str:
    """A config field's type in words, for error messages."""
    if typing.get_origin(hint) is list:
        (item,) = typing.get_args(hint) or (typing.Any,)
        return "a list of " + {bool: "True/False", int: "ints", float: "numbers", str: "str"}.get(item, str(item))
    return {bool: "True or False", int: "an int", float: "a number", str: "a str"}.get(hint, str(hint))


class Parameters:
    """A study config built from a notebook's globals (its papermill `parameters` cell mirrors the fields)."""

    @classmethod
    def from_parameters(cls, namespace: dict):
        """Build from a notebook's globals: every field found there."""
        return cls(**{f.name: namespace[f.name] for f in fields(cls) if f.name in namespace})

    def check_types(self) -> None:
        """A ValueError naming the first field whose value is not of its declared type (`conforms`): a string for
        `frames` or a bare name for a list field would otherwise fail later, far from the cause, or be read letter
        by letter. A tuple given for a list field becomes a list."""
        hints = typing.get_type_hints(type(self))
        for f in fields(self):
            value, hint = getattr(self, f.name), hints.get(f.name)
            if not conforms(value, hint):
                raise ValueError(f"{type(self).__name__}.{f.name} must be {describe(hint)}, got {value!r} "
                                 f"({type(value).__name__})")
            if typing.get_origin(hint) is list and isinstance(value, tuple):
                setattr(self, f.name, list(value))


def check_device(device: str, what: str) -> None:
    """A ValueError naming `what` when `device` is not a torch device string, or names an accelerator this machine
    does not have (found here rather than when the model is moved, after the episodes are loaded)."""
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"{what}: {device!r} is not a torch device (e.g. 'cpu', 'cuda', 'cuda:1')") from None
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"{what}: {device!r}, but torch sees no CUDA device on this machine; use 'cpu'")
        if dev.index is not None and dev.index >= count:
            raise ValueError(f"{what}: {device!r}, but this machine has {count} CUDA device(s): cuda:0..cuda:{count - 1}")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"{what}: {device!r}, but torch has no MPS device on this machine; use 'cpu'")


def check_suites(owner: str, suites: list[str], episodes_dir: str) -> None:
    """The shipped suites, or with `episodes_dir` any LIBERO suite that folder holds episodes of (naming the folder
    and the suites it has otherwise)."""
    if not episodes_dir:
        check_names(f"{owner}.suites", suites, SUITES, "shipped suites (or give episodes_dir)")
        return
    folder = Path(episodes_dir)
    if not folder.is_dir():
        raise ValueError(f"{owner}.episodes_dir: {folder} is not a folder")
    check_names(f"{owner}.suites", suites, LIBERO_SUITES, "LIBERO suites")
    have = sorted({p.name.split("_task")[0] for p in list_episodes(folder)})
    empty = [s for s in suites if not list_episodes(folder, suite=s)]
    if empty:
        raise ValueError(f"{owner}.suites: no episodes of {empty} in {folder} (it has {', '.join(have) or 'none'})")


def check_names(owner: str, values: list[str], known: tuple[str, ...] | dict, what: str) -> None:
    """A ValueError naming the unknown entries of a config list field (`owner` is `Class.field`)."""
    unknown = [v for v in values if v not in known]
    if unknown:
        raise ValueError(f"{owner}: unknown {unknown}; {what}: {', '.join(known)}")


@dataclass
class PolicyParameters(Parameters):
    """Which OpenVLA-family model a study runs (OpenVLA or OpenVLA-OFT): a checkpoint, or a random preset; where and
    in which dtype."""

    preset: str = "small"                # model preset (random weights) unless `checkpoint` is given; OpenVLA-OFT:
                                         # oft-small, oft-tiny, oft-micro, openvla-oft-7b; or a shipped micro policy by name
                                         # ("openvla-micro-goal": trained weights)
    checkpoint: str = ""                 # OpenVLA or OpenVLA-OFT checkpoint directory or hub id ("" = random preset),
                                         # or a shipped micro policy by name ("openvla-micro")
    unnorm_key: str = ""                 # dataset statistics for a checkpoint ("" = its only one)
    seed: int = 0                        # weights seed of a random preset
    device: str = "cpu"                  # "cuda" on a GPU machine
    dtype: str = "float32"               # "bfloat16" for openvla-7b on a GPU

    def check_model(self) -> None:
        """The preset (unless a checkpoint is given), the dtype and the device: a typo fails when the config is
        built, naming the field, not when the model is built or moved."""
        owner = type(self).__name__
        if not self.trained():
            try:
                check_preset(self.preset)
            except ValueError as err:
                raise ValueError(f"{owner}.preset: {err}, or a shipped micro policy: "
                                 f"{', '.join(shipped_checkpoints('openvla'))} (or give checkpoint=)") from None
        parse_dtype(self.dtype, f"{owner}.dtype")
        check_device(self.device, f"{owner}.device")

    def trained(self) -> str:
        """The trained weights the study runs: `checkpoint`, else a shipped micro policy `preset` names
        ("openvla-micro-goal"); "" for the random weights of a preset."""
        return self.checkpoint or (self.preset if self.preset in shipped_checkpoints("openvla") else "")

    def model_name(self) -> str:
        """The checkpoint's name, or "<preset> preset" (random weights)."""
        return Path(self.trained()).name if self.trained() else f"{self.preset} preset"


@dataclass
class StudyConfig(PolicyParameters):
    """The parameters the recorded OpenVLA studies share; a notebook's parameters cell has these names."""

    methods: list[str] = field(default_factory=lambda: list(PAPER_METHODS))
    suites: list[str] = field(default_factory=lambda: list(SUITES))
    episodes_per_suite: int = 0          # episodes per suite (0 = all)
    episodes_dir: str = ""               # a folder of recorded episodes ("" = the shipped ones)
    frames: int = 12                     # frames per episode from its start (0 = the whole episode)
    drift: bool = False                  # shadow full recompute per frame (doubles the cost)
    runs_dir: str = "data/runs"
    figures_dir: str = "figures"

    def __post_init__(self) -> None:
        self.check_types()
        self.check_model()
        check_names("StudyConfig.methods", self.methods, METHODS, "known")
        check_suites("StudyConfig", self.suites, self.episodes_dir)
        if self.frames < 0 or self.episodes_per_suite < 0:
            raise ValueError(f"StudyConfig.frames and episodes_per_suite must be >= 0, got {self.frames}, {self.episodes_per_suite}")


def suite_tasks(suites: list[str], tasks: list[int]) -> list[tuple[str, int]]:
    """(suite, task) of closed-loop trials: `tasks` of every suite, or, when `tasks` is empty, each suite's trained
    task (`DEMO_TASKS`: the task of its first shipped episode, the one the micro policies learned)."""
    untrained = [suite for suite in suites if not tasks and suite not in DEMO_TASKS]
    if untrained:
        raise ValueError(f"no trained task in {untrained} (trained: {', '.join(DEMO_TASKS)}): name the task ids")
    return [(suite, task) for suite in suites for task in (tasks or [DEMO_TASKS[suite]])]


def base_policy(config: PolicyParameters) -> CachePolicyBase:
    """The vanilla policy whose model every method of a study shares (`with_config`): a checkpoint, or a random
    preset, on the configured device; `OFTCachedPolicy` for OpenVLA-OFT (`dcvla.openvla.loading`)."""
    return vanilla_policy(config.preset, resolve_micro(config.trained()), config.unnorm_key or None, config.seed,
                          parse_dtype(config.dtype, f"{type(config).__name__}.dtype"), config.device)


def episodes(config) -> list[Episode]:
    """The recorded episodes of the configured suites (`episodes_per_suite` of each, 0 = all): the shipped ones, or
    those of `episodes_dir` (a folder `scripts/record_episodes.py` or `dcvla.libero.record_episode` filled)."""
    per_suite = [list_episodes(config.episodes_dir or DEFAULT_DIR, suite=suite) for suite in config.suites]
    return [load_episode(p) for paths in per_suite for p in (paths[: config.episodes_per_suite] if config.episodes_per_suite else paths)]


def episode_frames(episode: Episode, frames: int) -> np.ndarray:
    """What the policy sees (center crop, as the LIBERO fine-tunes expect), the first `frames` of them."""
    chosen = episode.frames if frames == 0 else episode.frames[:frames]
    return np.stack([policy_input(f) for f in chosen])


def episode_inputs(policy, episode: Episode, frames: int) -> tuple[np.ndarray, np.ndarray | None]:
    """The first `frames` (0: all) of what `policy.step` takes per frame, as `record_episode` wants them: the agent
    view [frame, H, W, 3]; for a policy that takes the wrist camera too (OpenVLA-OFT) [frame, 2, H, W, 3] (agent view,
    wrist view, processed alike, as upstream's evaluation does), and the robot states [frame, 8] for one that takes
    the state.

    Raises:
        ValueError: the policy takes the wrist view and the episode has none (recorded before format version 2).
    """
    images = episode_frames(episode, frames)
    if getattr(policy, "uses_wrist", False):
        if not episode.has_wrist:
            raise ValueError(f"{type(policy).__name__} takes the wrist camera, but episode {episode.name} was recorded "
                             "without it (format_version 1); re-record it (scripts/record_episodes.py)")
        wrist = episode.wrist_frames if frames == 0 else episode.wrist_frames[:frames]
        images = np.stack([images, np.stack([policy_input(f) for f in wrist])], axis=1)
    states = episode.states[: len(images)] if getattr(policy, "uses_state", False) else None
    return images, states


def run_path(runs_dir: str | Path, study: str, method: str, episode: Episode, frames: int, tag: str = "") -> Path:
    """One run's file; the frame count is in the name, so a resumed study never reuses a shorter or longer run."""
    name = episode.name.replace("/", "_") + f"_f{frames or 'all'}" + (f"_{tag}" if tag else "")
    return Path(runs_dir) / study / method / f"{name}.nc"


def record_units(study: str, config: StudyConfig, cache_overrides: dict | None = None, tag: str = "") -> list[Unit]:
    """One unit per (method, episode) of `config`, carrying what a worker needs to record it: the method, the
    episode, the frames, the drift flag and the CacheConfig fields set for every method (a sweep point)."""
    overrides = json.dumps(cache_overrides or {}, sort_keys=True)
    return [make_unit(study, run_path(config.runs_dir, study, method, episode, config.frames, tag), method=method,
                      episode=episode.name, frames=config.frames, drift=config.drift, overrides=overrides, tag=tag)
            for method in config.methods for episode in episodes(config)]


class RecordWorker:
    """Records (method, episode) units in one process: the vanilla policy loaded once (or the one given)."""

    def __init__(self, config: StudyConfig, base: CachePolicyBase | None = None, progress: bool = True) -> None:
        self.config, self.base, self.progress = config, base, progress
        self.episodes = {episode.name: episode for episode in episodes(config)}

    def __call__(self, unit: Unit, path: Path) -> None:
        config = self.config
        self.base = self.base or base_policy(config)
        overrides = json.loads(unit.get("overrides"))
        policy = self.base.with_config(CacheConfig(method=unit.get("method"), unnorm_key=config.unnorm_key or None,
                                                   **overrides))
        episode = self.episodes[unit.get("episode")]
        if self.progress:
            print(f"[{unit.study}] {unit.get('method'):<14} {episode.name} {unit.get('tag')}", flush=True)
        labels = {"suite": episode.suite, "task": episode.task_id, "episode": episode.name, "study": unit.study,
                  "sweep": json.dumps(overrides)}
        images, states = episode_inputs(policy, episode, unit.get("frames"))
        record_episode(policy, images, episode.instruction, path, states, drift=unit.get("drift"), labels=labels)


def worker(config: dict) -> RecordWorker:
    """A worker for `dcvla.units` runners: the study's config as a dict, the policy loaded on the first unit."""
    return RecordWorker(StudyConfig(**config), progress=False)


def record_runs(study: str, config: StudyConfig, cache_overrides: dict | None = None, tag: str = "",
                base: CachePolicyBase | None = None, progress: bool = True) -> list[Path]:
    """Record every (method, episode) of `config` under the process's runner (`dcvla.units`: here, a shard, Ray);
    complete files are kept (resume).

    Args:
        study: the study's name (a folder under runs_dir).
        cache_overrides: CacheConfig fields to set for every method (a sweep point); `tag` names it in files.
        base: a loaded policy to share (its model and processor); built from `config` when None.
    """
    todo = record_units(study, config, cache_overrides, tag)
    return run_units(todo, (__name__, asdict(config)), work=lambda: RecordWorker(config, base, progress),
                     progress=progress)


def plan_of(units: list[Unit], config: StudyConfig) -> tuple[list[Unit], tuple[str, dict]]:
    """A recorded study's plan for `dcvla run --shard/--ray`: its units (each once, in order) and their worker."""
    return list(dict.fromkeys(units)), (__name__, asdict(config))


def load_runs(paths: list[Path]) -> list[xr.Dataset]:
    return [open_recording(p) for p in paths]


def by_episode(paths: list[Path]) -> dict[tuple[str, str], xr.Dataset]:
    """Recorded runs keyed by (method, episode)."""
    return {(ds.attrs["method"], str(ds.episode.item())): ds for ds in load_runs(paths)}



# ------------------------------------------------------------------------------- how far a run's actions moved
#: Per family, the divergence of a run's action output from a reference run on the same frames: OpenVLA's action
#: tokens are a distribution (KL over the 256 bins); OpenVLA-OFT regresses its chunk (mean |difference| of the
#: normalised chunk, the L1 head's own training loss).
DIVERGENCE = {"openvla": "action KL", "openvla-oft": "action L1"}


def divergence_name(ds: xr.Dataset) -> str:
    """The divergence column the run's family gets in study tables (`DIVERGENCE`)."""
    return DIVERGENCE[ds.attrs.get("family", "openvla")]


def divergence_column(table: pd.DataFrame) -> str:
    """The divergence column a study table holds (for plots that work on either family)."""
    found = [name for name in DIVERGENCE.values() if name in table]
    if len(found) != 1:
        raise ValueError(f"the table holds {found or 'none'} of the divergence columns {list(DIVERGENCE.values())}")
    return found[0]


def action_divergence(ds: xr.Dataset, reference: xr.Dataset) -> xr.DataArray:
    """Per frame (the frames both runs have): `divergence_name(ds)` of the run from `reference`."""
    if "action_logits" in ds:
        return action_kl(ds, reference)
    common = np.intersect1d(ds.frame.values, reference.frame.values)
    if common.size == 0:
        raise ValueError("action_divergence: the two runs share no frame")
    diff = np.abs(ds.action_normalized.sel(frame=common) - reference.action_normalized.sel(frame=common))
    return diff.mean(("chunk", "action_dim")).rename("action_l1")


def action_distance(ds: xr.Dataset, reference: xr.Dataset) -> np.ndarray:
    """Per frame: the L2 distance of the un-normalised actions (a chunk's: averaged over its steps)."""
    dist = np.linalg.norm(ds.action.values - reference.action.values, axis=-1)  # [frame] or [frame, chunk]
    return dist.reshape(len(dist), -1).mean(-1)


def config_json(config: StudyConfig) -> str:
    return json.dumps(asdict(config))


def find_cliff(table: pd.DataFrame, metric: str = "action KL") -> pd.DataFrame:
    """Per (parameter, method): the step between consecutive sweep values where `metric` rises the most, and
    that rise as a multiple of the median step (a cliff stands out; a slope does not; inf: one jump among flat
    steps; NaN: `metric` never changes over the sweep)."""
    rows = []
    for (parameter, method), group in table.groupby(["parameter", "method"]):
        group = group.sort_values("value")
        values, metric_values = group["value"].tolist(), group[metric].to_numpy()
        steps = np.diff(metric_values)
        if len(steps) == 0:
            continue
        i = int(np.argmax(np.abs(steps)))
        typical = float(np.median(np.abs(steps))) or float("nan")
        rows.append({"parameter": parameter, "method": method, "from": values[i], "to": values[i + 1],
                     f"{metric} before": metric_values[i], f"{metric} after": metric_values[i + 1],
                     "jump / median step": abs(steps[i]) / typical if typical == typical
                     else float("inf") if steps[i] else float("nan")})
    return pd.DataFrame(rows)


# ------------------------------------------------------------------------------------------------- figures
KALEIDO_TRIES = 3


def save_figure(fig, name: str, figures_dir: str | Path, width: int = 1000, height: int = 520) -> Path:
    """Write a plotly figure as PNG (kaleido + chromium) under figures_dir; returns the path.

    On a loaded machine kaleido sometimes calls into its page before the page's script has run and fails with
    "kaleido_scopes is not defined"; the export is then tried again (up to `KALEIDO_TRIES` times), and any other
    error, or the same one every time, is raised."""
    path = Path(figures_dir) / f"{name}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    for attempt in range(1, KALEIDO_TRIES + 1):
        try:
            fig.write_image(str(path), width=width, height=height, scale=1)
            return path
        except Exception as err:  # kaleido's JavascriptError comes from its browser driver's own module
            if "kaleido_scopes is not defined" not in str(err) or attempt == KALEIDO_TRIES:
                raise
            time.sleep(attempt)
    return path


def write_table(table: pd.DataFrame, name: str, config: StudyConfig) -> Path:
    """A study's table as a netCDF dataset under data/ (atomic), with the study config and the table's own attrs
    (e.g. "speed": how its speed columns were measured) in its attrs."""
    ds = xr.Dataset.from_dataframe(table.reset_index(drop=table.index.name is None))
    ds.attrs.update({**table.attrs, "study": name, "config": config_json(config)})
    return write_dataset(ds, Path(config.runs_dir).parent / f"{name}.nc")


