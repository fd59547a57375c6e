"""The LIBERO benchmark study: closed-loop success per method x suite x task x trial with the upstream OpenVLA
protocol (`dcvla.libero.evaluate`), on a checkpoint or the random weights of a preset."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import xarray as xr

from ..openvla import METHODS, CacheConfig
from ..openvla.cache_policy import CachePolicyBase
from .common import SUITES, PolicyParameters, base_policy, check_names

STUDY = "libero_benchmark"


@dataclass
class BenchmarkConfig(PolicyParameters):
    """The libero_benchmark notebook's parameters (the model's keep StudyConfig's names); the defaults are the
    notebook's smoke size."""

    methods: list[str] = field(default_factory=lambda: ["vanilla", "dual_cache"])
    suites: list[str] = field(default_factory=lambda: ["libero_spatial"])
    tasks: list[int] = field(default_factory=lambda: [0])  # task ids, the same for every suite
    trials: int = 1                      # init states 0..trials-1 (the protocol uses 50)
    max_steps: int = 10                  # policy steps per trial (0 = the protocol's per-suite budget)
    runs_dir: str = "data/runs"
    figures_dir: str = "figures"

    def __post_init__(self) -> None:
        self.check_types()
        self.check_model()
        check_names("BenchmarkConfig.methods", self.methods, METHODS, "known")
        check_names("BenchmarkConfig.suites", self.suites, SUITES, "suites")
        if not self.tasks or any(not isinstance(t, int) or t < 0 for t in self.tasks):
            raise ValueError(f"BenchmarkConfig.tasks must be task ids >= 0, got {self.tasks}")
        if self.trials < 1 or self.max_steps < 0:
            raise ValueError(f"BenchmarkConfig: trials must be >= 1 and max_steps >= 0, got {self.trials}, {self.max_steps}")


def results_dir(config: BenchmarkConfig) -> Path:
    """Where the per-(method, suite, task) result files go: `<runs_dir>/libero_benchmark/<method>/...`."""
    return Path(config.runs_dir) / STUDY


def evaluate(config: BenchmarkConfig, base: CachePolicyBase | None = None) -> xr.Dataset:
    """Run every method x suite x task of `config` (resumable: trials already in a result file are skipped).

    Args:
        base: a loaded policy whose model and processor every method shares; built from `config` when None.

    Returns:
        Every result file under `results_dir(config)` (earlier runs' methods, suites and tasks included), with
        dims (method, suite, task, trial): `dcvla.libero.evaluate.load_results`.
    """
    from ..libero.evaluate import evaluate_task, load_results  # the simulator only when the study runs

    base = base or base_policy(config)
    run_dir = results_dir(config)
    for method in config.methods:
        policy = base.with_config(CacheConfig(method=method, unnorm_key=config.unnorm_key or None))
        for suite in config.suites:
            for task in config.tasks:
                evaluate_task(policy, suite, task, run_dir, method=method, trials=config.trials,
                              max_steps=config.max_steps or None)
    return load_results(run_dir)


def success_table(results: xr.Dataset) -> pd.DataFrame:
    """One row per (method, suite, task): the success rate over the trials."""
    return results.success.mean("trial").to_dataframe("success rate").reset_index()
