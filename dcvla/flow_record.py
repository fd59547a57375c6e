"""Recording a flow-matching VLA (pi0, pi0.5, SmolVLA) with reuse: the schema and the recorder that writes it
(`recorder_for(policy)` for any `dcvla.flow_policy.FlowPolicy`).

Per inference: the gate's decision and what it measured (image-token and state similarity, pixel change, the
phase detector), which spans were reused at which layer, the reused share of the prefix K/V, each span's staleness,
the action chunk, FLOPs and latency per stage. With `drift=True` a no-reuse shadow pass of the same inference from
the same noise gives `action_ref`, `action_drift` and the drift of the prefix K/V the expert read (`k_drift`,
`v_drift`; pi0's state span lives in the expert and has none). An inference that reused nothing is the no-reuse
computation itself, so it is its own reference (drift exactly 0) and the shadow is skipped there.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

import numpy as np
import torch

from .flow_policy import FlowPolicy, FlowStepRecord
from .prefix_reuse import LIBERO_ACTION_DIM, SPANS
from .recording import METRICS, Recorder, Schema, distances, register_recorder

FLOW_STAGES = ("vision", "gate", "prefix", "expert")
FLOW_VARIABLES: dict[str, tuple[str, ...]] = {
    "gate": (),                                   # the gate opened: the mode's spans were reused
    "vision_similarity": (),                      # cosine similarity of the image tokens to the reference's
    "state_similarity": (),                       # the same for the normalised state
    "pixel_change": (),                           # mean |pixel change| in [0, 1] since the reference
    "near_contact": (),                           # phase_aware's detector: the gripper command flipped
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
FLOW_VARIABLE_GROUPS: dict[str, tuple[str, ...]] = {
    "reuse": ("gate", "vision_similarity", "state_similarity", "pixel_change", "near_contact", "span_reuse",
              "reuse_fraction"),
    "staleness": ("staleness",),
    "actions": ("action",),
    "flops": ("flops",),
    "latency": ("latency_ms",),
}
SCHEMA = Schema(FLOW_VARIABLES, FLOW_VARIABLE_GROUPS)


@register_recorder(FlowPolicy)
class FlowRecorder(Recorder):
    """Records a `FlowPolicy`'s (`Pi0Policy`, `SmolVLAPolicy`) inferences into an `xarray.Dataset` (dims frame =
    inference, span, layer, horizon,
    action_dim, stage, metric).

    Args:
        policy: the policy to observe.
        what: variable groups to record (see `SCHEMA.groups`).
        drift: run a no-reuse shadow pass on every step that reused something.
        path, labels: see `dcvla.recording.Recorder`.
        control_hz: inference rate, for the frame `time` coordinate (LIBERO 20 Hz / replan_steps).
    """

    schema = SCHEMA
    default_what = tuple(FLOW_VARIABLE_GROUPS)
    drift_note = "action and K/V drift from a no-reuse shadow pass (same noise) of every step that reused"

    def __init__(self, policy: FlowPolicy, what: Iterable[str] | None = None, drift: bool = False,
                 path: str | Path | None = None, labels: dict | None = None, control_hz: float = 4.0) -> None:
        if not isinstance(policy, FlowPolicy):
            raise TypeError(f"FlowRecorder needs a dcvla.flow_policy.FlowPolicy (pi0, pi0.5, SmolVLA), got "
                            f"{type(policy).__name__}")
        super().__init__(policy, what, drift, path, labels, control_hz)
        self.n_layers = policy.model.config.prefix_depth
        self.attrs.update({"family": policy.family, "variant": policy.model.config.variant, "gate": policy.gate_name,
                           "threshold": float(policy.config.threshold), "layer_wise_from": policy.layer_wise_from})

    def coords(self) -> dict[str, np.ndarray]:
        return {"span": np.array(SPANS), "layer": np.arange(self.n_layers), "stage": np.array(FLOW_STAGES),
                "metric": np.array(METRICS)}

    def sizes(self) -> dict[str, int]:
        cfg = self.policy.model.config
        return {"span": len(SPANS), "layer": self.n_layers, "horizon": cfg.chunk_size, "action_dim": LIBERO_ACTION_DIM,
                "stage": len(FLOW_STAGES), "metric": len(METRICS)}

    def frame_arrays(self, record: FlowStepRecord) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {"frame": np.array(record.step), "time": np.array(record.step / self.control_hz)}
        if "reuse" in self.what:
            out["gate"] = np.array(record.gate)
            out["vision_similarity"] = np.array(record.vision_similarity, np.float32)
            out["state_similarity"] = np.array(record.state_similarity, np.float32)
            out["pixel_change"] = np.array(record.pixel_change, np.float32)
            out["near_contact"] = np.array(record.near_contact)
            out["span_reuse"] = record.span_reuse.numpy()
            out["reuse_fraction"] = np.array(record.reuse_fraction, np.float32)
        if "staleness" in self.what:
            out["staleness"] = record.staleness.numpy().astype(np.int32)
        if "actions" in self.what:
            out["action"] = record.chunk.astype(np.float32)
        if "flops" in self.what:
            out["flops"] = np.array([record.flops.get(s, 0) for s in FLOW_STAGES], np.float64)
        if "latency" in self.what:
            out["latency_ms"] = np.array([record.latency_ms[s] for s in FLOW_STAGES], np.float32)
        return out

    def drift_arrays(self, record: FlowStepRecord) -> dict[str, np.ndarray]:
        policy = self.policy
        kv = {x: np.zeros((len(SPANS), self.n_layers, 2), np.float32) for x in "kv"}
        if record.reuse_fraction == 0:  # nothing reused: the step is the no-reuse pass itself
            chunk_ref = record.chunk
        else:
            ref_actions, fresh = policy.no_reuse_pass(record.inputs)
            chunk_ref = policy.unnormalize(ref_actions, record.inputs.raw_state)
            for i, span in enumerate(SPANS):
                rows = torch.from_numpy(record.inputs.spans[span])
                if not len(rows):
                    continue  # pi0's state token: its K/V are the expert's, not the prefix's
                for layer in range(self.n_layers):
                    kv["k"][i, layer] = distances(policy.store.keys[layer][:, rows], fresh.keys[layer][:, rows]).mean(0)
                    kv["v"][i, layer] = distances(policy.store.values[layer][:, rows], fresh.values[layer][:, rows]).mean(0)
        drift = np.linalg.norm(record.chunk - chunk_ref, axis=-1).mean()
        return {"action_ref": chunk_ref.astype(np.float32), "action_drift": np.array(drift, np.float32),
                "k_drift": kv["k"], "v_drift": kv["v"]}

