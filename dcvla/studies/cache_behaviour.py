"""The cache behaviour study: per method, how much is reused and what it saves and costs, against vanilla."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd
import xarray as xr

from ..openvla import CacheConfig
from ..openvla.cache_policy import CachePolicyBase
from ..units import Unit, run_units
from .common import (RecordWorker, StudyConfig, action_distance, action_divergence, base_policy, divergence_name,
                     episode_inputs, episodes, plan_of, record_units, run_path)
from .speed import MEDIAN_MS, SPEEDUP, TOTAL, is_timing, load_timings, speed_note, speed_table, time_episode, timing_unit

STUDY = "cache_behaviour"


def summary(datasets: list[xr.Dataset], timings: list[xr.Dataset], reference: str = "vanilla") -> pd.DataFrame:
    """Per method: reuse rate, FLOPs ratio, the speedup from the interleaved timings (`speed.speed_table`: median
    over frames of the paired reference/method latency, and the ratio of total times; how they were measured is in
    `attrs["speed"]`), action drift (L2 of the actions) and the action divergence (OpenVLA: "action KL",
    OpenVLA-OFT: "action L1"; `common.DIVERGENCE`) against `reference` on the same frames (the reference method's
    own run; a stateless vanilla's actions equal a shadow recompute's). The recordings' own latencies (each run
    alone, one after another) give no column."""
    by_method: dict[str, list[xr.Dataset]] = {}
    for ds in datasets:
        by_method.setdefault(ds.attrs["method"], []).append(ds)
    if reference not in by_method:
        raise ValueError(f"summary needs the {reference!r} runs on the same episodes")
    speed = speed_table(timings, reference)
    untimed = sorted(set(by_method) - set(speed.index))
    if untimed:
        raise ValueError(f"summary: the timings hold no {untimed} (timed: {', '.join(speed.index)})")
    ref = {str(ds.episode.item()): ds for ds in by_method[reference]}
    rows = []
    for method, runs in by_method.items():
        flops = sum(float(ds.flops.sum()) for ds in runs)
        ref_flops = sum(float(ref[str(ds.episode.item())].flops.sum()) for ds in runs)
        drift = [float(v) for ds in runs for v in action_distance(ds, ref[str(ds.episode.item())])]
        rows.append({
            "method": method,
            "reuse rate": float(np.mean([ds.dcvla.reuse_rate().mean() for ds in runs])),
            "LLM reuse rate": float(np.mean([ds.dcvla.llm_reuse_rate() for ds in runs])),
            "FLOPs ratio": ref_flops / flops,
            **speed.loc[method, [SPEEDUP, TOTAL, MEDIAN_MS]].to_dict(),
            "action drift": float(np.mean(drift)),
            divergence_name(runs[0]): float(np.mean([action_divergence(ds, ref[str(ds.episode.item())]).mean() for ds in runs])),
            "frames": sum(ds.sizes["frame"] for ds in runs),
        })
    table = pd.DataFrame(rows).set_index("method")
    table.attrs["speed"] = speed_note(timings, reference)
    return table


def timing_units(config: StudyConfig) -> list[Unit]:
    """One unit per episode: every method of `config` timed on the episode's frames, interleaved (`speed`)."""
    return [timing_unit(STUDY, run_path(config.runs_dir, STUDY, config.methods[0], episode, config.frames),
                        config.methods, episode=episode.name, frames=config.frames) for episode in episodes(config)]


class Worker(RecordWorker):
    """Records the study's (method, episode) units, and runs its timing units on the same loaded policy."""

    def __call__(self, unit: Unit, path: Path) -> None:
        if not is_timing(unit):
            return super().__call__(unit, path)
        config = self.config
        self.base = self.base or base_policy(config)
        episode = self.episodes[unit.get("episode")]
        policies = {m: self.base.with_config(CacheConfig(method=m, unnorm_key=config.unnorm_key or None))
                    for m in config.methods}
        images, states = episode_inputs(self.base, episode, unit.get("frames"))
        labels = {"suite": episode.suite, "task": episode.task_id, "episode": episode.name, "study": unit.study,
                  "dtype": config.dtype}
        time_episode(policies, images, episode.instruction, states, config.device, path, labels)


def worker(config: dict) -> Worker:
    """A worker for `dcvla.units` runners: the config as a dict, the policy loaded on the first unit."""
    return Worker(StudyConfig(**config), progress=False)


def time_runs(config: StudyConfig, base: CachePolicyBase | None = None, progress: bool = True) -> list[xr.Dataset]:
    """Run the timing units of `config` under the process's runner (complete ones are kept) and open them."""
    todo = timing_units(config)
    run_units(todo, (__name__, asdict(config)), work=lambda: Worker(config, base, progress), progress=progress)
    return load_timings(todo)


def plan(parameters: dict) -> tuple[list[Unit], tuple[str, dict]]:
    """Every unit the notebook runs with these parameters (each method on each episode, then each episode's timing
    unit), and their worker."""
    config = StudyConfig.from_parameters(parameters)
    units, _ = plan_of(record_units(STUDY, config), config)
    return units + timing_units(config), (__name__, asdict(config))
