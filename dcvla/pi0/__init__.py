"""pi0 and pi0.5 as published (openpi, lerobot), with K/V reuse across inferences.

The model (`model.PiModel`) is lerobot's module tree built from transformers' modules, so a lerobot checkpoint's
names are its names; `checkpoint.load_pretrained` reads lerobot's layout strictly, with the normalisation the
checkpoint declares (`dcvla.normalization`). The policy (`policy.Pi0Policy`, a `dcvla.flow_policy.FlowPolicy`)
reuses prefix spans (and pi0's state token) across inferences under a mode and a gate of `dcvla.prefix_reuse`;
`dcvla.flow_record.FlowRecorder` records it (imported here, so `recorder_for` finds it).
"""

from ..flow import PrefixInputs
from ..flow_record import FlowRecorder
from ..normalization import Normalization, read_normalization
from .checkpoint import load_pretrained
from .config import PRESETS, GemmaDims, PiConfig, SiglipDims, get_preset
from .model import PiModel, random_model, run_prefix
from .policy import GATES, MODES, Pi0Policy, Pi0StepRecord, ReuseConfig

__all__ = ["GATES", "MODES", "PRESETS", "FlowRecorder", "GemmaDims", "Normalization", "Pi0Policy", "Pi0StepRecord",
           "PiConfig", "PiModel", "PrefixInputs", "ReuseConfig", "SiglipDims", "get_preset", "load_pretrained",
           "random_model", "read_normalization", "run_prefix"]
