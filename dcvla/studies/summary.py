"""What `dcvla studies` prints after the paper set: the cache behaviour table and the stability cliff's, each
followed by how its speed columns were measured (the tables' "speed" attribute, `speed.speed_note`)."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pandas as pd

from ..io import read_dataset
from .common import divergence_column
from .speed import HZ, MEDIAN_MS, SPEEDUP, TOTAL
from .stability_cliff import consistency_vs_freshness, locate_cliff


SUCCESS_COLUMNS = ["trials", "successes", "success rate", "95% CI low", "95% CI high", "replays left out",
                   "difference to none", "McNemar p", "closed-loop reuse"]


def print_note(note: str) -> None:
    print("\n".join(textwrap.fill(line, 120, subsequent_indent="  ") for line in note.splitlines()))


def print_cache_summary(path: Path, model: str) -> None:
    """The cache_behaviour table: reuse, FLOPs ratio, the interleaved speedups, action drift and divergence."""
    ds = read_dataset(path)
    table = ds.to_dataframe().set_index("method")
    columns = ["reuse rate", "LLM reuse rate", "FLOPs ratio", SPEEDUP, TOTAL, MEDIAN_MS, "action drift",
               divergence_column(table)]
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        print(f"\nSummary (cache_behaviour, {model}, shipped LIBERO frames):")
        print(table[columns].round(4).to_string())
    print_note(ds.attrs["speed"])


def print_cliff_summary(path: Path, model: str) -> None:
    """The stability_cliff study in three tables: reuse/speed/drift per mode and threshold, the cliff per mode,
    and full against vision_only at the same gate."""
    ds = read_dataset(path)
    table = ds.to_dataframe()
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        print(f"\nStability cliff ({model}, K/V reuse across inferences, each mode under its own gate):")
        columns = ["reuse rate", "KV reuse", SPEEDUP, TOTAL, MEDIAN_MS, HZ, "FLOPs ratio", "action drift"]
        print(table.set_index(["mode", "gate", "value"])[columns].round(4).to_string())
        print_note(ds.attrs["speed"])
        if "success rate" in table:  # the runs that played closed-loop trials (success_runs), against no reuse
            played = table.dropna(subset=["success rate"]).set_index(["mode", "gate", "value"])
            print("\nClosed-loop LIBERO success (Wilson 95%; exact McNemar p against no reuse on the same trials):")
            print(played[[c for c in SUCCESS_COLUMNS if c in played]].round(4).to_string())
        print("\nWhere action drift jumps along each gate's parameter:")
        print(locate_cliff(table).set_index(["gate", "mode"]).round(4).to_string())
        print("\nConsistency vs freshness (full vs vision_only, same cosine gate):")
        print(consistency_vs_freshness(table).set_index("threshold").round(4).to_string())


BENCHMARK_COLUMNS = ["trials", "successes", "success rate", "95% CI low", "95% CI high", "replays left out",
                     "difference to vanilla", "McNemar p"]
VERDICT_COLUMNS = ["b", "paired trials", "replays left out", "rate a", "rate b", "only a", "only b", "McNemar p", "kept",
                   "verdict"]


def print_benchmark_summary(path: Path, verdicts: Path, model: str) -> None:
    """The libero_benchmark's success per method, suite and task, and the dual cache against each other method
    (`libero_benchmark.dual_cache_verdicts`; only when this run played the dual cache: a file left by an earlier
    run is not this one's)."""
    table = read_dataset(path).to_dataframe().set_index(["method", "suite", "task"])
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        print(f"\nClosed-loop LIBERO success ({model}; Wilson 95%; exact McNemar p against vanilla on the same trials):")
        print(table[[c for c in BENCHMARK_COLUMNS if c in table]].round(4).to_string())
        if verdicts.is_file() and "dual_cache" in table.index.get_level_values("method"):
            print("\nDoes the dual cache keep success where the others do?")
            found = read_dataset(verdicts).to_dataframe()
            print(found[[c for c in VERDICT_COLUMNS if c in found]].rename(columns={"b": "against"})
                  .set_index("against").round(4).to_string())

