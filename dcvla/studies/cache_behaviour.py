"""The cache behaviour study: per method, how much is reused and what it saves and costs, against vanilla."""

from __future__ import annotations

import statistics

import numpy as np
import pandas as pd
import xarray as xr

from ..units import Unit
from .common import StudyConfig, action_distance, action_divergence, divergence_name, plan_of, record_units

def summary(datasets: list[xr.Dataset], reference: str = "vanilla") -> pd.DataFrame:
    """Per method: reuse rate, FLOPs ratio, measured speedup, action drift (L2 of the actions) and the action
    divergence (OpenVLA: "action KL", OpenVLA-OFT: "action L1"; `common.DIVERGENCE`) against `reference` on the same
    frames (the reference method's own run; a stateless vanilla's actions equal a shadow recompute's)."""
    by_method: dict[str, list[xr.Dataset]] = {}
    for ds in datasets:
        by_method.setdefault(ds.attrs["method"], []).append(ds)
    if reference not in by_method:
        raise ValueError(f"summary needs the {reference!r} runs on the same episodes")
    ref = {str(ds.episode.item()): ds for ds in by_method[reference]}
    rows = []
    for method, runs in by_method.items():
        flops = sum(float(ds.flops.sum()) for ds in runs)
        ref_flops = sum(float(ref[str(ds.episode.item())].flops.sum()) for ds in runs)
        ms = [float(v) for ds in runs for v in ds.latency_ms.sum("stage").values]
        ref_ms = [float(v) for ds in runs for v in ref[str(ds.episode.item())].latency_ms.sum("stage").values]
        drift = [float(v) for ds in runs for v in action_distance(ds, ref[str(ds.episode.item())])]
        rows.append({
            "method": method,
            "reuse rate": float(np.mean([ds.dcvla.reuse_rate().mean() for ds in runs])),
            "LLM reuse rate": float(np.mean([ds.dcvla.llm_reuse_rate() for ds in runs])),
            "FLOPs ratio": ref_flops / flops,
            "measured speedup": statistics.median(ref_ms) / statistics.median(ms),
            "action drift": float(np.mean(drift)),
            divergence_name(runs[0]): float(np.mean([action_divergence(ds, ref[str(ds.episode.item())]).mean() for ds in runs])),
            "frames": sum(ds.sizes["frame"] for ds in runs),
        })
    return pd.DataFrame(rows).set_index("method")


def plan(parameters: dict) -> tuple[list[Unit], tuple[str, dict]]:
    """Every unit the notebook records with these parameters (each method on each episode), and their worker."""
    config = StudyConfig.from_parameters(parameters)
    return plan_of(record_units("cache_behaviour", config), config)
