"""SmolVLA as published (lerobot `policies/smolvla`, `lerobot/smolvla_base`), with K/V reuse across inferences.

The model (`model.SmolVLAModel`) is lerobot's `VLAFlowMatching` module tree built from transformers' SmolVLM and
Llama modules, so a lerobot checkpoint's names are its names; `checkpoint.load_pretrained` reads lerobot's layout
strictly, with the normalisation the checkpoint declares. The policy (`policy.SmolVLAPolicy`, a
`dcvla.flow_policy.FlowPolicy`) reuses prefix spans across inferences under a mode and a gate of
`dcvla.prefix_reuse`; `dcvla.flow_record.FlowRecorder` records it (imported here, so `recorder_for` finds it).
"""

from ..flow_record import FlowRecorder
from .checkpoint import load_pretrained
from .config import PRESETS, SmolVLAConfig, TextDims, VisionDims, get_preset
from .model import SmolVLAModel, random_model
from .policy import SmolVLAPolicy

__all__ = ["PRESETS", "FlowRecorder", "SmolVLAConfig", "SmolVLAModel", "SmolVLAPolicy", "TextDims", "VisionDims",
           "get_preset", "load_pretrained", "random_model"]
