"""The Pi0-style policy family: flow-matching action expert over a SigLIP + Gemma prefix, with prefix K/V reuse
across control steps (modes: none, full, vision_only, state_only, text_fixed, layer_wise, synchronized)."""

from .model import PI0_PRESETS, Pi0Config, Pi0Model, get_pi0_preset, random_pi0
from .policy import MODES, Pi0Policy, Pi0StepRecord, ReuseConfig

__all__ = ["MODES", "PI0_PRESETS", "Pi0Config", "Pi0Model", "Pi0Policy", "Pi0StepRecord", "ReuseConfig",
           "get_pi0_preset", "random_pi0"]
