"""What every cached policy of the OpenVLA family shares (`CachedPolicy` for OpenVLA, `oft.OFTCachedPolicy` for
OpenVLA-OFT): the episode state, the selection, the towers, the projector, the LLM plans and prefill, and the
frame's bookkeeping. A family adds its inputs, its sequence around the vision tokens and what it reads out of the
prefill (OpenVLA decodes 7 action tokens; OpenVLA-OFT reads 56 final-norm states into its head).

Images: a model sees `num_images` images of 256 patches each, through both towers each; vision token 256 i + j is
patch j of image i, at LLM position 1 + 256 i + j. Each image has its own unified selector (its own previous
frame, its own 256 relevance values); their masks are joined (`concat_selections`), so one reuse mask covers every
vision token and drives the towers of each image and the LLM. VLA-Cache selects per image and schedules the joined
positions once, as upstream's OpenVLA-OFT path does (`vla_cache_reusable`). Towers that cut the image into another
grid (`oft-micro`: 8 x 8 patches of 28 px, 64 a view) select on that grid, with the config's patch counts (given
for upstream's 256) scaled to it (`scaled_count`: TTF's top 70 becomes the top 18 of 64).

A step reads the device as few times as it can (on a GPU each read waits for every kernel queued before it): each
selector reads its pixel scores once, reuse decisions and row plans are made on the host and reach the device in
one copy per plan, and the bookkeeping reads the readout, the relevance and VLA-Cache's entropies together, once
(`benchmarks/host_syncs.py` counts them). A step that raises after it has started to change the episode's state
(a store half written by an out-of-memory error, say) leaves the policy broken until `reset()`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable

import numpy as np
import torch

from ..images import resize_image
from ..kv_store import KVStore, LayerPlan, to_device
from ..streaming import EpisodeGuard, StageClock
from ..tokenizer import load_tokenizer
from . import flops as F
from .llm_cache import PrefillOutput, PrefillRequest, mask_plans, new_llm_store, prefill, vla_cache_plans
from .methods import METHODS, CacheConfig, Method
from .ttf_selector import (MAX_TEXT_TOKENS, Selection, UnifiedTokenSelector, concat_selections, scaled_count,
                           text_relevance)
from .vit_cache import new_tower_store, run_tower, tower_plan
from .vla_cache import vla_cache_layer_reuse, vla_cache_reusable

VANILLA = METHODS["vanilla"]


@dataclass
class StepRecord:
    """What one frame did: the selection, the work per stage, and the prediction."""

    frame: int
    selection: Selection | None        # every image's, joined along the patch dim
    vit_work: dict[str, list[F.LayerWork]]  # per tower (and image: "wrist/dino", ...)
    llm_work: list[F.LayerWork]
    projector_rows: int
    seq_len: int
    flops: dict[str, int]
    latency_ms: dict[str, float]
    llm_reuse: torch.Tensor            # [layer, vision] bool: vision tokens whose K/V came from the store
    relevance: torch.Tensor | None     # [vision]: text-to-vision attention of the selector layer (None: no selector)
    staleness: torch.Tensor            # [vision]: frames since each vision token's values were computed fresh
    prediction: object | None = None   # the family's (OpenVLA: `ActionPrediction`; OFT: `ChunkPrediction`)
    text_probs: dict[int, torch.Tensor] = field(default_factory=dict)
    inputs: tuple | None = field(default=None, repr=False)  # (input_ids, pixel_values, extra) while observed
                                       # while an observer needs a shadow pass


@dataclass
class Reuse:
    """One frame's reuse decision: the unified mask, TTF's per-tower masks and VLA-Cache's per-layer schedule
    (None: not used)."""

    static_host: np.ndarray | None = None   # [vision] bool on the host: the unified selectors' joined reuse mask
    tower_static: torch.Tensor | None = None  # [2, vision] bool on the device: TTF's mask per tower (DINOv2, SigLIP)
    llm_skip: torch.Tensor | None = None    # [layer, vision] bool on the host: VLA-Cache's tokens skipping each layer


@dataclass
class Forward:
    """The stages' outputs for one frame."""

    vit_work: dict[str, list[F.LayerWork]]
    projector_rows: int
    seq_len: int
    llm_reuse: torch.Tensor     # [layer, vision] bool, on the host
    prefill: PrefillOutput
    readout: tuple              # the family's (OpenVLA: token ids, logits; OFT: the normalised chunk)


class CachePolicyBase:
    """The shared machinery; a family sets the class attributes and implements the hooks at the end.

    Args:
        model: the VLA (an `OpenVLA` or an `OpenVLAOFT`).
        processor: turns the frame's inputs into model inputs.
        config: the method and its parameters (default: the dual cache).
    """

    family = "openvla"                   # the key of VLA-Cache's upstream constants (UPSTREAM_CONSTANTS)
    image_names: tuple[str, ...] = ("",)  # one per image; "" keys the stores by tower name alone
    causal = True                        # the prefill's attention; BOS's K/V stay cacheable only when causal
    relevance_rows = MAX_TEXT_TOKENS     # rows read for the relevance, from position 1 + vision tokens on
    default_preset: str                  # `from_preset`'s default preset, and how it builds a random-weight policy:
    preset_config: Callable              # preset name -> config
    build_model: Callable                # (config, seed) -> model with seeded random weights
    processor_type: type                 # (tokenizer, config) -> processor

    def __init__(self, model, processor, config: CacheConfig | None = None) -> None:
        self.model, self.processor = model, processor
        self.config = config = config or CacheConfig()
        self.name, self.method = config.method, METHODS[config.method]
        self.unnorm_key = config.unnorm_key
        model.action_stats(self.unnorm_key)  # fail now, naming the available keys, rather than at the first step
        depth = model.config.llm.num_layers
        if config.attention_layer_id >= depth:
            raise ValueError(f"CacheConfig.attention_layer_id={config.attention_layer_id} is past the LLM's {depth} layers")
        if any(layer >= depth for layer in config.prune_layers):
            raise ValueError(f"CacheConfig.prune_layers={config.prune_layers} has a layer past the LLM's {depth} layers")
        n, self.patch_size, self.grid = model.config.num_patches, model.config.dino.patch_size, model.config.dino.grid
        selector = replace(config.selector_config(), attention_top_k=scaled_count(config.attention_top_k, n))
        self.selectors = [UnifiedTokenSelector(selector, self.patch_size, self.grid) for _ in self.image_names]
        vla = config.vla_cache_config(self.family)
        # the family's VLA-Cache constants, written into the config (recordings keep it as their provenance); its
        # counts stay upstream's, for 256 patches, and the selection takes them to this grid
        self.config = replace(config, top_k_static=vla.top_k_static, attention_top_k_remove=vla.attention_top_k_remove)
        self.vla_config = replace(vla, top_k_static=scaled_count(vla.top_k_static, n),
                                  attention_top_k_remove=scaled_count(vla.attention_top_k_remove, n))
        self.prob_layers = frozenset({config.attention_layer_id}) if self.method.needs_relevance else frozenset()
        # VLA-Cache's layer schedule needs every layer's attention entropy from the previous frame.
        self.entropy_layers = frozenset(range(depth)) if self.method.llm == "vla_cache" else frozenset()
        # upstream computes that entropy in the attention's dtype (the model's); dcvla in float32 unless faithful
        self.entropy_dtype = model.dtype if self.config.faithful else torch.float32
        self.guard = EpisodeGuard(self.name)
        self.observer = None                      # a Recorder attaches itself here while it records
        self.observed_prob_layers: frozenset[int] = frozenset()  # extra layers whose text attention it wants
        self.keep_records = True                  # a streaming recorder turns this off for long episodes
        self.reset()

    @classmethod
    def from_preset(cls, preset: str | None = None, seed: int = 0, config: CacheConfig | None = None):
        """Random weights of a preset's architecture (default: `default_preset`) with dcvla's offline tokenizer."""
        model = cls.build_model(cls.preset_config(preset or cls.default_preset), seed)
        return cls(model, cls.processor_type(load_tokenizer(), model.config), config)

    def with_config(self, config: CacheConfig):
        """Another method on the same model and processor (no weights copied)."""
        return type(self)(self.model, self.processor, config)

    @property
    def num_vision(self) -> int:
        """Vision tokens in the LLM's sequence (256 per image), at positions 1..num_vision."""
        return self.model.config.num_patches * len(self.image_names)

    def store_key(self, image: int, tower: str) -> str:
        """The name of one image's tower store and work ("dino"; with several images "wrist/dino")."""
        return f"{self.image_names[image]}/{tower}" if self.image_names[image] else tower

    # ------------------------------------------------------------------------------------------- episode state
    def reset(self) -> None:
        """Forget the episode: caches, selector history, frame counter. Only the stores a method reads exist."""
        model, method = self.model, self.method
        self.frame = 0
        self.guard.reset()
        self.prev_relevance: torch.Tensor | None = None
        self.prev_images: list[np.ndarray] | None = None  # VLA-Cache compares raw 224 pixels, per image
        self.prev_entropy: torch.Tensor | None = None  # [layer] VLA-Cache's schedule input
        for selector in self.selectors:
            selector.reset()
        towers = model.vision_backbone.towers.items()
        self.tower_stores: dict[str, KVStore] | None = (
            {self.store_key(i, name): new_tower_store(t, model.dtype, model.device)
             for i in range(len(self.image_names)) for name, t in towers} if method.vit_store else None)
        self.llm_store: KVStore | None = (
            new_llm_store(model.language_model, 1 + self.num_vision, store_queries=method.llm == "kqv")
            if method.llm_store else None)  # BOS + vision slots
        self.fused_features: torch.Tensor | None = None  # TTF's cache of fused ViT output tokens
        self.last_fresh = torch.full((self.num_vision,), -1, dtype=torch.long)
        self.bos_stored = False  # the LLM store holds BOS's K/V (written by the episode's first prefill)
        self.last = None
        self.last_reuse: float | None = None     # the share of vision tokens the last frame took from an earlier one
        self.records: list[StepRecord] = []

    # ----------------------------------------------------------------------------------------------- one frame
    @property
    def broken(self) -> bool:
        """A step failed mid-way: the stores may mix two frames, and every step is refused until `reset()`."""
        return self.guard.broken

    def _run(self, images: list[np.ndarray], input_ids: torch.Tensor, pixel_values: torch.Tensor, extra) -> None:
        """One checked frame; any error from here on marks the policy broken until `reset()`."""
        with self.guard.changing():
            self._step(images, input_ids, pixel_values, extra)

    def _step(self, images: list[np.ndarray], input_ids: torch.Tensor, pixel_values: torch.Tensor, extra) -> None:
        pixel_values = pixel_values.to(self.model.device, self.model.dtype)
        clock = StageClock(self.model.device)
        with clock.stage("select"):
            selection, reuse, images224 = self._select(images, pixel_values)
        out = self._forward(self.method, input_ids, pixel_values, extra, reuse, clock, keep=True, observer=self.observer)
        record = self._bookkeep(out, selection, reuse, images224, clock.ms)
        if self.keep_records:
            self.records.append(record)
        if self.observer is not None:
            record.inputs = (input_ids, pixel_values, extra)
            self.observer.on_step(record)
            record.inputs = None
        self.frame += 1

    def _select(self, images: list[np.ndarray], pixel_values: torch.Tensor
                ) -> tuple[Selection | None, Reuse, list[np.ndarray] | None]:
        """The unified selectors' joined mask and, for VLA-Cache, its per-layer schedule (and the 224 images it
        compares)."""
        selection, reuse, images224 = None, Reuse(), None
        n = self.model.config.num_patches
        relevance = [None if self.prev_relevance is None else self.prev_relevance[i * n:(i + 1) * n]
                     for i in range(len(self.image_names))]
        if self.method.unified_selector:
            per_image = torch.split(pixel_values, 6, dim=1)  # [1, 6, H, W] each: DINOv2's then SigLIP's channels
            selection = concat_selections([s.select(px, r) for s, px, r in zip(self.selectors, per_image, relevance)])
            reuse.static_host = selection.reuse.numpy()
            if self.method.vit == "ttf":  # TTF keeps one mask per tower
                reuse.tower_static = to_device(selection.tower_reuse.numpy(), self.model.device)
        if self.method.llm == "vla_cache":
            images224 = [resize_image(image, self.model.config.dino.image_size) for image in images]
            if self.prev_images is not None and self.prev_entropy is not None:
                reusable = vla_cache_reusable(self.prev_images, images224, self.prev_relevance, self.vla_config,
                                              self.patch_size, self.grid)
                reuse.llm_skip = vla_cache_layer_reuse(reusable, self.prev_entropy, self.vla_config)  # [layer, vision]
        return selection, reuse, images224

    def _forward(self, method: Method, input_ids: torch.Tensor, pixel_values: torch.Tensor, extra, reuse: Reuse,
                 clock: StageClock, keep: bool, observer=None) -> Forward:
        """The towers, projector, prefill and readout of one frame under `method` and `reuse`.

        Args:
            extra: the family's per-frame input besides images and prompt (OFT: the normalised state).
            keep: read and refresh the episode's stores (False: the shadow pass, nothing read or kept).
            observer: receives every layer's Q/K/V as used (`on_layer`).
        """
        model = self.model
        features, patches, vit_work = self._towers(method, pixel_values, reuse.static_host, clock, keep, observer)
        if method.vit == "ttf":
            features = self._ttf_fuse(features, reuse.tower_static)
        with clock.stage("projector"):
            projected = model.projector(features)  # [1, computed vision token, llm_hidden]
            extra = self._extra_tokens(extra)
        plans, embeds, seq_len, llm_reuse = self._llm_plans(method, input_ids, projected, patches, reuse, extra)
        readout = self._readout_positions(input_ids)
        request = PrefillRequest(
            self.llm_store if keep else None, self.frame, text_start=1 + self.num_vision,
            prob_layers=(self.prob_layers | self.observed_prob_layers) if keep else frozenset(),
            entropy_layers=self.entropy_layers if keep else frozenset(), entropy_dtype=self.entropy_dtype,
            observer=observer, causal=self.causal, readout=readout, keep_cache=readout is None)
        with clock.stage("llm_prefill"):
            out = prefill(model.language_model, embeds, seq_len, plans, request)
        if request.store is not None:
            self.bos_stored = True  # every plan carries BOS fresh until the store holds it
        return Forward(vit_work, int(projected.shape[1]), seq_len, llm_reuse, out, self._readout(out, clock))

    def _towers(self, method: Method, pixel_values: torch.Tensor, static: np.ndarray | None, clock: StageClock,
                keep: bool, observer) -> tuple[torch.Tensor, torch.Tensor, dict[str, list[F.LayerWork]]]:
        """Both towers of every image -> (features [1, computed vision token, vision_dim], which vision tokens,
        work per tower and image)."""
        # The static patches' rows are dropped when nothing reads them: the LLM takes those tokens from its store.
        keep_static_rows = method.llm != "kqv" or self.config.faithful
        n = self.model.config.num_patches
        features, patches, vit_work = [], [], {}
        for i, image_px in enumerate(torch.split(pixel_values, 6, dim=1)):
            vit_static = static[i * n:(i + 1) * n] if method.vit == "kv" and static is not None else None  # on the host
            image_features = []
            for (name, tower), px in zip(self.model.vision_backbone.towers.items(), torch.split(image_px, [3, 3], dim=1)):
                key = self.store_key(i, name)
                with clock.stage(name):
                    plan = tower_plan(tower, vit_static, keep_static_rows, self.model.device)
                    store = self.tower_stores[key] if keep and method.vit_store else None
                    out = run_tower(tower, px, plan, store, self.frame, observer)
                image_features.append(out.features)
                vit_work[key] = out.work
            features.append(torch.cat(image_features, dim=2))
            patches.append(out.patches + i * n if i else out.patches)
        return _cat(features, 1), _cat(patches, 0), vit_work

    def _ttf_fuse(self, features: torch.Tensor, tower_static: torch.Tensor | None) -> torch.Tensor:
        """TTF: each tower's static patches' output tokens replaced by its cached fused tokens (per-tower masks,
        as TTF's `PrismaticVisionBackbone.forward` fuses them); the cache holds the fused tokens."""
        if tower_static is not None and self.fused_features is not None:
            widths = (self.model.config.dino.hidden_size, self.model.config.siglip.hidden_size)
            static = torch.cat([m[:, None].expand(-1, w) for m, w in zip(tower_static, widths)], dim=1)  # [vision, dim]
            features = torch.where(static[None], self.fused_features, features)
        self.fused_features = features.clone()
        return features

    def _llm_plans(self, method: Method, input_ids: torch.Tensor, projected: torch.Tensor, patches: torch.Tensor,
                   reuse: Reuse, extra) -> tuple[list[LayerPlan], torch.Tensor, int, torch.Tensor]:
        """Layer plans, the first layer's input embeddings (rows in position order), sequence length, and
        which vision tokens take K/V from the store at each layer ([layer, vision] bool, on the host)."""
        device, n_vision = projected.device, self.num_vision
        if patches.numel() == n_vision:  # every vision token, in order
            vision = projected
        else:
            vision = projected.new_zeros(1, n_vision, projected.shape[-1])
            vision[:, patches] = projected
        embeds = self._sequence(input_ids.to(device), vision, extra)  # [1, seq, llm_hidden]
        seq_len = embeds.shape[1]
        layers = self.model.config.llm.num_layers
        if method.llm == "vla_cache":
            plans, llm_reuse = vla_cache_plans(layers, seq_len, n_vision, reuse.llm_skip, device)
        else:
            # BOS never changes under causal attention; under bidirectional attention it reads the whole sequence
            bos_static = self.bos_stored and self.causal
            plans, llm_reuse = mask_plans(method.llm, layers, seq_len, n_vision, reuse.static_host, bos_static,
                                          self.config.faithful, device)
        if plans[0].rows.numel() != seq_len:
            embeds = embeds[:, plans[0].rows]  # [1, row, llm_hidden]
        return plans, embeds, seq_len, llm_reuse

    def _bookkeep(self, out: Forward, selection: Selection | None, reuse: Reuse, images224: list[np.ndarray] | None,
                  latency_ms: dict[str, float]) -> StepRecord:
        """Keep what the next frame's selection needs; return the frame's record.

        The readout, the selectors' relevance and VLA-Cache's entropies are read from the device together: the
        frame's one read after the forward."""
        frame, n_layers = self.frame, self.model.config.llm.num_layers
        readout = self._readout_values(out.readout)  # [values] float64: holds token ids and float32 values exactly
        parts = [readout]
        if self.method.needs_relevance:
            probs = out.prefill.text_probs[self.config.attention_layer_id]
            parts.append(text_relevance(probs, self.relevance_rows, len(self.image_names),
                                        self.model.config.num_patches).double())
        if out.prefill.entropy:
            parts.append(torch.stack([out.prefill.entropy[layer] for layer in range(n_layers)]).double())
        host = torch.cat(parts).cpu().numpy()
        values, rest = host[:readout.numel()], host[readout.numel():]
        relevance = None
        if self.method.needs_relevance:
            relevance, rest = torch.from_numpy(rest[:self.num_vision].astype(np.float32)), rest[self.num_vision:]
        self.prev_relevance, self.prev_images = relevance, images224
        if out.prefill.entropy:
            self.prev_entropy = torch.from_numpy(rest[:n_layers].astype(np.float32)).to(self.entropy_dtype)  # exact
        stale = out.llm_reuse.numpy().any(0)  # [vision]
        if reuse.static_host is not None:
            stale = stale | reuse.static_host
        self.last_fresh.numpy()[~stale] = frame
        self.last_reuse = float(stale.mean())  # the LIBERO evaluation records it per step
        self.last = self._prediction(out.readout, values)
        return StepRecord(
            frame=frame, selection=selection, vit_work=out.vit_work, llm_work=out.prefill.work,
            llm_reuse=out.llm_reuse, projector_rows=out.projector_rows, seq_len=out.seq_len,
            flops=self._flops(out), latency_ms=latency_ms, relevance=relevance, staleness=frame - self.last_fresh,
            prediction=self.last, text_probs=out.prefill.text_probs,
        )

    # ------------------------------------------------------------------------------------------- shadow pass
    @torch.inference_mode()
    def shadow_pass(self, input_ids: torch.Tensor, pixel_values: torch.Tensor, extra=None, observer=None) -> Forward:
        """A full recompute of a frame (`StepRecord.inputs`) through the same stages as `vanilla`, reading and
        keeping no store: the reference of drift recording."""
        return self._forward(VANILLA, input_ids, pixel_values, extra, Reuse(), StageClock(self.model.device),
                             keep=False, observer=observer)

    def prediction_of(self, readout: tuple):
        """The prediction a readout gives (e.g. the shadow pass's `Forward.readout`), read to the host."""
        return self._prediction(readout, self._readout_values(readout).cpu().numpy())

    # ------------------------------------------------------------------------------------- the family's hooks
    def _extra_tokens(self, extra):
        """The family's extra input projected into LLM tokens, in the projector stage (default: none)."""
        return None

    def _sequence(self, input_ids: torch.Tensor, vision: torch.Tensor, extra) -> torch.Tensor:
        """The LLM's input embeddings [1, seq, llm_hidden], the vision tokens at positions 1..num_vision."""
        raise NotImplementedError

    def _readout_positions(self, input_ids: torch.Tensor) -> slice | None:
        """Positions whose final-norm states the prefill returns (None: the last position's logits)."""
        return None

    def _readout(self, out: PrefillOutput, clock: StageClock) -> tuple:
        """What the family reads out of the prefill (its own stage: OpenVLA's decode, OFT's head), on the device."""
        raise NotImplementedError

    def _readout_values(self, readout: tuple) -> torch.Tensor:
        """The readout as one flat float64 tensor on the device, for the frame's one read."""
        raise NotImplementedError

    def _prediction(self, readout: tuple, values: np.ndarray):
        """The frame's prediction from the readout and its values read to the host."""
        raise NotImplementedError

    def _flops(self, out: Forward) -> dict[str, int]:
        raise NotImplementedError


def _cat(tensors: list[torch.Tensor], dim: int) -> torch.Tensor:
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors, dim=dim)
