"""Recording the Pi0-style policy: its schema and the recorder that writes it (`recorder_for(pi0_policy)`).

Per control step: the gate's decision and both similarities, which spans were reused at which layer, the
reused share of the prefix K/V, each span's staleness, the action chunk, FLOPs and latency per stage. With
`drift=True` a no-reuse shadow pass of the same step from the same noise gives `action_ref`, `action_drift`
and the drift of the prefix K/V the expert read (`k_drift`, `v_drift`). A step that reused nothing is the
no-reuse computation itself, so it is its own reference (drift exactly 0) and the shadow is skipped there.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

import numpy as np

from ..recording import METRICS, Recorder, Schema, distances, register_recorder
from .config import LIBERO_ACTION_DIM, SPANS
from .policy import Pi0Policy, Pi0StepRecord

PI0_STAGES = ("vision", "gate", "prefix", "expert")
PI0_VARIABLES: dict[str, tuple[str, ...]] = {
    "gate": (),                                   # the gate opened: the mode's spans were reused
    "vision_similarity": (),                      # cosine similarity of the image tokens to the reference step's
    "state_similarity": (),                       # the same for the state token
    "span_reuse": ("span", "layer"),              # K/V of the span taken from the store at that prefix layer
    "reuse_fraction": (),                         # share of the prefix's (token, layer) K/V taken from the store
    "staleness": ("span",),                       # steps since the span's K/V were computed (oldest layer)
    "action": ("horizon", "action_dim"),          # the un-normalised action chunk
    "flops": ("stage",),
    "latency_ms": ("stage",),
    "action_ref": ("horizon", "action_dim"),      # the no-reuse shadow pass's chunk (same noise)
    "action_drift": (),                           # mean over the chunk of |action - action_ref| (L2 per action)
    "k_drift": ("span", "layer", "metric"),       # used vs fresh prefix K, mean over the span's tokens
    "v_drift": ("span", "layer", "metric"),
}
PI0_VARIABLE_GROUPS: dict[str, tuple[str, ...]] = {
    "reuse": ("gate", "vision_similarity", "state_similarity", "span_reuse", "reuse_fraction"),
    "staleness": ("staleness",),
    "actions": ("action",),
    "flops": ("flops",),
    "latency": ("latency_ms",),
}
SCHEMA = Schema(PI0_VARIABLES, PI0_VARIABLE_GROUPS)


@register_recorder(Pi0Policy)
class Pi0Recorder(Recorder):
    """Records a `Pi0Policy`'s steps into an `xarray.Dataset` (dims frame = control step, span, layer, horizon,
    action_dim, stage, metric).

    Args:
        policy: the policy to observe.
        what: variable groups to record (see `SCHEMA.groups`).
        drift: run a no-reuse shadow pass on every step that reused something.
        path, labels: see `dcvla.recording.Recorder`.
        control_hz: inference rate, for the frame `time` coordinate (LIBERO 20 Hz / replan_steps).
    """

    schema = SCHEMA
    default_what = tuple(PI0_VARIABLE_GROUPS)
    drift_note = "action and K/V drift from a no-reuse shadow pass (same noise) of every step that reused"

    def __init__(self, policy: Pi0Policy, what: Iterable[str] | None = None, drift: bool = False,
                 path: str | Path | None = None, labels: dict | None = None, control_hz: float = 4.0) -> None:
        if not isinstance(policy, Pi0Policy):
            raise TypeError(f"Pi0Recorder needs a dcvla.pi0.Pi0Policy, got {type(policy).__name__}")
        super().__init__(policy, what, drift, path, labels, control_hz)
        self.n_layers = policy.model.config.num_layers
        self.attrs.update({"family": "pi0", "threshold": float(policy.config.threshold),
                           "layer_wise_from": policy.layer_wise_from})

    def coords(self) -> dict[str, np.ndarray]:
        return {"span": np.array(SPANS), "layer": np.arange(self.n_layers), "stage": np.array(PI0_STAGES),
                "metric": np.array(METRICS)}

    def sizes(self) -> dict[str, int]:
        cfg = self.policy.model.config
        return {"span": len(SPANS), "layer": self.n_layers, "horizon": cfg.action_horizon, "action_dim": LIBERO_ACTION_DIM,
                "stage": len(PI0_STAGES), "metric": len(METRICS)}

    def frame_arrays(self, record: Pi0StepRecord) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {"frame": np.array(record.step), "time": np.array(record.step / self.control_hz)}
        if "reuse" in self.what:
            out["gate"] = np.array(record.gate)
            out["vision_similarity"] = np.array(record.vision_similarity, np.float32)
            out["state_similarity"] = np.array(record.state_similarity, np.float32)
            out["span_reuse"] = record.span_reuse.numpy()
            out["reuse_fraction"] = np.array(record.reuse_fraction, np.float32)
        if "staleness" in self.what:
            out["staleness"] = record.staleness.numpy().astype(np.int32)
        if "actions" in self.what:
            out["action"] = record.chunk.astype(np.float32)
        if "flops" in self.what:
            out["flops"] = np.array([record.flops.get(s, 0) for s in PI0_STAGES], np.float64)
        if "latency" in self.what:
            out["latency_ms"] = np.array([record.latency_ms[s] for s in PI0_STAGES], np.float32)
        return out

    def drift_arrays(self, record: Pi0StepRecord) -> dict[str, np.ndarray]:
        policy = self.policy
        kv = {x: np.zeros((len(SPANS), self.n_layers, 2), np.float32) for x in "kv"}
        if record.reuse_fraction == 0:  # nothing reused: the step is the no-reuse pass itself
            chunk_ref = record.chunk
        else:
            ref_actions, fresh = policy.no_reuse_pass(record.inputs, record.noise)
            chunk_ref = policy.unnormalize(ref_actions)
            for i, span in enumerate(record.inputs.spans.values()):
                for layer in range(self.n_layers):
                    kv["k"][i, layer] = distances(policy.store.keys[layer][:, span], fresh.keys[layer][:, span]).mean(0)
                    kv["v"][i, layer] = distances(policy.store.values[layer][:, span], fresh.values[layer][:, span]).mean(0)
        drift = np.linalg.norm(record.chunk - chunk_ref, axis=-1).mean()
        return {"action_ref": chunk_ref.astype(np.float32), "action_drift": np.array(drift, np.float32),
                "k_drift": kv["k"], "v_drift": kv["v"]}

