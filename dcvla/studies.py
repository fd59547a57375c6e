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


def episodes(config: StudyConfig) -> list[Episode]:
    """The shipped episodes of the configured suites."""
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
