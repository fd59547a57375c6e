"""The method registry and the streaming policy that runs any of them: one name, one way to reuse.

| method           | ViT towers                              | LLM                                          |
|------------------|-----------------------------------------|----------------------------------------------|
| vanilla          | full                                    | full                                         |
| vla_cache        | full                                    | VLA-Cache: static K/V from layer 2 on, rows dropped |
| ttf              | full, static OUTPUT tokens fused        | full                                         |
| ttf_vla_cache    | as ttf                                  | as vla_cache                                 |
| dual_cache       | static patches: K/V cached, Q fresh     | static tokens: Q, K, V cached                |
| vit_kv_only      | as dual_cache                           | full                                         |
| llm_kqv_only     | full                                    | as dual_cache                                |
| dual_cache_llm_kv| as dual_cache                           | static tokens: K/V cached, Q recomputed      |

The unified selector (`dcvla.selector`) gives one mask for ttf, dual_cache and the ablations; VLA-Cache has
its own selection. Rows whose outputs nothing reads are not computed unless `faithful=True`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from . import flops as F
from .cache import KVStore, LayerPlan
from .llm_cache import new_llm_store, prefill
from .model import ActionPrediction, OpenVLA
from .policy import VLAPolicy
from .processing import Processor, resize_image, validate_image
from .selector import (
    Selection, SelectorConfig, UnifiedTokenSelector, VLACacheConfig, text_to_vision_relevance, vla_cache_layer_reuse,
    vla_cache_static_patches,
)
from .vit_cache import new_tower_store, run_tower, tower_plan


@dataclass(frozen=True)
class Method:
    vit: str   # "full" | "ttf" (fuse outputs) | "kv" (K/V cache, Q fresh)
    llm: str   # "full" | "vla_cache" | "kqv" (Q, K, V cached) | "kv" (K/V cached, Q fresh)


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
    top_k_static: int = 130              # at most this many static patches, most similar first
    attention_top_k_remove: int = 100    # the most text-attended patches are never reused
    prune_layers: tuple[int, ...] = (2, 6, 9, 11)  # layers where reuse starts or grows
    # execution
    faithful: bool = False               # compute rows nothing reads, as a literal reading of the method does
    unnorm_key: str | None = None        # dataset statistics for actions (None: the model's only entry)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"CacheConfig.method: unknown method {self.method!r}; known: {', '.join(METHODS)}")
        self.selector_config()  # validate both selectors' fields, naming the one that is wrong
        self.vla_cache_config()

    def selector_config(self) -> SelectorConfig:
        return SelectorConfig(
            pixel_threshold=self.pixel_threshold, attention_top_k=self.attention_top_k,
            attention_layer_id=self.attention_layer_id, keyframe_interval=self.keyframe_interval, fusion=self.fusion,
        )

    def vla_cache_config(self) -> VLACacheConfig:
        return VLACacheConfig(
            similarity_threshold=self.similarity_threshold, top_k_static=self.top_k_static,
            attention_top_k_remove=self.attention_top_k_remove, prune_layers=tuple(self.prune_layers),
            attention_layer_id=self.attention_layer_id,
        )


@dataclass
class StepRecord:
    """What one frame did: the selection, the work per stage, and the prediction."""

    frame: int
    selection: Selection | None
    vit_work: dict[str, list[F.LayerWork]]
    llm_work: list[F.LayerWork]
    projector_rows: int
    seq_len: int
    flops: dict[str, int]
    latency_ms: dict[str, float]
    llm_reuse: torch.Tensor            # [layer, patch] bool: vision tokens whose K/V came from the store
    relevance: torch.Tensor | None     # [patch]: text-to-vision attention of the selector layer (None: no selector)
    staleness: torch.Tensor            # [patch]: frames since each patch's values were computed fresh
    prediction: ActionPrediction | None = None
    text_probs: dict[int, torch.Tensor] = field(default_factory=dict)


class CachedPolicy(VLAPolicy):
    """Any registered method behind the streaming API: `reset()` per episode, `step()` per frame.

    Args:
        model, processor: the VLA and its input processor.
        config: the method and its parameters.
    """

    def __init__(self, model: OpenVLA, processor: Processor, config: CacheConfig) -> None:
        super().__init__(model, processor, config.unnorm_key, name=config.method)
        self.config = config
        self.method = METHODS[config.method]
        depth = model.config.llm.num_layers
        if config.attention_layer_id >= depth:
            raise ValueError(f"CacheConfig.attention_layer_id={config.attention_layer_id} is past the LLM's {depth} layers")
        if any(layer >= depth for layer in config.prune_layers):
            raise ValueError(f"CacheConfig.prune_layers={config.prune_layers} has a layer past the LLM's {depth} layers")
        self.selector = UnifiedTokenSelector(config.selector_config(), patch_size=model.config.dino.patch_size)
        self.vla_config = config.vla_cache_config()
        # Only methods with a selector need the previous frame's text-to-vision attention; vanilla does no bookkeeping.
        self.uses_selector = self.method.vit != "full" or self.method.llm != "full"
        self.prob_layers = frozenset({config.attention_layer_id}) if self.uses_selector else frozenset()
        # VLA-Cache's layer schedule needs every layer's attention entropy from the previous frame.
        self.entropy_layers = frozenset(range(depth)) if self.method.llm == "vla_cache" else frozenset()
        self.records: list[StepRecord] = []
        self.observer = None                      # a Recorder attaches itself here while it records
        self.observed_prob_layers: frozenset[int] = frozenset()  # extra layers whose text attention it wants
        self.keep_records = True                  # a streaming recorder turns this off for long episodes
        self.reset()

    @classmethod
    def from_preset(cls, preset: str = "tiny", seed: int = 0, config: CacheConfig | None = None) -> "CachedPolicy":
        base = VLAPolicy.from_preset(preset, seed)
        return cls(base.model, base.processor, config or CacheConfig())

    # ------------------------------------------------------------------------------------------- episode state
    def reset(self) -> None:
        """Forget the episode: caches, selector history, frame counter."""
        model = self.model
        self.frame = 0
        self.episode_key: tuple | None = None
        self.prev_relevance: torch.Tensor | None = None
        self.prev_image: np.ndarray | None = None      # VLA-Cache compares raw 224 pixels
        self.prev_entropy: torch.Tensor | None = None  # [layer] VLA-Cache's schedule input
        self.selector.reset()
        self.tower_stores = {name: new_tower_store(t, model.dtype, model.device) for name, t in model.vision_backbone.towers.items()}
        n_slots = 1 + model.config.num_patches  # BOS + vision tokens
        self.llm_store: KVStore = new_llm_store(model.language_model, n_slots, store_queries=self.method.llm == "kqv")
        self.fused_features: torch.Tensor | None = None  # TTF's cache of fused ViT output tokens
        self.last_fresh = torch.full((model.config.num_patches,), -1, dtype=torch.long)
        self.last = None
        self.records = []

    def _check_episode(self, image: np.ndarray, input_ids: torch.Tensor) -> None:
        key = (image.shape, tuple(input_ids[0].tolist()))
        if self.episode_key is not None and key != self.episode_key:
            what = "image size" if key[0] != self.episode_key[0] else "prompt"
            raise RuntimeError(
                f"the {what} changed within an episode ({self.name} caches hold the previous one's values); "
                "call reset() before a new episode"
            )
        self.episode_key = key

    # ----------------------------------------------------------------------------------------------- one frame
    @torch.inference_mode()
    def step(self, image, instruction: str) -> np.ndarray:
        image = validate_image(image)
        input_ids, pixel_values = self.processor(image, instruction)
        self._check_episode(image, input_ids)
        model, cfg, frame = self.model, self.model.config, self.frame
        pixel_values = pixel_values.to(model.device, model.dtype)
        timings: dict[str, float] = {}
        clock = time.perf_counter()

        selection = None
        if self.method.vit != "full" or self.method.llm in ("kqv", "kv"):
            selection = self.selector.select(pixel_values, self.prev_relevance)
        static = selection.reuse.to(model.device) if selection is not None else None  # [patch] bool
        image224 = resize_image(image, cfg.dino.image_size)
        llm_skip = self._vla_cache_schedule(image224) if self.method.llm == "vla_cache" else None  # [layer, patch]
        timings["select"] = _lap(clock)

        # ---- vision towers
        llm_reads_static = self.method.llm != "kqv" or self.config.faithful
        vit_static = static if self.method.vit == "kv" else None
        features, vit_work = [], {}
        for (name, tower), px in zip(model.vision_backbone.towers.items(), torch.split(pixel_values, [3, 3], dim=1)):
            start = time.perf_counter()
            plan = tower_plan(tower, vit_static, keep_static_rows=llm_reads_static)
            out = run_tower(tower, px, plan, self.tower_stores[name], frame, self.observer)
            features.append(out.features)
            patches = out.patches
            vit_work[name] = out.work
            timings[name] = _lap(start)
        features = torch.cat(features, dim=2)  # [1, computed patch, vision_dim]
        if self.method.vit == "ttf":
            features = self._ttf_fuse(features, static)

        # ---- projector + LLM prefill
        start = time.perf_counter()
        projected = model.projector(features)  # [1, computed patch, llm_hidden]
        timings["projector"] = _lap(start)
        plans, embeds, seq_len, llm_reuse = self._llm_plans(input_ids, projected, patches, static, llm_skip)
        start = time.perf_counter()
        text_start = 1 + cfg.num_patches
        out = prefill(model.language_model, embeds, seq_len, plans, self.llm_store, frame, text_start=text_start,
                      prob_layers=self.prob_layers | self.observed_prob_layers, entropy_layers=self.entropy_layers,
                      observer=self.observer)
        timings["llm_prefill"] = _lap(start)
        start = time.perf_counter()
        token_ids, logits = model.decode_actions(out.logits, out.cache)
        timings["llm_decode"] = _lap(start)

        # ---- bookkeeping for the next frame and the recorder
        relevance = None
        if self.uses_selector:
            text_positions = torch.arange(text_start, seq_len)
            relevance = text_to_vision_relevance(out.text_probs[self.config.attention_layer_id], text_positions)  # [patch]
        self.prev_relevance, self.prev_image = relevance, image224
        if out.entropy:
            self.prev_entropy = torch.stack([out.entropy[layer] for layer in range(cfg.llm.num_layers)])  # [layer]
        stale = llm_reuse.any(0).cpu()  # [patch]
        if static is not None:
            stale |= static.cpu()
        self.last_fresh[~stale] = frame
        self.last = ActionPrediction(token_ids, logits, *model.decode_action(token_ids, self.unnorm_key))
        record = StepRecord(
            frame=frame, selection=selection, vit_work=vit_work, llm_work=out.work, llm_reuse=llm_reuse.cpu(),
            projector_rows=int(projected.shape[1]), seq_len=seq_len,
            flops=self._flops(vit_work, out.work, int(projected.shape[1]), seq_len),
            latency_ms=timings, relevance=relevance, staleness=frame - self.last_fresh, prediction=self.last,
            text_probs=out.text_probs,
        )
        if self.keep_records:
            self.records.append(record)
        if self.observer is not None:
            self.observer.on_step(record, input_ids, pixel_values)
        self.frame += 1
        return self.last.action

    def _ttf_fuse(self, features: torch.Tensor, static: torch.Tensor | None) -> torch.Tensor:
        """TTF: static patches' output tokens replaced by the cached fused tokens; the cache holds the fused."""
        if static is not None and self.fused_features is not None:
            features = torch.where(static[None, :, None], self.fused_features, features)
        self.fused_features = features.clone()
        return features

    def _vla_cache_schedule(self, image224: np.ndarray) -> torch.Tensor | None:
        """VLA-Cache: which patches skip each LLM layer this frame (None before it has a previous frame)."""
        if self.prev_image is None or self.prev_entropy is None:
            return None
        reusable = vla_cache_static_patches(self.prev_image, image224, self.prev_relevance, self.vla_config)  # [patch]
        return vla_cache_layer_reuse(reusable, self.prev_entropy, self.vla_config)  # [layer, patch]

    def _llm_plans(self, input_ids: torch.Tensor, projected: torch.Tensor, patches: torch.Tensor,
                   static: torch.Tensor | None, llm_skip: torch.Tensor | None) -> tuple[list[LayerPlan], torch.Tensor, int, torch.Tensor]:
        """Layer plans, the first layer's input embeddings (rows in position order), sequence length, and
        which vision tokens take K/V from the store at each layer ([layer, patch] bool)."""
        model, cfg = self.model, self.model.config
        device = projected.device
        layers, n_patches, n_slots = cfg.llm.num_layers, cfg.num_patches, 1 + cfg.num_patches
        text = model.language_model.get_input_embeddings()(input_ids.to(device))  # [1, text, llm_hidden]
        seq_len = text.shape[1] + n_patches
        mode = self.method.llm
        reuse = torch.zeros(layers, n_patches, dtype=torch.bool, device=device)  # [layer, patch]
        if mode == "vla_cache":
            if llm_skip is not None:
                reuse = llm_skip.to(device)
            plans = []
            for layer in range(layers):  # skipped rows are dropped: no Q, no K/V, no MLP for them
                keep = torch.ones(seq_len, dtype=torch.bool, device=device)
                keep[1:n_slots] = ~reuse[layer]
                rows = keep.nonzero().squeeze(1)
                plans.append(LayerPlan(rows, torch.ones_like(rows, dtype=torch.bool), torch.ones_like(rows, dtype=torch.bool)))
            first_rows = plans[0].rows
        else:
            slot_static = torch.zeros(seq_len, dtype=torch.bool, device=device)  # [seq]: K/V from the store
            if mode in ("kqv", "kv") and static is not None and bool(static.any()):
                reuse[:] = static
                slot_static[1:n_slots] = static
                slot_static[0] = self.llm_store.is_filled(0, torch.tensor([0], device=device))  # BOS never changes
            drop = mode == "kqv" and not self.config.faithful
            rows = (~slot_static).nonzero().squeeze(1) if drop else torch.arange(seq_len, device=device)
            kv_fresh = ~slot_static[rows]
            q_fresh = kv_fresh.clone() if mode == "kqv" else torch.ones_like(kv_fresh)
            plans = [LayerPlan(rows, kv_fresh, q_fresh)] * layers
            first_rows = rows
        # input embeddings of the first layer's rows: BOS/text from the token table, vision from the projector
        vision = torch.zeros(1, n_patches, text.shape[-1], dtype=text.dtype, device=device)
        vision[:, patches] = projected.to(text.dtype)
        embeds = torch.cat([text[:, :1], vision, text[:, 1:]], dim=1)[:, first_rows]  # [1, row, llm_hidden]
        return plans, embeds, seq_len, reuse

    def _flops(self, vit_work: dict, llm_work: list, projector_rows: int, seq_len: int) -> dict[str, int]:
        cfg = self.model.config
        return {
            "dino": F.vit_flops(cfg.dino, vit_work["dino"]),
            "siglip": F.vit_flops(cfg.siglip, vit_work["siglip"]),
            "projector": F.projector_flops(cfg, projector_rows),
            "llm_prefill": F.llm_flops(cfg.llm, llm_work),
            "llm_decode": F.decode_flops(cfg, seq_len),
        }


def _lap(start: float) -> float:
    return (time.perf_counter() - start) * 1e3


@torch.inference_mode()
def vanilla_pass(model: OpenVLA, input_ids: torch.Tensor, pixel_values: torch.Tensor, observer=None,
                 prob_layers: frozenset[int] = frozenset()) -> tuple[torch.Tensor, torch.Tensor, dict[int, torch.Tensor]]:
    """A full recompute through the same engine (nothing cached, nothing kept): the shadow pass of drift
    recording. Returns the action token ids [action_dim], their logits [action_dim, vocab] and the requested
    layers' text attention probabilities."""
    cfg = model.config
    features = []
    for tower, px in zip(model.vision_backbone.towers.values(), torch.split(pixel_values, [3, 3], dim=1)):
        features.append(run_tower(tower, px, tower_plan(tower, None, True), None, 0, observer).features)
    projected = model.projector(torch.cat(features, dim=2))
    embeds = model.multimodal_embeddings(input_ids.to(model.device), projected)
    seq_len = embeds.shape[1]
    out = prefill(model.language_model, embeds, seq_len, [LayerPlan.full(seq_len, embeds.device)] * cfg.llm.num_layers,
                  None, 0, text_start=1 + cfg.num_patches, prob_layers=prob_layers, observer=observer)
    token_ids, logits = model.decode_actions(out.logits, out.cache)
    return token_ids, logits, out.text_probs
