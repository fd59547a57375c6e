"""The OpenVLA family (Prismatic dinosiglip-224px + Llama-2): the model from transformers' modules, its
checkpoint layout, the TTF and VLA-Cache selections, the ViT and LLM caches, the method registry and the policy.
OpenVLA-OFT lives in the sub-package `oft` (`OFTCachedPolicy`), over the same cached-policy machinery
(`cache_policy.CachePolicyBase`).

Importing the family registers its recorder (`record.OpenVLARecorder`) for `CachedPolicy`; importing `oft` registers
`oft.OFTRecorder` for `OFTCachedPolicy`.
"""

from .config import PRESETS, OpenVLAConfig, get_preset
from .methods import METHODS, CacheConfig
from .model import OpenVLA, random_model
from .policy import CachedPolicy
from .record import OpenVLARecorder

__all__ = ["METHODS", "PRESETS", "CacheConfig", "CachedPolicy", "OpenVLA", "OpenVLAConfig", "OpenVLARecorder",
           "get_preset", "random_model"]
