"""pi0 and pi0.5 as published (openpi, lerobot), with K/V reuse across inferences.

The model (`model.PiModel`) is lerobot's module tree built from transformers' modules, so a lerobot checkpoint's
names are its names; `checkpoint.load_pretrained` reads lerobot's layout strictly, with the normalisation the
checkpoint declares (`normalize`). The policy (`policy.Pi0Policy`) reuses prefix spans (and pi0's state token)
across inferences under a mode and a gate. Importing the family registers its recorder (`record.Pi0Recorder`).
"""

from .checkpoint import load_pretrained
from .config import PRESETS, GemmaDims, PiConfig, SiglipDims, get_preset
from .model import PiModel, PrefixInputs, random_model, run_prefix
from .normalize import Normalization, read_normalization
from .policy import GATES, MODES, Pi0Policy, Pi0StepRecord, ReuseConfig
from .record import Pi0Recorder

__all__ = ["GATES", "MODES", "PRESETS", "GemmaDims", "Normalization", "Pi0Policy", "Pi0Recorder", "Pi0StepRecord",
           "PiConfig", "PiModel", "PrefixInputs", "ReuseConfig", "SiglipDims", "get_preset", "load_pretrained",
           "random_model", "read_normalization", "run_prefix"]
