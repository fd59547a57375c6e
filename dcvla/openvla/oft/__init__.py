"""OpenVLA-OFT (moojink/openvla-oft, LIBERO recipe) inside the OpenVLA family: the same towers, projector and Llama
(`dcvla.openvla.model`), plus a proprio projector and an L1 regression head predicting 8-step action chunks in one
bidirectional forward; its strict loader for the published layout; every cache method as `OFTCachedPolicy`.

Importing the sub-package registers its recorder (`record.OFTRecorder`) for `OFTCachedPolicy`.
"""

from .checkpoint import load_pretrained, load_processor, save_pretrained
from .config import PRESETS, OFTConfig, get_preset
from .model import OFTForward, OpenVLAOFT, random_model
from .policy import ChunkPrediction, OFTCachedPolicy
from .processing import OFTProcessor, normalize_proprio
from .record import OFTRecorder

__all__ = ["PRESETS", "ChunkPrediction", "OFTCachedPolicy", "OFTConfig", "OFTForward", "OFTProcessor", "OFTRecorder",
           "OpenVLAOFT", "get_preset", "load_pretrained", "load_processor", "normalize_proprio", "random_model",
           "save_pretrained"]
