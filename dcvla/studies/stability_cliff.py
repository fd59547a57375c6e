"""The stability cliff study on the flow-matching VLAs (pi0, pi0.5, SmolVLA): K/V reuse across inferences under each
mode and gate, swept over the gate's parameter (a cosine threshold, a cache interval, a pixel-change bound), against
the no-reuse run (for SmolVLA, lerobot's within-call prefix cache: the prefix computed once per inference)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import xarray as xr

from ..devices import parse_dtype, place, resolve_checkpoint_dir
from ..flow_policy import FlowPolicy
from ..io import open_recording
from ..lerobot_checkpoint import read_lerobot_config
from ..libero.episodes import Episode
from ..libero.protocol import policy_input
from ..pi0 import Pi0Policy
from ..prefix_reuse import MODES, ReuseConfig
from ..smolvla import SmolVLAPolicy
from ..recording import record_episode
from ..units import Unit, make_unit, run_units
from .cliff_config import (AUTO_TRIALS, CLIFF_MODES, CLIFF_THRESHOLDS, EXTRA_GATES, FLOW_PRESETS,  # noqa: F401 (API)
                           GATE_PARAMETER, CliffConfig, own_gate_runs, run_label)
from .common import episodes, find_cliff, suite_tasks
from .micro import resolve_micro
from .speed import COLUMNS as SPEED_COLUMNS
from .speed import is_timing, load_timings, speed_note, speed_table, time_episode, timing_unit

STUDY = "stability_cliff"
Key = tuple[str, str, float | None, str]  # (mode, gate, value, episode); the reference: ("none", "", None, episode)

def checkpoint_policy(path: str) -> type[FlowPolicy]:
    """The family of a lerobot checkpoint, by the `type` its `config.json` names (smolvla; pi0 / pi05 otherwise)."""
    kind = read_lerobot_config(resolve_checkpoint_dir(path)).get("type")
    return SmolVLAPolicy if kind == "smolvla" else Pi0Policy


def pi0_base(config: CliffConfig) -> FlowPolicy:
    """The no-reuse policy whose model every mode shares: a checkpoint (or a shipped micro policy), or the random
    weights of the preset."""
    dtype = parse_dtype(config.dtype, "CliffConfig.dtype")
    none = ReuseConfig(mode="none", replan_steps=config.replan_steps)
    if config.trained():
        path = str(resolve_micro(config.trained()))
        return checkpoint_policy(path).from_pretrained(
            path, none, dtype=dtype, device=config.device, tokenizer=config.tokenizer or None,
            seed=config.seed)
    preset = config.pi0_preset()
    policy = FLOW_PRESETS[preset].from_preset(preset, seed=config.seed, config=none)
    place(policy.model, config.device, dtype)  # RoPE's inverse frequencies stay float32
    return policy


def pi0_episode_inputs(episode: Episode, steps: int, replan_steps: int) -> tuple[np.ndarray, np.ndarray]:
    """The images and robot states the policy sees at each inference: every `replan_steps`-th frame from the start,
    `steps` of them, [inference, camera (agent view, wrist view), 224, 224, 3] resized without the OpenVLA center
    crop (openpi resizes the whole view)."""
    index = np.arange(0, len(episode), replan_steps)[:steps]
    cameras = [episode.frames] + ([episode.wrist_frames] if episode.has_wrist else [])
    images = np.stack([np.stack([policy_input(frames[i], crop=False) for frames in cameras]) for i in index])
    return images, episode.states[index]


def cliff_run_path(config: CliffConfig, mode: str, gate: str, episode: Episode, value: float | None) -> Path:
    name = episode.name.replace("/", "_") + f"_s{config.steps}_r{config.replan_steps}_{config.compare_to}"
    tag = "" if value is None else f"_{gate}{value:g}"
    if gate == "phase_aware":
        tag += f"_p{config.phase_threshold:g}"
    return Path(config.runs_dir) / "stability_cliff" / config.model_name() / mode / f"{name}{tag}.nc"


def cliff_units(config: CliffConfig) -> list[Unit]:
    """One unit per (episode, mode, gate, value): the no-reuse reference, then `config.grid()`, episode by episode."""
    return [make_unit(STUDY, cliff_run_path(config, mode, gate, episode, value), mode=mode, gate=gate, value=value,
                      episode=episode.name) for episode in episodes(config) for mode, gate, value in cliff_keys(config)]


def cliff_keys(config: CliffConfig) -> list[tuple[str, str, float | None]]:
    """(mode, gate, value) of every run: the no-reuse reference, then `config.grid()`."""
    return [("none", "", None)] + config.grid()


def timing_units(config: CliffConfig) -> list[Unit]:
    """One unit per episode: every run of `cliff_keys` timed on the episode's inferences, interleaved (`speed`)."""
    names = [run_label(*key) for key in cliff_keys(config)]
    return [timing_unit(STUDY, cliff_run_path(config, "none", "", episode, None), names, episode=episode.name)
            for episode in episodes(config)]


def success_keys(config: CliffConfig) -> list[tuple[str, str, float | None]]:
    """(mode, gate, value) of every run that plays closed-loop trials: the reference and `success_runs` (all: [])."""
    return [key for key in cliff_keys(config)
            if key[0] == "none" or not config.success_runs or run_label(*key) in config.success_runs]


def success_units(config: CliffConfig) -> list[Unit]:
    """One unit per (mode, gate, value, suite, task, seed) of `success_keys`: `config.trials()` closed-loop trials
    into one result file."""
    from ..libero.evaluate import result_path  # the simulator's wrapper, not the simulator

    run_dir = Path(config.runs_dir) / "stability_cliff_success" / config.model_name()
    return [make_unit(STUDY, result_path(run_dir, run_label(m, g, v), suite, task, seed), trials=config.trials(),
                      mode=m, gate=g, value=v, suite=suite, task=task, seed=seed)
            for m, g, v in success_keys(config) for suite, task in suite_tasks(config.suites, config.success_tasks)
            for seed in config.success_seeds]


def plan(parameters: dict) -> tuple[list[Unit], tuple[str, dict]]:
    """Every unit the notebook runs with these parameters (the recordings, each episode's timing, then the trials),
    and their worker."""
    config = CliffConfig.from_parameters(parameters)
    trials = success_units(config) if config.trials() else []
    return cliff_units(config) + timing_units(config) + trials, (__name__, asdict(config))


class CliffWorker:
    """Runs stability_cliff units in one process: the no-reuse policy loaded once (or the one given), each
    episode's inputs warmed up on before its first recording here (pi0.5's prompt lengths change with the state:
    new shapes' first kernels would slow whichever run came first), the timing units (`speed`), the simulator
    built per task for trials."""

    def __init__(self, config: CliffConfig, base: FlowPolicy | None = None, progress: bool = True) -> None:
        self.config, self.base, self.progress = config, base, progress
        self.episodes = {episode.name: episode for episode in episodes(config)}
        self.warmed: set[str] = set()
        self._inputs: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # per episode: its frames decoded once, not per run

    def inputs(self, episode: Episode) -> tuple[np.ndarray, np.ndarray]:
        """The episode's (images, states) at the study's inferences (`pi0_episode_inputs`), decoded once."""
        if episode.name not in self._inputs:
            self._inputs[episode.name] = pi0_episode_inputs(episode, self.config.steps, self.config.replan_steps)
        return self._inputs[episode.name]

    def __call__(self, unit: Unit, path: Path) -> None:
        config = self.config
        self.base = self.base or pi0_base(config)
        if is_timing(unit):
            return self.time(unit, path)
        mode, gate, value = unit.get("mode"), unit.get("gate"), unit.get("value")
        policy = self.base.with_config(config.reuse_config(mode, gate, value))
        if unit.trials:
            from ..libero.evaluate import evaluate_task

            evaluate_task(policy, unit.get("suite"), unit.get("task"), "", method=run_label(mode, gate, value),
                          trials=unit.trials, max_steps=config.max_steps or None, center_crop=False, seed=unit.get("seed"),
                          progress=self.progress, path=path)
            return
        episode = self.episodes[unit.get("episode")]
        images, states = self.inputs(episode)
        if episode.name not in self.warmed:
            for image, state in zip(images, states):
                self.base.step(list(image), episode.instruction, state)
            self.base.reset()
            self.warmed.add(episode.name)
        if self.progress:
            print(f"[stability_cliff] {mode:<12} {gate:<12} {'' if value is None else value:<6} {episode.name}", flush=True)
        # frame f of the run is episode frame f * frame_stride, resized whole (explorer: the image the policy saw)
        labels = {"suite": episode.suite, "task": episode.task_id, "episode": episode.name, "study": STUDY,
                  "frame_stride": config.replan_steps, "center_crop": 0}
        record_episode(policy, images, episode.instruction, path, states=states, labels=labels,
                       control_hz=20.0 / config.replan_steps)

    def time(self, unit: Unit, path: Path) -> None:
        """Every run of the episode timed on its inferences, interleaved (the reference first)."""
        config, episode = self.config, self.episodes[unit.get("episode")]
        policies = {run_label(*key): self.base.with_config(config.reuse_config(*key)) for key in cliff_keys(config)}
        images, states = self.inputs(episode)
        labels = {"suite": episode.suite, "task": episode.task_id, "episode": episode.name, "study": STUDY,
                  "dtype": config.dtype}
        time_episode(policies, images, episode.instruction, states, config.device, path, labels)


def worker(config: dict) -> CliffWorker:
    """A worker for `dcvla.units` runners (a Ray actor's, a shard's): the config as a dict, the policy loaded on
    the first unit."""
    return CliffWorker(CliffConfig(**config), progress=False)


def record_cliff_runs(config: CliffConfig, base=None, progress: bool = True) -> dict[Key, Path]:
    """Record the no-reuse reference and every (mode, gate, value) of `config.grid()` on the configured episodes,
    under the process's runner (`dcvla.units`: here, a shard, Ray); complete units are kept (resume).

    Every run of an episode draws the same noise (the policy's seed), so a run's action drift against the
    reference run is exactly its drift against a no-reuse shadow pass of each inference (tests/test_pi0_record.py
    checks this), at half the cost. Returns {(mode, gate, value, episode): path}; the reference is
    ("none", "", None, episode).
    """
    todo = cliff_units(config)
    run_units(todo, (__name__, asdict(config)), work=lambda: CliffWorker(config, base, progress), progress=progress)
    return {(u.get("mode"), u.get("gate"), u.get("value"), u.get("episode")): Path(u.path) for u in todo}


def time_cliff_runs(config: CliffConfig, base=None, progress: bool = True) -> list[xr.Dataset]:
    """Run the timing units of `config` (one per episode, every run interleaved) under the process's runner
    (complete ones are kept) and open them."""
    todo = timing_units(config)
    run_units(todo, (__name__, asdict(config)), work=lambda: CliffWorker(config, base, progress), progress=progress)
    return load_timings(todo)


def load_cliff_runs(paths: dict[Key, Path]) -> dict[Key, xr.Dataset]:
    """`record_cliff_runs`' files, opened once, under the same keys."""
    return {key: open_recording(p) for key, p in paths.items()}


def cliff_table(runs: dict[Key, xr.Dataset], timings: list[xr.Dataset]) -> pd.DataFrame:
    """Per (mode, gate, value): reuse rate (share of inferences whose gate opened), K/V reuse (share of the prefix's
    token-layer K/V reused, "KV reuse"), the speed columns from the interleaved timings (`speed.speed_table`:
    median over inferences of the paired no-reuse/run latency, the ratio of total times, the median ms and its Hz;
    how they were measured is in `attrs["speed"]`), the FLOPs ratio against the no-reuse reference, the action
    drift to the reference (mean L2 per action over chunk and inferences; also its max) and the drift per reuse
    (action drift / reuse rate: what one reusing inference costs). The recordings' own latencies (each run alone,
    one after another) give no column."""
    rows = []
    for (mode, gate, value, episode), ds in runs.items():
        if mode == "none":
            continue
        ref = runs[("none", "", None, episode)]
        drift = np.linalg.norm(ds.action.values - ref.action.values, axis=-1).mean(-1)  # [frame]
        rows.append({"mode": mode, "gate": gate, "value": value, "episode": episode,
                     "reuse rate": float(ds.gate.mean()), "KV reuse": float(ds.reuse_fraction.mean()),
                     "flops": float(ds.flops.sum()), "reference flops": float(ref.flops.sum()),
                     "action drift": float(drift.mean()), "max action drift": float(drift.max()),
                     "vision staleness": float(ds.staleness.sel(span="vision").mean()), "steps": ds.sizes["frame"]})
    table = pd.DataFrame(rows).groupby(["mode", "gate", "value"], as_index=False).agg(
        {"reuse rate": "mean", "KV reuse": "mean", "flops": "sum", "reference flops": "sum", "action drift": "mean",
         "max action drift": "max", "vision staleness": "mean", "steps": "sum"})
    speed = speed_table(timings, "none")
    labels = [run_label(m, g, v) for m, g, v in zip(table["mode"], table["gate"], table["value"])]
    untimed = sorted(set(labels) - set(speed.index))
    if untimed:
        raise ValueError(f"cliff_table: the timings hold no {untimed[:3]}{' ...' if len(untimed) > 3 else ''}")
    for column in SPEED_COLUMNS:
        table[column] = speed.loc[labels, column].to_numpy()
    table["FLOPs ratio"] = table["reference flops"] / table["flops"]
    table["drift per reuse"] = table["action drift"] / table["reuse rate"].replace(0, np.nan)
    table = table.drop(columns=["flops", "reference flops"])
    table.attrs["speed"] = speed_note(timings, "none")
    return table


def locate_cliff(table: pd.DataFrame, metric: str = "action drift") -> pd.DataFrame:
    """Per (gate, mode): the step between consecutive values of the gate's parameter where `metric` jumps the most
    (find_cliff's rule), with the jump as a multiple of the median step."""
    cliffs = find_cliff(table.rename(columns={"mode": "method", "gate": "parameter"}), metric)
    return cliffs.rename(columns={"method": "mode", "parameter": "gate", f"{metric} before": f"{metric} at from",
                                  f"{metric} after": f"{metric} at to"})


def consistency_vs_freshness(table: pd.DataFrame, consistent: str = "full", fresh: str = "vision_only") -> pd.DataFrame:
    """H4 on pi0 / pi0.5: at each cosine threshold (the same gate, so the same reuse rate under compare_to
    "previous"), the drift of reusing every span together vs reusing vision with a freshly computed text and state."""
    cosine = table[table["gate"] == "cosine"]
    a = cosine[cosine["mode"] == consistent].set_index("value").rename_axis("threshold")
    b = cosine[cosine["mode"] == fresh].set_index("value").rename_axis("threshold")
    common = a.index.intersection(b.index)
    out = pd.DataFrame({
        f"reuse rate {consistent}": a.loc[common, "reuse rate"], f"reuse rate {fresh}": b.loc[common, "reuse rate"],
        f"drift {consistent}": a.loc[common, "action drift"], f"drift {fresh}": b.loc[common, "action drift"],
    })
    out["drift ratio"] = out[f"drift {consistent}"] / out[f"drift {fresh}"].replace(0, np.nan)
    out["verdict"] = [
        "nothing reused" if not ratio == ratio
        else f"{consistent} drifts less" if ratio < 1 - SAME_DRIFT
        else f"{fresh} drifts less" if ratio > 1 + SAME_DRIFT
        else f"no difference (within {SAME_DRIFT:.0%})"
        for ratio in out["drift ratio"]
    ]
    return out.reset_index()


SAME_DRIFT = 0.05  # drift ratios within 5% of 1 count as no difference between two modes


def gates_at_equal_reuse(table: pd.DataFrame, mode: str = "full", baseline: str = "cosine") -> pd.DataFrame:
    """Each gate against the `baseline` gate at equal reuse, on `mode`: per run of the gate, its action drift and the
    baseline's drift interpolated (linearly, in reuse rate) at the same reuse rate, where the baseline's sweep covers
    it; a ratio below 1 means the gate reuses at better moments. Runs that reused nothing are left out."""
    rows = table[(table["mode"] == mode) & (table["reuse rate"] > 0)]
    base = rows[rows["gate"] == baseline].groupby("reuse rate")["action drift"].mean().sort_index()
    base = pd.concat([pd.Series({0.0: 0.0}), base])  # reusing nothing drifts nothing
    out = rows[rows["gate"] != baseline][["gate", "value", "reuse rate", "action drift"]].copy()
    out = out[out["reuse rate"] <= base.index.max()]
    out[f"{baseline} drift at equal reuse"] = np.interp(out["reuse rate"], base.index.to_numpy(), base.to_numpy())
    out["drift ratio"] = out["action drift"] / out[f"{baseline} drift at equal reuse"].replace(0, np.nan)
    return out.sort_values(["gate", "reuse rate"]).reset_index(drop=True)
