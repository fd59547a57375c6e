"""lerobot's normalisation of the robot state and the action (`NormalizerProcessorStep`), read from a checkpoint's
`policy_preprocessor.json` and the statistics file its normalizer step names, or made for a random preset.

Modes per feature type (`norm_map`): IDENTITY, MEAN_STD ((x - mean) / (std + eps)), MIN_MAX, QUANTILES (q01/q99 to
[-1, 1]) and QUANTILE10 (q10/q90); pi0 and SmolVLA checkpoints declare MEAN_STD, pi0.5 ones QUANTILES (lerobot's
pi0.5 LIBERO recipe overrides it to MEAN_STD: whatever the file says is what is used).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .devices import CheckpointError
from .io import atomic_path

PREPROCESSOR_FILE, POSTPROCESSOR_FILE = "policy_preprocessor.json", "policy_postprocessor.json"
STATE, ACTION = "observation.state", "action"  # lerobot's feature names

# Mean and std of the 8-dim LIBERO state (eef pos, axis-angle, gripper qpos) over every frame of the shipped
# episodes (tests/test_pi0_model.py recomputes them), std floored at 0.05 so the nearly constant roll (about pi) is
# not blown up into noise: the statistics of a random preset, as a LIBERO-trained checkpoint would carry its own.
LIBERO_STATE_STATS = {
    "mean": [-0.0367, 0.0634, 0.649, 3.1412, 0.0, -0.0027, 0.0247, -0.0247],
    "std": [0.0844, 0.1695, 0.3199, 0.05, 0.05, 0.05, 0.05, 0.05],
}
STATE_STD_FLOOR = 0.05

MODES = ("IDENTITY", "MEAN_STD", "MIN_MAX", "QUANTILES", "QUANTILE10")
_STATS = {"MEAN_STD": ("mean", "std"), "MIN_MAX": ("min", "max"), "QUANTILES": ("q01", "q99"), "QUANTILE10": ("q10", "q90")}


@dataclass
class Normalization:
    """lerobot's normalizer for the state and the action (`NormalizerProcessorStep`), as a checkpoint declares it."""

    modes: dict[str, str]                     # feature -> mode ("observation.state", "action")
    stats: dict[str, dict[str, np.ndarray]]   # feature -> stat -> values
    eps: float = 1e-8

    def width(self, feature: str) -> int | None:
        """How many values of `feature` the statistics its mode uses hold (None: IDENTITY, any width). Other entries
        of the file (lerobot's one-value `count`, unused quantiles) say nothing of the width."""
        mode = self.modes.get(feature, "IDENTITY")
        return None if mode == "IDENTITY" else len(self.stats[feature][_STATS[mode][0]])

    def normalize(self, values: np.ndarray, feature: str, inverse: bool = False) -> np.ndarray:
        """lerobot's formulas in float64: MEAN_STD (x - mean) / (std + eps) (inverse x * std + mean); MIN_MAX and the
        quantile modes map [lo, hi] to [-1, 1] (a zero range becomes eps); IDENTITY leaves x."""
        mode = self.modes.get(feature, "IDENTITY")
        if mode == "IDENTITY":
            return np.asarray(values, np.float64)
        lo_name, hi_name = _STATS[mode]
        x = np.asarray(values, np.float64)
        lo, hi = self.stats[feature][lo_name], self.stats[feature][hi_name]
        if mode == "MEAN_STD":
            return x * hi + lo if inverse else (x - lo) / (hi + self.eps)
        span = np.where(hi - lo == 0, self.eps, hi - lo)
        return (x + 1.0) * span / 2.0 + lo if inverse else 2.0 * (x - lo) / span - 1.0


def random_normalization(mode: str, state_stats: dict, action_dim: int) -> Normalization:
    """A random preset's statistics in `mode` (MEAN_STD or QUANTILES, as the family's checkpoints declare it): the
    state's from LIBERO's shipped episodes (`state_stats`: mean, std; quantiles at mean -/+ 2 std), the action left as
    the flow gives it (mean 0 std 1, or q01 -1 q99 1)."""
    mean, std = np.asarray(state_stats["mean"], np.float64), np.asarray(state_stats["std"], np.float64)
    if mode == "QUANTILES":
        stats = {STATE: {"q01": mean - 2 * std, "q99": mean + 2 * std},
                 ACTION: {"q01": -np.ones(action_dim), "q99": np.ones(action_dim)}}
    elif mode == "MEAN_STD":
        stats = {STATE: {"mean": mean, "std": std}, ACTION: {"mean": np.zeros(action_dim), "std": np.ones(action_dim)}}
    else:
        raise ValueError(f"random_normalization: mode must be MEAN_STD or QUANTILES, got {mode!r}")
    return Normalization({STATE: mode, ACTION: mode}, stats)


def read_normalization(folder: Path) -> Normalization | None:
    """The normalizer step of `policy_preprocessor.json` and its statistics; None when the directory has no
    preprocessor (a bare weights file). A step that names a missing file or stat raises, naming it."""
    from safetensors.torch import load_file

    path = folder / PREPROCESSOR_FILE
    if not path.exists():
        return None
    try:
        steps = json.loads(path.read_text())["steps"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise CheckpointError(f"{path} is not a lerobot processor config (a JSON object with 'steps'): {err}") from err
    step = next((s for s in steps if s.get("registry_name") == "normalizer_processor"), None)
    if step is None:
        return None
    config, state_file = step.get("config", {}), step.get("state_file")
    features, norm_map = config.get("features", {}), config.get("norm_map", {})
    modes = {name: norm_map.get(f.get("type"), "IDENTITY") for name, f in features.items()}
    bad = sorted({m for m in modes.values() if m not in MODES})
    if bad:
        raise CheckpointError(f"{path}: unknown normalisation mode(s) {bad}; known: {', '.join(MODES)}")
    if not state_file or not (folder / state_file).exists():
        raise CheckpointError(f"{path}: the normalizer step's statistics file {state_file!r} is not in {folder}")
    flat = load_file(folder / state_file)
    stats: dict[str, dict[str, np.ndarray]] = {}
    for key, tensor in flat.items():
        feature, _, stat = key.rpartition(".")
        stats.setdefault(feature, {})[stat] = tensor.double().numpy()
    for feature, mode in modes.items():
        needed = _STATS.get(mode, ())
        missing = [s for s in needed if s not in stats.get(feature, {})]
        if missing:
            raise CheckpointError(f"{folder / state_file}: {feature} is normalised with {mode}, which needs "
                                  f"{', '.join(missing)}; the file has {sorted(stats.get(feature, {}))}")
    return Normalization(modes, stats, float(config.get("eps", 1e-8)))


def write_normalization(folder: Path, normalization: Normalization, features: dict[str, dict]) -> dict[str, str]:
    """`normalization` as lerobot's processors save it (`read_normalization` reads it back): the normalizer step over
    every feature in `policy_preprocessor.json`, the unnormalizer over the action in `policy_postprocessor.json`, each
    naming its statistics file (`<feature>.<stat>`, float32) and mapping each feature type to its mode (returned, as
    lerobot's `normalization_mapping`). `features`: lerobot's feature name -> {"type": "STATE" | "ACTION" | "VISUAL",
    "shape": [...]}. The processors' other steps (tokenizer, batching, device) are not written: dcvla's policy does
    their work itself."""
    from safetensors.numpy import save

    norm_map: dict[str, str] = {}
    for name, feature in features.items():
        mode = normalization.modes.get(name, "IDENTITY")
        if norm_map.setdefault(feature["type"], mode) != mode:
            raise ValueError(f"features of type {feature['type']} are normalised both {norm_map[feature['type']]} and "
                             f"{mode}; lerobot maps one mode per feature type")
    stats = save({f"{name}.{stat}": np.asarray(values, np.float32)
                  for name, by_stat in normalization.stats.items() for stat, values in by_stat.items()})
    for config_file, registry, kept in ((PREPROCESSOR_FILE, "normalizer_processor", features),
                                        (POSTPROCESSOR_FILE, "unnormalizer_processor", {ACTION: features[ACTION]})):
        state_file = f"{config_file.removesuffix('.json')}_step_0_{registry}.safetensors"
        step = {"registry_name": registry, "config": {"eps": normalization.eps, "features": kept, "norm_map": norm_map},
                "state_file": state_file}
        with atomic_path(folder / state_file) as tmp:
            tmp.write_bytes(stats)
        with atomic_path(folder / config_file) as tmp:
            tmp.write_text(json.dumps({"name": config_file.removesuffix(".json"), "steps": [step]}, indent=2) + "\n")
    return norm_map
