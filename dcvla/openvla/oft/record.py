"""Recording an `OFTCachedPolicy`: per frame the reuse masks over both images' 512 vision tokens (patch p < 256: the
third-person image's patch p; p >= 256: the wrist image's patch p - 256), staleness, the action chunk, FLOPs and
latency per stage. Drift (a shadow full recompute per frame) is OpenVLA's recorder's alone for now.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

import numpy as np

from ...recording import Recorder, Schema, register_recorder
from ..cache_policy import StepRecord
from ..record import TOWERS, selection_masks
from .policy import OFTCachedPolicy

STAGES = ("select", "dino", "siglip", "projector", "llm_prefill", "head")
SCHEMA = Schema(
    variables={  # variable -> dims after "frame"
        "reuse": ("patch",),                  # the unified mask (vla_cache: reused at any LLM layer)
        "tower_reuse": ("tower", "patch"),    # per tower, the patches whose values came from the cache
        "pixel_dynamic": ("patch",),
        "attn_relevant": ("patch",),
        "keyframe": (),
        "llm_reuse": ("layer", "patch"),      # LLM K/V (and Q) taken from the store, per layer
        "staleness": ("patch",),              # frames since the vision token's values were computed fresh
        "action": ("chunk", "action_dim"),    # un-normalised
        "action_normalized": ("chunk", "action_dim"),  # the L1 head's output
        "flops": ("stage",),
        "latency_ms": ("stage",),
    },
    groups={
        "masks": ("reuse", "tower_reuse", "pixel_dynamic", "attn_relevant", "keyframe", "llm_reuse"),
        "staleness": ("staleness",), "actions": ("action", "action_normalized"), "flops": ("flops",),
        "latency": ("latency_ms",),
    },
)


@register_recorder(OFTCachedPolicy)
class OFTRecorder(Recorder):
    """Records an `OFTCachedPolicy`'s steps into an `xarray.Dataset` (dims frame, patch (512), tower, layer, chunk,
    action_dim, stage). Args as `dcvla.recording.Recorder`; `drift` must stay False."""

    schema = SCHEMA
    default_what = tuple(SCHEMA.groups)

    def __init__(self, policy: OFTCachedPolicy, what: Iterable[str] | None = None, drift: bool = False,
                 path: str | Path | None = None, labels: dict | None = None, control_hz: float = 20.0) -> None:
        if not isinstance(policy, OFTCachedPolicy):
            raise TypeError(f"OFTRecorder needs a dcvla.openvla.oft.OFTCachedPolicy, got {type(policy).__name__}")
        if drift:
            raise ValueError("drift recording is not implemented for OpenVLA-OFT (record with drift=False)")
        super().__init__(policy, what, drift, path, labels, control_hz)
        self.attrs.update({"family": "openvla-oft", "images": json.dumps(list(policy.image_names)),
                           "patches_per_image": policy.model.config.num_patches})

    def coords(self) -> dict[str, np.ndarray]:
        return {"tower": np.array(TOWERS), "stage": np.array(STAGES)}

    def sizes(self) -> dict[str, int]:
        cfg = self.policy.model.config
        return {"patch": self.policy.num_vision, "tower": len(TOWERS), "layer": cfg.llm.num_layers,
                "chunk": cfg.chunk_size, "action_dim": cfg.action_dim, "stage": len(STAGES)}

    def frame_arrays(self, record: StepRecord) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {"frame": np.array(record.frame), "time": np.array(record.frame / self.control_hz)}
        for group in self.what:
            out |= getattr(self, f"_{group}")(record)
        return out

    def _staleness(self, record: StepRecord) -> dict[str, np.ndarray]:
        return {"staleness": record.staleness.numpy().astype(np.int32)}

    def _actions(self, record: StepRecord) -> dict[str, np.ndarray]:
        return {"action": record.prediction.action.astype(np.float32), "action_normalized": record.prediction.normalized}

    def _flops(self, record: StepRecord) -> dict[str, np.ndarray]:
        return {"flops": np.array([record.flops.get(s, 0) for s in STAGES], np.float64)}

    def _latency(self, record: StepRecord) -> dict[str, np.ndarray]:
        return {"latency_ms": np.array([record.latency_ms.get(s, np.nan) for s in STAGES], np.float32)}

    def _masks(self, record: StepRecord) -> dict[str, np.ndarray]:
        return selection_masks(record, self.policy.method) | {"llm_reuse": record.llm_reuse.numpy()}

    def drift_arrays(self, record: StepRecord) -> dict[str, np.ndarray]:
        raise NotImplementedError("drift recording is not implemented for OpenVLA-OFT")
