"""The long-horizon stability study: drift accumulating over an episode, and sweeps of one cache parameter."""

from __future__ import annotations

from dataclasses import asdict, fields

import pandas as pd
import xarray as xr

from ..openvla import CacheConfig
from ..openvla.cache_policy import CachePolicyBase
from ..units import Unit
from .common import (StudyConfig, action_distance, action_divergence, base_policy, by_episode, divergence_name,
                     load_runs, plan_of, record_runs, record_units)

STUDY = "long_horizon_stability"


def drift_over_time(datasets: list[xr.Dataset], reference: str = "vanilla") -> pd.DataFrame:
    """Per (method, episode, frame): the action divergence (`common.DIVERGENCE`: "action KL" for OpenVLA, "action
    L1" for OpenVLA-OFT) and action distance to the reference run, reuse, staleness."""
    ref = {str(ds.episode.item()): ds for ds in datasets if ds.attrs["method"] == reference}
    rows = []
    for ds in datasets:
        r = ref[str(ds.episode.item())]
        divergence, name = action_divergence(ds, r).values, divergence_name(ds)
        dist = action_distance(ds, r)
        for i, frame in enumerate(ds.frame.values):
            rows.append({"method": ds.attrs["method"], "episode": str(ds.episode.item()), "frame": int(frame),
                         name: float(divergence[i]), "action drift": float(dist[i]),
                         "reuse rate": float(ds.reuse[i].mean()), "mean staleness": float(ds.staleness[i].mean()),
                         "keyframe": bool(ds.keyframe[i])})
    return pd.DataFrame(rows)


def sweep(config: StudyConfig, parameter: str, values: list, base: CachePolicyBase | None = None) -> pd.DataFrame:
    """Record `config.methods` at each value of one CacheConfig field; summarise against vanilla.

    Returns:
        One row per (value, method): mean action divergence (KL or L1, as `drift_over_time`), action drift,
        reuse rate, FLOPs ratio.
    """
    if parameter not in {f.name for f in fields(CacheConfig)}:
        raise ValueError(f"sweep parameter {parameter!r} is not a CacheConfig field")
    base = base or base_policy(config)
    reference = by_episode(record_runs(STUDY, _vanilla(config), base=base))
    rows = []
    for value in values:
        runs = load_runs(record_runs(STUDY, config, {parameter: value}, tag=f"{parameter}={value}", base=base))
        for ds in runs:
            ref = reference[("vanilla", str(ds.episode.item()))]
            rows.append({"parameter": parameter, "value": value, "method": ds.attrs["method"],
                         divergence_name(ds): float(action_divergence(ds, ref).mean()),
                         "action drift": float(action_distance(ds, ref).mean()),
                         "reuse rate": float(ds.reuse.mean()),
                         "FLOPs ratio": float(ref.flops.sum() / ds.flops.sum())})
    return pd.DataFrame(rows).groupby(["parameter", "value", "method"], as_index=False).mean(numeric_only=True)


def _vanilla(config: StudyConfig) -> StudyConfig:
    return StudyConfig(**{**asdict(config), "methods": ["vanilla"]})


def sweeps(parameters: dict) -> tuple[StudyConfig, list[tuple[str, list]]]:
    """The notebook's sweeps: its config for them (`sweep_methods`, `sweep_frames`) and (CacheConfig field,
    values) per swept parameter."""
    config = StudyConfig.from_parameters(parameters)
    sweep_config = StudyConfig(**{**asdict(config), "methods": parameters["sweep_methods"],
                                  "frames": parameters["sweep_frames"]})
    return sweep_config, [("keyframe_interval", parameters["keyframe_intervals"]),
                          ("pixel_threshold", parameters["pixel_thresholds"]),
                          ("attention_top_k", parameters["attention_top_ks"])]


def plan(parameters: dict) -> tuple[list[Unit], tuple[str, dict]]:
    """Every unit the notebook records with these parameters (the long episodes, then each sweep's reference and
    points), and their worker."""
    config = StudyConfig.from_parameters(parameters)
    sweep_config, swept = sweeps(parameters)
    todo = record_units(STUDY, config) + record_units(STUDY, _vanilla(sweep_config))
    todo += [u for name, values in swept for v in values for u in record_units(STUDY, sweep_config, {name: v}, f"{name}={v}")]
    return plan_of(todo, config)
