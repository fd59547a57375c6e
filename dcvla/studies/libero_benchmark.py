"""The LIBERO benchmark study: closed-loop success per method x suite x task x trial with the upstream OpenVLA
protocol (`dcvla.libero.evaluate`), on a checkpoint or the random weights of a preset."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import pandas as pd
import xarray as xr

from ..openvla import METHODS, CacheConfig
from ..openvla.cache_policy import CachePolicyBase
from ..success import outcomes, paired, success_summary
from ..units import Unit, make_unit, run_units
from .common import SUITES, PolicyParameters, base_policy, check_names, suite_tasks

STUDY = "libero_benchmark"
#: The cache methods the dual cache is held against on success (the report: does it keep success where they do?).
RIVALS = ("vla_cache", "ttf", "ttf_vla_cache")


@dataclass
class BenchmarkConfig(PolicyParameters):
    """The libero_benchmark notebook's parameters (the model's keep StudyConfig's names); the defaults are the
    notebook's smoke size."""

    methods: list[str] = field(default_factory=lambda: ["vanilla", "dual_cache"])
    suites: list[str] = field(default_factory=lambda: ["libero_spatial"])
    tasks: list[int] = field(default_factory=list)  # task ids, the same for every suite ([]: each suite's trained one)
    trials: int = 1                      # init states 0..trials-1 (the protocol uses 50)
    trials_per_unit: int = 0             # init states per unit and result file (0: all of a method's on a task)
    seeds: list[int] = field(default_factory=lambda: [0])  # evaluation seeds (0: the protocol's), each on every trial
    max_steps: int = 10                  # policy steps per trial (0 = the protocol's per-suite budget)
    runs_dir: str = "data/runs"
    figures_dir: str = "figures"

    def __post_init__(self) -> None:
        self.check_types()
        self.check_model()
        check_names("BenchmarkConfig.methods", self.methods, METHODS, "known")
        check_names("BenchmarkConfig.suites", self.suites, SUITES, "suites")
        if any(t < 0 for t in self.tasks):
            raise ValueError(f"BenchmarkConfig.tasks must be task ids >= 0, got {self.tasks}")
        if not self.seeds or any(not isinstance(s, int) or s < 0 for s in self.seeds):
            raise ValueError(f"BenchmarkConfig.seeds must be a list of ints >= 0, got {self.seeds}")
        if self.trials < 1 or self.max_steps < 0 or self.trials_per_unit < 0:
            raise ValueError(f"BenchmarkConfig: trials must be >= 1, max_steps and trials_per_unit >= 0, got "
                             f"{self.trials}, {self.max_steps}, {self.trials_per_unit}")

    def blocks(self) -> list[range | None]:
        """The init states of each unit of a (method, suite, task, seed): [None] (all `trials` in one file), or
        blocks of `trials_per_unit`, each its own file, so a few tasks spread evenly over shards or Ray actors."""
        size = self.trials_per_unit
        if not size or size >= self.trials:
            return [None]
        return [range(first, min(first + size, self.trials)) for first in range(0, self.trials, size)]


def results_dir(config: BenchmarkConfig) -> Path:
    """Where the per-(method, suite, task) result files go: `<runs_dir>/libero_benchmark/<method>/...`."""
    return Path(config.runs_dir) / STUDY


def benchmark_units(config: BenchmarkConfig) -> list[Unit]:
    """One unit per (method, suite, task, seed): `trials` trials into one result file; with `trials_per_unit`, one
    per block of that many init states (`BenchmarkConfig.blocks`), block by block, each into its own file."""
    from ..libero.evaluate import result_path

    return [make_unit(STUDY, result_path(results_dir(config), method, suite, task, seed, trials=block),
                      trials=len(block) if block else config.trials, method=method, suite=suite, task=task, seed=seed,
                      **({"first": block[0]} if block else {}))
            for block in config.blocks() for method in config.methods
            for suite, task in suite_tasks(config.suites, config.tasks) for seed in config.seeds]


class BenchmarkWorker:
    """Runs (method, suite, task) units in one process: the policy loaded once (or the one given)."""

    def __init__(self, config: BenchmarkConfig, base: CachePolicyBase | None = None, progress: bool = True) -> None:
        self.config, self.base, self.progress = config, base, progress

    def __call__(self, unit: Unit, path: Path) -> None:
        from ..libero.evaluate import evaluate_task  # the simulator only when the study runs

        config = self.config
        self.base = self.base or base_policy(config)
        policy = self.base.with_config(CacheConfig(method=unit.get("method"), unnorm_key=config.unnorm_key or None))
        first = dict(unit.params).get("first")  # a block of init states (trials_per_unit), else 0..trials-1
        trials = unit.trials if first is None else range(first, first + unit.trials)
        evaluate_task(policy, unit.get("suite"), unit.get("task"), "", method=unit.get("method"), trials=trials,
                      max_steps=config.max_steps or None, progress=self.progress, path=path, seed=unit.get("seed"))


def worker(config: dict) -> BenchmarkWorker:
    return BenchmarkWorker(BenchmarkConfig(**config), progress=False)


def plan(parameters: dict) -> tuple[list[Unit], tuple[str, dict]]:
    """Every unit the notebook runs with these parameters, and their worker (`dcvla run --shard/--ray`)."""
    config = BenchmarkConfig.from_parameters(parameters)
    return benchmark_units(config), (__name__, asdict(config))


def evaluate(config: BenchmarkConfig, base: CachePolicyBase | None = None) -> xr.Dataset:
    """Run every method x suite x task of `config` under the process's runner (`dcvla.units`; resumable: trials
    already in a result file are skipped).

    Args:
        base: a loaded policy whose model and processor every method shares; built from `config` when None.
    Returns:
        This config's trials, dims (method, suite, task, seed, trial): `dcvla.libero.evaluate.load_results`
        (other runs' files in the same folder, say a method not asked for or more init states, are left out).
    """
    from ..libero.evaluate import load_results

    run_units(benchmark_units(config), (__name__, asdict(config)), work=lambda: BenchmarkWorker(config, base))
    tasks = sorted({task for _, task in suite_tasks(config.suites, config.tasks)})
    return load_results(results_dir(config), keep={"method": config.methods, "suite": config.suites, "task": tasks,
                                                   "seed": config.seeds, "trial": list(range(config.trials))})


def success_table(results: xr.Dataset, reference: str = "vanilla", by: tuple[str, ...] = ("suite", "task")) -> pd.DataFrame:
    """One row per method and `by` group (default per suite and task; () for one row per method over every trial):
    trials, successes, the success rate with its 95% Wilson interval, and against `reference` (the first method when
    it was not run) on the same init states: the paired difference and the exact McNemar p (`dcvla.success`)."""
    methods = [str(m) for m in results.method.values]
    return success_summary(outcomes(results), reference if reference in methods else methods[0], by=by)


def dual_cache_verdicts(results: xr.Dataset, method: str = "dual_cache", rivals: tuple[str, ...] = RIVALS) -> pd.DataFrame:
    """`method` against vanilla and against each of `rivals` the run played, trial by trial on the same init states
    and seeds (`dcvla.success.paired`: the rates, the trials only one of the two won, the exact McNemar p, a
    verdict), with "kept": the share of the other's successes on which `method` succeeded too. Empty when `method`
    was not played."""
    played = [str(m) for m in results.method.values]
    if method not in played:
        return pd.DataFrame()
    rows = []
    for other in (m for m in ("vanilla", *rivals) if m in played and m != method):
        row = paired(outcomes(results), method, other)
        won = row["both"] + row["only b"]  # the other's successes
        row["kept"] = row["both"] / won if won else float("nan")
        rows.append(row)
    return pd.DataFrame(rows)

