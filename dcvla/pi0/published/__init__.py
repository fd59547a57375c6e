"""pi0 and pi0.5 as published (openpi, lerobot): the model from transformers' modules in lerobot's module tree, its
presets, and a strict loader for lerobot's checkpoint layout with the checkpoint's normalisation.

The Pi0-style policy of `dcvla.pi0` (state token in the prefix) predates it; its reuse modes move onto these models
next, and the Pi0-style model goes.
"""

from .checkpoint import Normalization, load_pretrained, read_normalization
from .config import PRESETS, GemmaDims, PiConfig, SiglipDims, get_preset
from .model import PiModel, PrefixInputs, random_model, run_prefix

__all__ = ["PRESETS", "GemmaDims", "Normalization", "PiConfig", "PiModel", "PrefixInputs", "SiglipDims", "get_preset",
           "load_pretrained", "random_model", "read_normalization", "run_prefix"]
