"""The stability cliff study's parameters (`CliffConfig`, the notebook's parameters cell) and the names of its runs."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from ..devices import parse_dtype
from ..flow_policy import FlowPolicy
from ..pi0 import PRESETS as PI0_PRESETS
from ..pi0 import Pi0Policy
from ..prefix_reuse import COMPARE_TO, GATES, MODES, ReuseConfig
from ..smolvla import PRESETS as SMOLVLA_PRESETS
from ..smolvla import SmolVLAPolicy
from .common import SUITES, Parameters, check_device, check_names, check_suites
from .micro import shipped_checkpoints

CLIFF_MODES = ("full", "vision_only", "state_only", "text_fixed", "layer_wise", "synchronized")
CLIFF_THRESHOLDS = (0.97, 0.98, 0.985, 0.99, 0.995)  # the report's
EXTRA_GATES = ("max_age", "pixel_mae", "phase_aware")  # beyond the report's cosine gate (and its synchronized mode)
#: The gate's swept parameter, per gate: its ReuseConfig field and the CliffConfig list of values.
GATE_PARAMETER = {"cosine": ("threshold", "thresholds"), "synchronized": ("threshold", "thresholds"),
                  "phase_aware": ("threshold", "thresholds"), "max_age": ("max_age", "max_ages"),
                  "pixel_mae": ("pixel_threshold", "pixel_thresholds")}
#: Closed-loop trials per run and task at `success_trials = -1` with trained weights (`make studies`: a few).
AUTO_TRIALS = 1
#: Every flow-matching preset, with its family's policy.
FLOW_PRESETS: dict[str, type[FlowPolicy]] = {**dict.fromkeys(PI0_PRESETS, Pi0Policy),
                                             **dict.fromkeys(SMOLVLA_PRESETS, SmolVLAPolicy)}


@dataclass
class CliffConfig(Parameters):
    """The stability_cliff notebook's parameters (the shared ones keep StudyConfig's names)."""

    preset: str = "small"                # "small"/"tiny": pi0-small/pi0-tiny; any flow preset (pi05-small, smolvla-small),
                                         # random weights; or a shipped micro policy by name ("smolvla-micro-goal")
    checkpoint: str = ""                 # a lerobot pi0 / pi0.5 / SmolVLA checkpoint directory instead of random
                                         # weights, or a shipped micro policy by name ("smolvla-micro")
    tokenizer: str = ""                  # its tokenizer's directory (PaliGemma's, SmolVLM2's), if it ships none
    seed: int = 0                        # weights seed; also seeds the flow's noise (the same for every mode)
    device: str = "cpu"
    dtype: str = "float32"
    modes: list[str] = field(default_factory=lambda: list(CLIFF_MODES))  # run under each mode's own gate
    thresholds: list[float] = field(default_factory=lambda: list(CLIFF_THRESHOLDS))
    gates: list[str] = field(default_factory=lambda: list(EXTRA_GATES))  # run on `gate_modes`, swept as below
    gate_modes: list[str] = field(default_factory=lambda: ["full"])
    max_ages: list[int] = field(default_factory=lambda: [2, 3, 4])        # max_age: cache intervals
    pixel_thresholds: list[float] = field(default_factory=lambda: [0.005, 0.01, 0.02, 0.04])  # pixel_mae
    phase_threshold: float = 0.995       # phase_aware near a grasp or a place (thresholds elsewhere)
    suites: list[str] = field(default_factory=lambda: list(SUITES))
    episodes_per_suite: int = 1          # episodes per suite (0 = all)
    episodes_dir: str = ""               # a folder of recorded episodes ("" = the shipped ones)
    steps: int = 6                       # inferences per episode
    replan_steps: int = 5                # frames between inferences: openpi's LIBERO client executes 5 actions
    compare_to: str = "previous"         # the gate's reference: "previous" inference (the report) or "anchor"
    success_trials: int = 0              # closed-loop LIBERO trials per run and task (0: none; -1: AUTO_TRIALS with
                                         # trained weights, none with random ones)
    success_runs: list[str] = field(default_factory=list)  # the runs (labels) that play them ([]: all); and "none"
    success_tasks: list[int] = field(default_factory=list)  # task ids of each suite ([]: its trained one), for trials
    success_seeds: list[int] = field(default_factory=lambda: [0])  # evaluation seeds of the trials (0: the protocol's)
    max_steps: int = 0                   # env steps per trial (0: the protocol's per-suite budget)
    runs_dir: str = "data/runs"
    figures_dir: str = "figures"

    def __post_init__(self) -> None:
        self.check_types()
        if not self.trained():
            self.pi0_preset()  # an unknown preset fails here, naming the known ones
        parse_dtype(self.dtype, "CliffConfig.dtype")
        check_device(self.device, "CliffConfig.device")
        reusing = tuple(m for m in MODES if m != "none")
        check_names("CliffConfig.modes", self.modes, reusing, "known")
        check_names("CliffConfig.gate_modes", self.gate_modes, reusing, "known")
        check_names("CliffConfig.gates", self.gates, GATES, "known")
        check_suites("CliffConfig", self.suites, self.episodes_dir)
        for name in ("thresholds",) + tuple(GATE_PARAMETER[g][1] for g in self.gates):
            if not getattr(self, name):
                raise ValueError(f"CliffConfig.{name} is empty")
        if any(age < 1 for age in self.max_ages):
            raise ValueError(f"CliffConfig.max_ages must be >= 1 (1 never reuses), got {self.max_ages}")
        if self.steps < 2 or self.replan_steps < 1 or self.episodes_per_suite < 0:
            raise ValueError(f"CliffConfig: steps must be >= 2 (the first has nothing to reuse), replan_steps >= 1, "
                             f"episodes_per_suite >= 0; got {self.steps}, {self.replan_steps}, {self.episodes_per_suite}")
        if self.compare_to not in COMPARE_TO:
            raise ValueError(f"CliffConfig.compare_to must be one of {COMPARE_TO}, got {self.compare_to!r}")
        if self.success_trials < -1 or self.max_steps < 0 or any(t < 0 for t in self.success_tasks + self.success_seeds):
            raise ValueError(f"CliffConfig: success_trials must be >= -1 (auto), max_steps, success_tasks and "
                             f"success_seeds >= 0, got {self.success_trials}, {self.max_steps}, {self.success_tasks}, "
                             f"{self.success_seeds}")
        labels = [run_label(*key) for key in self.grid()]
        unknown = [r for r in self.success_runs if r not in labels] if self.trials() else []
        if unknown:
            raise ValueError(f"CliffConfig.success_runs: {unknown} are no runs of the grid; its runs: {', '.join(labels)} "
                             "(success_runs [] plays every run)")

    def pi0_preset(self) -> str:
        """The flow preset `preset` names (a bare "small" / "tiny" is pi0's)."""
        for name in (self.preset, f"pi0-{self.preset}"):
            if name in FLOW_PRESETS:
                return name
        raise ValueError(f"CliffConfig.preset: no flow-matching preset or shipped micro policy for {self.preset!r}; "
                         f"known: {', '.join(FLOW_PRESETS)} (or small, tiny), {', '.join(shipped_checkpoints('lerobot'))}")

    def trained(self) -> str:
        """The trained weights the study runs: `checkpoint`, else a shipped micro policy `preset` names; "" for the
        random weights of a flow preset."""
        return self.checkpoint or (self.preset if self.preset in shipped_checkpoints("lerobot") else "")

    def model_name(self) -> str:
        return Path(self.trained()).name if self.trained() else self.pi0_preset()

    def trials(self) -> int:
        """Closed-loop trials per run and task: `success_trials`, or with -1 `AUTO_TRIALS` for trained weights and
        none for random ones (which succeed by chance)."""
        return self.success_trials if self.success_trials >= 0 else AUTO_TRIALS if self.trained() else 0

    def grid(self) -> list[tuple[str, str, float]]:
        """(mode, gate, value) of every run but the reference: each mode under its own gate over `thresholds`, then
        each of `gates` on `gate_modes` over that gate's values."""
        own = [(m, MODES[m].gate, t) for m in self.modes for t in self.thresholds]
        extra = [(m, g, v) for m in self.gate_modes for g in self.gates for v in getattr(self, GATE_PARAMETER[g][1])]
        return list(dict.fromkeys(own + extra))

    def reuse_config(self, mode: str, gate: str, value: float | None) -> ReuseConfig:
        common = dict(compare_to=self.compare_to, replan_steps=self.replan_steps, phase_threshold=self.phase_threshold)
        if value is None:  # the reference: nothing reused
            return ReuseConfig(mode="none", **common)
        return ReuseConfig(mode=mode, gate=gate, **common, **{GATE_PARAMETER[gate][0]: value})


def run_label(mode: str, gate: str, value: float | None) -> str:
    """One (mode, gate, value) as a result-file method name: "none", "full-cosine-0.985"."""
    return mode if value is None else f"{mode}-{gate}-{value:g}"


def own_gate_runs(table: pd.DataFrame) -> pd.DataFrame:
    """The rows of a table of runs ("mode", "gate" columns) whose gate is their mode's own (`MODES[mode].gate`: the
    threshold sweep), not one of the `gates` run beyond it."""
    return table[[mode in MODES and MODES[mode].gate == gate for mode, gate in zip(table["mode"], table["gate"])]]
