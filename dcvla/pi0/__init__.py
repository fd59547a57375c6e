"""The Pi0-style policy family: flow-matching action expert over a SigLIP + Gemma prefix, with prefix K/V reuse
across control steps (modes: none, full, vision_only, state_only, text_fixed, layer_wise, synchronized).

Importing the family registers its recorder (`record.Pi0Recorder`) for `Pi0Policy`.
"""

from .config import PI0_PRESETS, Pi0Config, get_pi0_preset
from .model import Pi0Model, random_pi0
from .policy import MODES, Pi0Policy, Pi0StepRecord, ReuseConfig
from .record import Pi0Recorder

__all__ = ["MODES", "PI0_PRESETS", "Pi0Config", "Pi0Model", "Pi0Policy", "Pi0Recorder", "Pi0StepRecord",
           "ReuseConfig", "get_pi0_preset", "random_pi0"]
