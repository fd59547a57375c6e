"""The stability cliff study on the Pi0-style policy: prefix K/V reuse gated by frame similarity, per mode and threshold."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import xarray as xr

from ..devices import parse_dtype, place
from ..io import open_recording
from ..libero.episodes import Episode
from ..libero.protocol import policy_input
from ..pi0 import PI0_PRESETS
from ..pi0.policy import COMPARE_TO, MODES, Pi0Policy, ReuseConfig
from ..recording import record_episode
from .common import SUITES, Parameters, check_device, check_names, episodes, find_cliff

CLIFF_MODES = ("full", "vision_only", "state_only", "text_fixed", "layer_wise", "synchronized")
CLIFF_THRESHOLDS = (0.97, 0.98, 0.985, 0.99, 0.995)  # the report's


@dataclass
class CliffConfig(Parameters):
    """The stability_cliff notebook's parameters (the shared ones keep StudyConfig's names)."""

    preset: str = "small"                # "small"/"tiny" run pi0-small/pi0-tiny; or any Pi0 preset name
    seed: int = 0                        # weights seed; also seeds the flow's noise (the same for every mode)
    device: str = "cpu"
    dtype: str = "float32"
    modes: list[str] = field(default_factory=lambda: list(CLIFF_MODES))
    thresholds: list[float] = field(default_factory=lambda: list(CLIFF_THRESHOLDS))
    suites: list[str] = field(default_factory=lambda: list(SUITES))
    episodes_per_suite: int = 1          # shipped episodes per suite (0 = all)
    steps: int = 6                       # control steps (inferences) per episode
    replan_steps: int = 5                # frames between inferences: openpi's LIBERO client executes 5 actions
    compare_to: str = "previous"         # the gate's reference: "previous" step (the report) or "anchor"
    runs_dir: str = "data/runs"
    figures_dir: str = "figures"

    def __post_init__(self) -> None:
        self.check_types()
        self.pi0_preset()  # an unknown preset fails here, naming the known ones
        parse_dtype(self.dtype, "CliffConfig.dtype")
        check_device(self.device, "CliffConfig.device")
        check_names("CliffConfig.modes", self.modes, tuple(m for m in MODES if m != "none"), "known")
        check_names("CliffConfig.suites", self.suites, SUITES, "shipped suites")
        if not self.thresholds:
            raise ValueError("CliffConfig.thresholds is empty")
        if self.steps < 2 or self.replan_steps < 1 or self.episodes_per_suite < 0:
            raise ValueError(f"CliffConfig: steps must be >= 2 (the first has nothing to reuse), replan_steps >= 1, "
                             f"episodes_per_suite >= 0; got {self.steps}, {self.replan_steps}, {self.episodes_per_suite}")
        if self.compare_to not in COMPARE_TO:
            raise ValueError(f"CliffConfig.compare_to must be one of {COMPARE_TO}, got {self.compare_to!r}")

    def pi0_preset(self) -> str:
        for name in (self.preset, f"pi0-{self.preset}"):
            if name in PI0_PRESETS:
                return name
        raise ValueError(f"CliffConfig.preset: no Pi0 preset for {self.preset!r}; known: {', '.join(PI0_PRESETS)} "
                         "(or small, tiny)")


def pi0_base(config: CliffConfig):
    """The no-reuse Pi0 policy (random weights of the configured preset) whose model every mode shares."""
    dtype = parse_dtype(config.dtype, "CliffConfig.dtype")
    policy = Pi0Policy.from_preset(config.pi0_preset(), seed=config.seed,
                                   config=ReuseConfig(mode="none", replan_steps=config.replan_steps))
    place(policy.model, config.device, dtype)  # RoPE's inverse frequencies stay float32
    return policy


def pi0_episode_inputs(episode: Episode, steps: int, replan_steps: int) -> tuple[np.ndarray, np.ndarray]:
    """The frames and robot states the policy sees at each inference: every `replan_steps`-th frame from the start,
    `steps` of them, resized to 224 without the OpenVLA center crop (openpi resizes the whole view)."""
    index = np.arange(0, len(episode), replan_steps)[:steps]
    return np.stack([policy_input(episode.frames[i], crop=False) for i in index]), episode.states[index]


def cliff_run_path(config: CliffConfig, mode: str, episode: Episode, threshold: float | None) -> Path:
    name = episode.name.replace("/", "_") + f"_s{config.steps}_r{config.replan_steps}_{config.compare_to}"
    tag = "" if threshold is None else f"_t{threshold:g}"
    return Path(config.runs_dir) / "stability_cliff" / config.pi0_preset() / mode / f"{name}{tag}.nc"


def record_cliff_runs(config: CliffConfig, base=None, progress: bool = True) -> dict[tuple[str, float | None, str], Path]:
    """Record the no-reuse reference and every (mode, threshold) on the configured episodes (resumable).

    Every run of an episode draws the same noise (the policy's seed), so a run's action drift against the
    reference run is exactly its drift against a no-reuse shadow pass of each step (tests/test_pi0.py checks this),
    at half the cost. Returns {(mode, threshold, episode): path}; the reference has mode "none", threshold None.
    """
    base = base or pi0_base(config)
    eps = episodes(config)
    grid = [("none", None)] + [(m, t) for m in config.modes for t in config.thresholds]
    if eps:  # warm up (allocator, kernels) so the reference run's latency is not the cold start's
        frames, states = pi0_episode_inputs(eps[0], 2, config.replan_steps)
        for frame, state in zip(frames, states):
            base.step(frame, eps[0].instruction, state)
        base.reset()
    paths = {}
    for episode in eps:
        frames, states = pi0_episode_inputs(episode, config.steps, config.replan_steps)
        for mode, threshold in grid:
            policy = base.with_config(ReuseConfig(mode=mode, threshold=2.0 if threshold is None else threshold,
                                                  compare_to=config.compare_to, replan_steps=config.replan_steps))
            path = cliff_run_path(config, mode, episode, threshold)
            if progress and not path.exists():
                print(f"[stability_cliff] {mode:<12} {'' if threshold is None else threshold:<6} {episode.name}", flush=True)
            labels = {"suite": episode.suite, "task": episode.task_id, "episode": episode.name, "study": "stability_cliff"}
            paths[(mode, threshold, episode.name)] = record_episode(
                policy, frames, episode.instruction, path, states=states, labels=labels, control_hz=20.0 / config.replan_steps)
    return paths


def load_cliff_runs(paths: dict[tuple[str, float | None, str], Path]) -> dict[tuple[str, float | None, str], xr.Dataset]:
    """`record_cliff_runs`' files, opened once, under the same keys."""
    return {key: open_recording(p) for key, p in paths.items()}


def cliff_table(runs: dict[tuple[str, float | None, str], xr.Dataset]) -> pd.DataFrame:
    """Per (mode, threshold): reuse rate (share of inferences whose gate opened), K/V reuse (share of the prefix's
    token-layer K/V reused, "KV reuse"), latency and Hz (mean per inference), speedup and FLOPs ratio against the no-reuse
    reference, and the action drift to the reference (mean L2 per action over chunk and steps; also its max)."""
    rows = []
    for (mode, threshold, episode), ds in runs.items():
        if mode == "none":
            continue
        ref = runs[("none", None, episode)]
        drift = np.linalg.norm(ds.action.values - ref.action.values, axis=-1).mean(-1)  # [frame]
        ms = ds.latency_ms.sum("stage").values
        rows.append({"mode": mode, "threshold": threshold, "episode": episode,
                     "reuse rate": float(ds.gate.mean()), "KV reuse": float(ds.reuse_fraction.mean()),
                     "latency ms": float(ms.mean()), "reference ms": float(ref.latency_ms.sum("stage").mean()),
                     "flops": float(ds.flops.sum()), "reference flops": float(ref.flops.sum()),
                     "action drift": float(drift.mean()), "max action drift": float(drift.max()),
                     "vision staleness": float(ds.staleness.sel(span="vision").mean()), "steps": ds.sizes["frame"]})
    per_episode = pd.DataFrame(rows)
    table = per_episode.groupby(["mode", "threshold"], as_index=False).agg(
        {"reuse rate": "mean", "KV reuse": "mean", "latency ms": "mean", "reference ms": "mean", "flops": "sum",
         "reference flops": "sum", "action drift": "mean", "max action drift": "max", "vision staleness": "mean", "steps": "sum"})
    table["Hz"] = 1000.0 / table["latency ms"]
    table["speedup"] = table["reference ms"] / table["latency ms"]
    table["FLOPs ratio"] = table["reference flops"] / table["flops"]
    return table.drop(columns=["flops", "reference flops"])


def locate_cliff(table: pd.DataFrame, metric: str = "action drift") -> pd.DataFrame:
    """Per mode: the threshold step where `metric` rises the most as the threshold is lowered (find_cliff's rule)."""
    cliffs = find_cliff(table.rename(columns={"mode": "method", "threshold": "value"}).assign(parameter="threshold"), metric)
    return cliffs.rename(columns={"method": "mode", "from": "threshold low", "to": "threshold high",
                                  f"{metric} before": f"{metric} at low", f"{metric} after": f"{metric} at high"})


def consistency_vs_freshness(table: pd.DataFrame, consistent: str = "full", fresh: str = "vision_only") -> pd.DataFrame:
    """H4 on the Pi0-style policy: at each threshold (the same gate, so the same reuse rate under compare_to
    "previous"), the drift of reusing every span together vs reusing vision with a freshly computed text and state."""
    a = table[table["mode"] == consistent].set_index("threshold")
    b = table[table["mode"] == fresh].set_index("threshold")
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
