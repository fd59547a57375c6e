"""Recording an `OFTCachedPolicy`: the OpenVLA family's variables (`dcvla.openvla.record`) over both images' 512
vision tokens (patch p < 256: the third-person image's patch p; p >= 256: the wrist image's patch p - 256), with
OpenVLA-OFT's readout: the action chunk, un-normalised and as the L1 head gave it, and its `head` stage in place of
the decode. Drift compares with a shadow full recompute as for OpenVLA; its reference readout is the recomputed
chunk (`action_ref`), and `chunk_l1` is the mean |difference| of the normalised chunks (the L1 head's own loss).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from ...recording import register_recorder
from ..cache_policy import StepRecord
from ..record import SCHEMA as OPENVLA_SCHEMA
from ..record import OpenVLARecorder
from .policy import OFTCachedPolicy

STAGES = ("select", "dino", "siglip", "projector", "llm_prefill", "head")
_TOKEN_READOUT = ("action_tokens", "action_logits", "logit_kl")  # OpenVLA's decode: not OFT's
SCHEMA = replace(
    OPENVLA_SCHEMA,
    variables={name: dims for name, dims in OPENVLA_SCHEMA.variables.items() if name not in _TOKEN_READOUT} | {
        "action": ("chunk", "action_dim"),             # un-normalised
        "action_normalized": ("chunk", "action_dim"),  # the L1 head's output, in [-1, 1] units
        "action_ref": ("chunk", "action_dim"),         # drift: the full recompute's chunk (un-normalised)
        "chunk_l1": (),                                # drift: mean |normalised chunk - the recompute's|
    },
    groups=OPENVLA_SCHEMA.groups | {"actions": ("action", "action_normalized")},
)


@register_recorder(OFTCachedPolicy)
class OFTRecorder(OpenVLARecorder):
    """Records an `OFTCachedPolicy`'s steps into an `xarray.Dataset` (dims frame, patch (512), tower, layer, head,
    chunk, action_dim, stage, metric). Args as `dcvla.openvla.record.OpenVLARecorder`."""

    schema = SCHEMA
    policy_type = OFTCachedPolicy
    policy_name = "dcvla.openvla.oft.OFTCachedPolicy"
    family = "openvla-oft"
    stages = STAGES

    def sizes(self) -> dict[str, int]:
        sizes = super().sizes()
        del sizes["action_bin"]
        return sizes | {"chunk": self.policy.model.config.chunk_size}

    def _actions(self, record: StepRecord) -> dict[str, np.ndarray]:
        return {"action": record.prediction.action.astype(np.float32), "action_normalized": record.prediction.normalized}

    def _drift_readout(self, record: StepRecord, ref: tuple) -> dict[str, np.ndarray]:
        prediction = self.policy.prediction_of(ref)
        l1 = np.abs(prediction.normalized - record.prediction.normalized).mean()
        return {"action_ref": prediction.action.astype(np.float32), "chunk_l1": np.array(l1, np.float32)}
