"""The method registry and the one config that decides what a method reuses.

| method           | ViT towers                              | LLM                                          |
|------------------|-----------------------------------------|----------------------------------------------|
| vanilla          | full                                    | full                                         |
| vla_cache        | full                                    | VLA-Cache: static K/V from layer 2 on, rows dropped |
| ttf              | full, static OUTPUT tokens fused (TTF's mask per tower) | full                         |
| ttf_vla_cache    | as ttf                                  | as vla_cache                                 |
| dual_cache       | static patches: K/V cached, Q fresh     | static tokens: Q, K, V cached                |
| vit_kv_only      | as dual_cache                           | full                                         |
| llm_kqv_only     | full                                    | as dual_cache                                |
| dual_cache_llm_kv| as dual_cache                           | static tokens: K/V cached, Q recomputed      |

The unified selector (`ttf_selector`) gives one mask for dual_cache and the ablations (every tower and the LLM);
ttf and ttf_vla_cache fuse each tower's outputs with that tower's own mask, as TTF does. VLA-Cache has its own
selection, with upstream's constants for the model family (`vla_cache.UPSTREAM_CONSTANTS`: OpenVLA's path and
OpenVLA-OFT's differ) unless the config sets them. Rows whose outputs nothing reads are not
computed unless `faithful=True`, which also computes VLA-Cache's entropy schedule in the model's dtype, as upstream
does (bfloat16 in its runs), instead of float32.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

from .ttf_selector import SelectorConfig
from .vla_cache import UPSTREAM_CONSTANTS, VLACacheConfig


@dataclass(frozen=True)
class Method:
    vit: str   # "full" | "ttf" (fuse outputs) | "kv" (K/V cache, Q fresh)
    llm: str   # "full" | "vla_cache" | "kqv" (Q, K, V cached) | "kv" (K/V cached, Q fresh)

    @property
    def unified_selector(self) -> bool:
        """The unified (TTF) selector's mask drives a tower or the LLM."""
        return self.vit != "full" or self.llm in ("kqv", "kv")

    @property
    def needs_relevance(self) -> bool:
        """Some selector reads the previous frame's text-to-vision attention (vanilla keeps no such bookkeeping)."""
        return self.vit != "full" or self.llm != "full"

    @property
    def vit_store(self) -> bool:
        """The towers keep a K/V store (only the K/V cache reads one)."""
        return self.vit == "kv"

    @property
    def llm_store(self) -> bool:
        """The LLM keeps a K/V store of BOS and the vision tokens."""
        return self.llm != "full"


METHODS: dict[str, Method] = {
    "vanilla": Method("full", "full"),
    "vla_cache": Method("full", "vla_cache"),
    "ttf": Method("ttf", "full"),
    "ttf_vla_cache": Method("ttf", "vla_cache"),
    "dual_cache": Method("kv", "kqv"),
    "vit_kv_only": Method("kv", "full"),
    "llm_kqv_only": Method("full", "kqv"),
    "dual_cache_llm_kv": Method("kv", "kv"),
}


@dataclass
class CacheConfig:
    """Everything that decides what a method reuses. Flat; the notebooks' parameters mirror it."""

    method: str = "dual_cache"           # a name from METHODS
    # unified selector (ttf, dual_cache and its ablations)
    pixel_threshold: float = 0.03        # per-patch mean |dY| above which a patch is dynamic
    attention_top_k: int = 70            # most text-attended patches, always recomputed
    attention_layer_id: int = 15         # LLM layer whose text-to-vision attention ranks patches
    keyframe_interval: int = 3           # a full recompute every this many frames
    fusion: str = "hybrid"               # "hybrid" | "pixel" | "attention"
    # VLA-Cache (vla_cache, ttf_vla_cache): its own selection and layer schedule, as upstream
    similarity_threshold: float = 0.996  # per-patch cosine similarity of raw pixels to count as static
    top_k_static: int | None = None      # at most this many static patches (per image), most similar first;
                                         # None: upstream's for the model family (OpenVLA 130, OpenVLA-OFT 150)
    attention_top_k_remove: int | None = None  # the most text-attended patches (per image) are never reused;
                                         # None: upstream's for the model family (OpenVLA 120, OpenVLA-OFT 100)
    prune_layers: tuple[int, ...] = (2, 6, 9, 11)  # layers where reuse starts or grows
    # execution
    faithful: bool = False               # compute rows nothing reads, as a literal reading of the method does;
                                         # VLA-Cache's entropy schedule in the model's dtype, as upstream
    unnorm_key: str | None = None        # dataset statistics for actions (None: the model's only entry)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"CacheConfig.method: unknown method {self.method!r}; known: {', '.join(METHODS)}")
        layers = self.prune_layers
        if not isinstance(layers, (list, tuple)) or not all(isinstance(i, numbers.Integral) and not isinstance(i, bool) for i in layers):
            raise ValueError(f"CacheConfig.prune_layers must be a list or tuple of LLM layer ids, got {layers!r}")
        if not isinstance(self.faithful, bool):
            raise ValueError(f"CacheConfig.faithful must be True or False, got {self.faithful!r}")
        if self.unnorm_key is not None and not isinstance(self.unnorm_key, str):
            raise ValueError(f"CacheConfig.unnorm_key must be a dataset name (str) or None, got {self.unnorm_key!r}")
        self.selector_config()  # validate both selectors' fields, naming the one that is wrong
        self.vla_cache_config()

    def selector_config(self) -> SelectorConfig:
        return SelectorConfig(
            pixel_threshold=self.pixel_threshold, attention_top_k=self.attention_top_k,
            attention_layer_id=self.attention_layer_id, keyframe_interval=self.keyframe_interval, fusion=self.fusion,
        )

    def vla_cache_config(self, family: str = "openvla") -> VLACacheConfig:
        """VLA-Cache's parameters; unset top-k values are upstream's for `family` (a key of UPSTREAM_CONSTANTS)."""
        if family not in UPSTREAM_CONSTANTS:
            raise ValueError(f"unknown model family {family!r} for VLA-Cache's constants; known: {', '.join(UPSTREAM_CONSTANTS)}")
        static, remove = UPSTREAM_CONSTANTS[family]
        return VLACacheConfig(
            similarity_threshold=self.similarity_threshold,
            top_k_static=static if self.top_k_static is None else self.top_k_static,
            attention_top_k_remove=remove if self.attention_top_k_remove is None else self.attention_top_k_remove,
            prune_layers=tuple(self.prune_layers), attention_layer_id=self.attention_layer_id,
        )

