"""What the study notebooks compute, kept here so they stay short and the logic is tested.

A study records (method, episode) runs with the Recorder, each to its own netCDF file under
`<runs_dir>/<study>/<method>/<suite>_task<NN>_init<NN>.nc` (resumable: complete files are kept), then reduces
the datasets to tables. The notebooks' `parameters` cells mirror `StudyConfig` one to one.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import pandas as pd
import xarray as xr

from .libero.episodes import Episode, list_episodes, load_episode
from .libero.protocol import policy_input
from .methods import METHODS, CacheConfig, CachedPolicy
from .policy import VLAPolicy
from .recorder import action_kl, open_recording, record_episode

SUITES = ("libero_spatial", "libero_object", "libero_goal", "libero_10")
PAPER_METHODS = ("vanilla", "vla_cache", "ttf", "ttf_vla_cache", "dual_cache")


@dataclass
class StudyConfig:
    """The parameters every study shares; a notebook's parameters cell has these names."""

    preset: str = "small"                # model preset (random weights) unless `checkpoint` is given
    checkpoint: str = ""                 # OpenVLA-layout checkpoint directory or hub id ("" = random preset)
    unnorm_key: str = ""                 # dataset statistics for a checkpoint ("" = its only one)
    seed: int = 0                        # weights seed of a random preset
    device: str = "cpu"                  # "cuda" on a GPU machine
    dtype: str = "float32"               # "bfloat16" for openvla-7b on a GPU
    methods: list[str] = field(default_factory=lambda: list(PAPER_METHODS))
    suites: list[str] = field(default_factory=lambda: list(SUITES))
    episodes_per_suite: int = 0          # shipped episodes per suite (0 = all)
    frames: int = 12                     # frames per episode from its start (0 = the whole episode)
    drift: bool = False                  # shadow full recompute per frame (doubles the cost)
    runs_dir: str = "data/runs"
    figures_dir: str = "figures"

    def __post_init__(self) -> None:
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise ValueError(f"StudyConfig.methods: unknown {unknown}; known: {', '.join(METHODS)}")
        bad = [s for s in self.suites if s not in SUITES]
        if bad:
            raise ValueError(f"StudyConfig.suites: unknown {bad}; shipped suites: {', '.join(SUITES)}")
        if self.frames < 0 or self.episodes_per_suite < 0:
            raise ValueError(f"StudyConfig.frames and episodes_per_suite must be >= 0, got {self.frames}, {self.episodes_per_suite}")

    @classmethod
    def from_parameters(cls, namespace: dict) -> "StudyConfig":
        """Build from a notebook's globals: every StudyConfig field found there."""
        return cls(**{f.name: namespace[f.name] for f in fields(cls) if f.name in namespace})


def base_policy(config: StudyConfig) -> VLAPolicy:
    """The model every method of a study shares: a checkpoint, or a random preset, on the configured device."""
    import torch

    dtype = getattr(torch, config.dtype, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"StudyConfig.dtype: {config.dtype!r} is not a torch dtype (float32, bfloat16, float16)")
    if config.checkpoint:
        return VLAPolicy.from_pretrained(config.checkpoint, unnorm_key=config.unnorm_key or None, dtype=dtype,
                                         device=config.device)
    policy = VLAPolicy.from_preset(config.preset, seed=config.seed)
    policy.model.to(device=config.device, dtype=dtype)
    return policy


def episodes(config: StudyConfig | CliffConfig) -> list[Episode]:
    """The shipped episodes of the configured suites (`episodes_per_suite` of each, 0 = all)."""
    per_suite = [list_episodes(suite=suite) for suite in config.suites]
    return [load_episode(p) for paths in per_suite for p in (paths[: config.episodes_per_suite] if config.episodes_per_suite else paths)]


def episode_frames(episode: Episode, frames: int) -> np.ndarray:
    """What the policy sees (center crop, as the LIBERO fine-tunes expect), the first `frames` of them."""
    chosen = episode.frames if frames == 0 else episode.frames[:frames]
    return np.stack([policy_input(f) for f in chosen])


def run_path(runs_dir: str | Path, study: str, method: str, episode: Episode, frames: int, tag: str = "") -> Path:
    """One run's file; the frame count is in the name, so a resumed study never reuses a shorter or longer run."""
    name = episode.name.replace("/", "_") + f"_f{frames or 'all'}" + (f"_{tag}" if tag else "")
    return Path(runs_dir) / study / method / f"{name}.nc"


def record_runs(study: str, config: StudyConfig, cache_overrides: dict | None = None, tag: str = "",
                base: VLAPolicy | None = None, progress: bool = True) -> list[Path]:
    """Record every (method, episode) of `config`; existing complete files are kept (resume).

    Args:
        study: the study's name (a folder under runs_dir).
        cache_overrides: CacheConfig fields to set for every method (a sweep point); `tag` names it in files.
        base: a loaded policy to share (its model and processor); built from `config` when None.
    """
    base = base or base_policy(config)
    paths = []
    eps = episodes(config)
    for method in config.methods:
        cache = CacheConfig(method=method, unnorm_key=config.unnorm_key or None, **(cache_overrides or {}))
        policy = CachedPolicy(base.model, base.processor, cache)
        for episode in eps:
            path = run_path(config.runs_dir, study, method, episode, config.frames, tag)
            labels = {"suite": episode.suite, "task": episode.task_id, "episode": episode.name, "study": study,
                      "sweep": json.dumps(cache_overrides or {})}
            if progress and not path.exists():
                print(f"[{study}] {method:<14} {episode.name} {tag}", flush=True)
            paths.append(record_episode(policy, episode_frames(episode, config.frames), episode.instruction, path,
                                        drift=config.drift, labels=labels))
    return paths


def load_runs(paths: list[Path]) -> list[xr.Dataset]:
    return [open_recording(p) for p in paths]


def summary(datasets: list[xr.Dataset], reference: str = "vanilla") -> pd.DataFrame:
    """Per method: reuse rate, FLOPs ratio, measured speedup and action drift against `reference` on the same
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
        drift = [float(v) for ds in runs for v in
                 np.linalg.norm(ds.action.values - ref[str(ds.episode.item())].action.values, axis=-1)]
        rows.append({
            "method": method,
            "reuse rate": float(np.mean([ds.dcvla.reuse_rate().mean() for ds in runs])),
            "LLM reuse rate": float(np.mean([ds.dcvla.llm_reuse_rate() for ds in runs])),
            "FLOPs ratio": ref_flops / flops,
            "measured speedup": statistics.median(ref_ms) / statistics.median(ms),
            "action drift": float(np.mean(drift)),
            "action KL": float(np.mean([action_kl(ds, ref[str(ds.episode.item())]).mean() for ds in runs])),
            "frames": sum(ds.sizes["frame"] for ds in runs),
        })
    return pd.DataFrame(rows).set_index("method")


def config_json(config: StudyConfig) -> str:
    return json.dumps(asdict(config))


# ------------------------------------------------------------------------------ mechanism equivalence (H0-H4)
ALL_DYNAMIC = {"keyframe_interval": 1, "top_k_static": 0}  # nothing reused by either selector
EQUIVALENCE_TOLERANCE = 1e-4  # max |difference| of action-token logits that counts as "equal" (fp32)


def _by_episode(paths: list[Path]) -> dict[tuple[str, str], xr.Dataset]:
    return {(ds.attrs["method"], str(ds.episode.item())): ds for ds in load_runs(paths)}


def _compare(a: xr.Dataset, b: xr.Dataset) -> dict[str, float]:
    return {
        "max |logit diff|": float(np.abs(a.action_logits.astype(np.float32) - b.action_logits.astype(np.float32)).max()),
        "token mismatch rate": float((a.action_tokens != b.action_tokens).mean()),
        "max |action diff|": float(np.abs(a.action - b.action).max()),
        "mean action KL": float(action_kl(a, b).mean()),
    }


def equivalence_tests(config: StudyConfig, base: VLAPolicy | None = None) -> pd.DataFrame:
    """H0-H4 of the design, measured on the configured shipped episodes.

    Returns:
        One row per comparison: hypothesis, the two runs, max |logit diff| (action tokens), token mismatch
        rate, max |action diff|, mean action-token KL, and a verdict computed from the numbers.
    """
    base = base or base_policy(config)
    study = "mechanism_equivalence"
    dynamic = StudyConfig(**{**asdict(config), "methods": list(METHODS)})
    runs = _by_episode(record_runs(study, dynamic, ALL_DYNAMIC, tag="all_dynamic", base=base))
    pairs_config = StudyConfig(**{**asdict(config), "methods": ["vanilla", "dual_cache", "dual_cache_llm_kv",
                                                                 "llm_kqv_only", "ttf_vla_cache", "vit_kv_only"]})
    cached = _by_episode(record_runs(study, pairs_config, base=base))
    faithful = _by_episode(record_runs(study, StudyConfig(**{**asdict(config), "methods": ["dual_cache"]}),
                                       {"faithful": True}, tag="faithful", base=base))
    episodes_ = sorted({ep for _, ep in cached})
    rows = []

    def add(hypothesis: str, left: str, right: str, pairs, expect_equal: bool | None, note: str = "") -> None:
        stats = [_compare(a, b) for a, b in pairs]
        row = {"hypothesis": hypothesis, "compared": f"{left} vs {right}",
               **{k: max(s[k] for s in stats) if k.startswith("max") else float(np.mean([s[k] for s in stats]))
                  for k in stats[0]}}
        equal = row["max |logit diff|"] <= EQUIVALENCE_TOLERANCE and row["token mismatch rate"] == 0
        if expect_equal is None:
            row["verdict"] = note
        else:
            row["verdict"] = ("holds" if equal == expect_equal else "FAILS") + (f": {note}" if note else "")
        rows.append(row)

    for method in METHODS:
        if method != "vanilla":
            add("H0 all dynamic = vanilla", method, "vanilla",
                [(runs[(method, ep)], runs[("vanilla", ep)]) for ep in episodes_], True)
    add("H1 LLM: Q reuse = dropping", "dual_cache (faithful)", "dual_cache",
        [(faithful[("dual_cache", ep)], cached[("dual_cache", ep)]) for ep in episodes_], True)
    add("H1 LLM: Q recompute = dropping", "dual_cache_llm_kv", "dual_cache",
        [(cached[("dual_cache_llm_kv", ep)], cached[("dual_cache", ep)]) for ep in episodes_], True,
        "the static rows the ViT computes for it are unread too (H2)")
    add("H3 stale ViT K/V vs fresh ViT (same mask)", "dual_cache", "llm_kqv_only",
        [(cached[("dual_cache", ep)], cached[("llm_kqv_only", ep)]) for ep in episodes_], None,
        "difference = the ViT's stale K/V reaching the dynamic patches")
    add("H3 dual_cache vs TTF + VLA-Cache (as published)", "dual_cache", "ttf_vla_cache",
        [(cached[("dual_cache", ep)], cached[("ttf_vla_cache", ep)]) for ep in episodes_], None, "different masks and schedules")
    for method in ("dual_cache", "vit_kv_only"):
        add("H4 drift from vanilla", method, "vanilla",
            [(cached[(method, ep)], cached[("vanilla", ep)]) for ep in episodes_], None,
            "consistent reuse (vision + conditioned LLM rows)" if method == "dual_cache" else "stale vision, fresh LLM")
    table = pd.DataFrame(rows)
    h4 = table[table.hypothesis == "H4 drift from vanilla"].set_index("compared")["mean action KL"]
    consistent, fresh = h4["dual_cache vs vanilla"], h4["vit_kv_only vs vanilla"]
    verdict = "holds" if consistent < fresh else "does not hold"
    table.loc[table.hypothesis == "H4 drift from vanilla", "verdict"] += f" | consistency beats freshness: {verdict}"
    return table


# -------------------------------------------------------------------------------------- long-horizon stability
def drift_over_time(datasets: list[xr.Dataset], reference: str = "vanilla") -> pd.DataFrame:
    """Per (method, episode, frame): action KL and action distance to the reference run, reuse, staleness."""
    ref = {str(ds.episode.item()): ds for ds in datasets if ds.attrs["method"] == reference}
    rows = []
    for ds in datasets:
        r = ref[str(ds.episode.item())]
        kl = action_kl(ds, r).values
        dist = np.linalg.norm(ds.action.values - r.action.values, axis=-1)
        for i, frame in enumerate(ds.frame.values):
            rows.append({"method": ds.attrs["method"], "episode": str(ds.episode.item()), "frame": int(frame),
                         "action KL": float(kl[i]), "action drift": float(dist[i]),
                         "reuse rate": float(ds.reuse[i].mean()), "mean staleness": float(ds.staleness[i].mean()),
                         "keyframe": bool(ds.keyframe[i])})
    return pd.DataFrame(rows)


def sweep(config: StudyConfig, parameter: str, values: list, base: VLAPolicy | None = None) -> pd.DataFrame:
    """Record `config.methods` at each value of one CacheConfig field; summarise against vanilla.

    Returns:
        One row per (value, method): mean action KL, action drift, reuse rate, FLOPs ratio.
    """
    if parameter not in {f.name for f in fields(CacheConfig)}:
        raise ValueError(f"sweep parameter {parameter!r} is not a CacheConfig field")
    base = base or base_policy(config)
    reference = _by_episode(record_runs("long_horizon_stability", StudyConfig(**{**asdict(config), "methods": ["vanilla"]}),
                                        base=base))
    rows = []
    for value in values:
        tag = f"{parameter}={value}"
        runs = load_runs(record_runs("long_horizon_stability", config, {parameter: value}, tag=tag, base=base))
        for ds in runs:
            ref = reference[("vanilla", str(ds.episode.item()))]
            rows.append({"parameter": parameter, "value": value, "method": ds.attrs["method"],
                         "action KL": float(action_kl(ds, ref).mean()),
                         "action drift": float(np.linalg.norm(ds.action.values - ref.action.values, axis=-1).mean()),
                         "reuse rate": float(ds.reuse.mean()),
                         "FLOPs ratio": float(ref.flops.sum() / ds.flops.sum())})
    return pd.DataFrame(rows).groupby(["parameter", "value", "method"], as_index=False).mean(numeric_only=True)


def find_cliff(table: pd.DataFrame, metric: str = "action KL") -> pd.DataFrame:
    """Per (parameter, method): the step between consecutive sweep values where `metric` rises the most, and
    that rise as a multiple of the median step (a cliff stands out; a slope does not)."""
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
                     "jump / median step": abs(steps[i]) / typical if typical == typical else float("inf")})
    return pd.DataFrame(rows)


# ------------------------------------------------------------------------------------------------- figures
def save_figure(fig, name: str, figures_dir: str | Path, width: int = 1000, height: int = 520) -> Path:
    """Write a plotly figure as PNG (kaleido + chromium) under figures_dir; returns the path."""
    path = Path(figures_dir) / f"{name}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.write_image(str(path), width=width, height=height, scale=1)
    return path


def write_table(table: pd.DataFrame, name: str, config: StudyConfig) -> Path:
    """A study's table as a netCDF dataset under data/ (atomic), with the study config in its attrs."""
    from .io import write_dataset

    ds = xr.Dataset.from_dataframe(table.reset_index(drop=table.index.name is None))
    ds.attrs.update({"study": name, "config": config_json(config)})
    return write_dataset(ds, Path(config.runs_dir).parent / f"{name}.nc")


# ------------------------------------------------------------------------- stability cliff (the Pi0-style policy)
CLIFF_MODES = ("full", "vision_only", "state_only", "text_fixed", "layer_wise", "synchronized")
CLIFF_THRESHOLDS = (0.97, 0.98, 0.985, 0.99, 0.995)  # the report's


@dataclass
class CliffConfig:
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
        from .pi0.policy import COMPARE_TO, MODES

        self.pi0_preset()  # an unknown preset fails here, naming the known ones
        unknown = [m for m in self.modes if m not in MODES or m == "none"]
        if unknown:
            raise ValueError(f"CliffConfig.modes: unknown {unknown}; known: {', '.join(m for m in MODES if m != 'none')}")
        bad = [s for s in self.suites if s not in SUITES]
        if bad:
            raise ValueError(f"CliffConfig.suites: unknown {bad}; shipped suites: {', '.join(SUITES)}")
        if not self.thresholds:
            raise ValueError("CliffConfig.thresholds is empty")
        if self.steps < 2 or self.replan_steps < 1 or self.episodes_per_suite < 0:
            raise ValueError(f"CliffConfig: steps must be >= 2 (the first has nothing to reuse), replan_steps >= 1, "
                             f"episodes_per_suite >= 0; got {self.steps}, {self.replan_steps}, {self.episodes_per_suite}")
        if self.compare_to not in COMPARE_TO:
            raise ValueError(f"CliffConfig.compare_to must be one of {COMPARE_TO}, got {self.compare_to!r}")

    @classmethod
    def from_parameters(cls, namespace: dict) -> "CliffConfig":
        return cls(**{f.name: namespace[f.name] for f in fields(cls) if f.name in namespace})

    def pi0_preset(self) -> str:
        from .pi0.model import PI0_PRESETS

        for name in (self.preset, f"pi0-{self.preset}"):
            if name in PI0_PRESETS:
                return name
        raise ValueError(f"CliffConfig.preset: no Pi0 preset for {self.preset!r}; known: {', '.join(PI0_PRESETS)} "
                         "(or small, tiny)")


def pi0_base(config: CliffConfig):
    """The no-reuse Pi0 policy (random weights of the configured preset) whose model every mode shares."""
    import torch

    from .pi0.policy import Pi0Policy, ReuseConfig

    dtype = getattr(torch, config.dtype, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"CliffConfig.dtype: {config.dtype!r} is not a torch dtype (float32, bfloat16, float16)")
    policy = Pi0Policy.from_preset(config.pi0_preset(), seed=config.seed,
                                   config=ReuseConfig(mode="none", replan_steps=config.replan_steps))
    policy.model.to(device=config.device, dtype=dtype)
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
    from .pi0.policy import ReuseConfig

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
