"""OpenVLA-OFT (moojink/openvla-oft, LIBERO recipe) inside the OpenVLA family: the same towers, projector and Llama
(`dcvla.openvla.model`), plus a proprio projector and an L1 regression head predicting 8-step action chunks in one
bidirectional forward; its strict loader for the published layout.
"""

from .checkpoint import load_pretrained, load_processor, save_pretrained
from .config import PRESETS, OFTConfig, get_preset
from .model import OFTForward, OpenVLAOFT, random_model
from .processing import OFTProcessor, normalize_proprio

__all__ = ["PRESETS", "OFTConfig", "OFTForward", "OFTProcessor", "OpenVLAOFT", "get_preset", "load_pretrained",
           "load_processor", "normalize_proprio", "random_model", "save_pretrained"]
