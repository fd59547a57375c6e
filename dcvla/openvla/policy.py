"""`CachedPolicy`: any registered method behind the streaming API, `reset()` per episode, `step(image,
instruction)` per frame. Vanilla is this policy with nothing reused and no store kept.

One frame runs in stages: the selection (which patches may reuse), the towers, the projector, the LLM prefill and
the decode. `_forward` runs the stages for a given `Method`; a step runs it for its own method, and the shadow
pass of drift recording runs the same stages as `vanilla`, with no store.

A step reads the device as few times as it can (on a GPU each read waits for every kernel queued before it): the
selector reads its pixel scores once, every reuse decision and row plan is made on the host from host-side masks
and reaches the device in one copy per plan, and the bookkeeping reads the action tokens, the relevance and
VLA-Cache's entropies together, once (`benchmarks/host_syncs.py` counts them).

A step that raises after it has started to change the episode's state (a store half written, say, by an
out-of-memory error in the prefill) leaves the policy broken: further steps raise until `reset()`, rather than
run on stores that mix two frames.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np
import torch

from ..images import resize_image, validate_image
from ..kv_store import KVStore, LayerPlan, to_device
from ..streaming import EpisodeGuard, StageClock
from ..tokenizer import load_tokenizer
from . import flops as F
from .actions import unnormalize_action
from .checkpoint import load_pretrained, resolve_checkpoint_dir
from .config import get_preset
from .llm_cache import PrefillOutput, PrefillRequest, new_llm_store, prefill
from .methods import METHODS, CacheConfig, Method
from .model import ActionPrediction, OpenVLA, random_model
from .processing import Processor
from .ttf_selector import Selection, UnifiedTokenSelector, text_relevance
from .vit_cache import new_tower_store, run_tower, tower_plan
from .vla_cache import vla_cache_layer_reuse, vla_cache_static_patches

VANILLA = METHODS["vanilla"]


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
    inputs: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, repr=False)  # (input_ids, pixel_values)
                                       # while an observer needs a shadow pass


@dataclass
class Reuse:
    """One frame's reuse decision: the unified mask, TTF's per-tower masks and VLA-Cache's per-layer schedule
    (None: not used)."""

    static: torch.Tensor | None = None      # [patch] bool on the device: the unified selector's reuse mask
    static_host: np.ndarray | None = None   # [patch] bool: the same mask on the host (plans are made from it)
    tower_static: torch.Tensor | None = None  # [2, patch] bool on the device: TTF's mask per tower (DINOv2, SigLIP)
    llm_skip: torch.Tensor | None = None    # [layer, patch] bool on the host: VLA-Cache's tokens skipping each layer


@dataclass
class Forward:
    """The stages' outputs for one frame."""

    vit_work: dict[str, list[F.LayerWork]]
    projector_rows: int
    seq_len: int
    llm_reuse: torch.Tensor     # [layer, patch] bool, on the host
    prefill: PrefillOutput
    token_ids: torch.Tensor     # [action_dim]
    logits: torch.Tensor        # [action_dim, vocab] float32


class CachedPolicy:
    """A method of `METHODS` as a closed-loop policy (lerobot-style `reset()` / `step()`).

    Args:
        model: the VLA.
        processor: turns (image, instruction) into model inputs.
        config: the method and its parameters (default: the dual cache).
    """

    def __init__(self, model: OpenVLA, processor: Processor, config: CacheConfig | None = None) -> None:
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
        self.selector = UnifiedTokenSelector(config.selector_config(), patch_size=model.config.dino.patch_size)
        self.vla_config = config.vla_cache_config()
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
    def from_preset(cls, preset: str = "tiny", seed: int = 0, config: CacheConfig | None = None) -> "CachedPolicy":
        """Random weights of a preset's architecture with dcvla's offline tokenizer."""
        model = random_model(get_preset(preset), seed)
        return cls(model, Processor(load_tokenizer(), model.config), config)

    @classmethod
    def from_pretrained(cls, path_or_id: str | os.PathLike, config: CacheConfig | None = None, preset: str | None = None,
                        dtype: torch.dtype = torch.float32, device: str = "cpu") -> "CachedPolicy":
        """A checkpoint in OpenVLA's layout; its own tokenizer if it ships one, else dcvla's offline one."""
        directory = resolve_checkpoint_dir(path_or_id)
        model = load_pretrained(directory, preset, dtype=dtype, device=device)
        folder = directory if directory.is_dir() else directory.parent
        has_tokenizer = any((folder / f).exists() for f in ("tokenizer.json", "tokenizer.model"))
        if model.config.name == "openvla-7b" and not has_tokenizer:
            raise FileNotFoundError(f"{folder} has no Llama-2 tokenizer (tokenizer.json or tokenizer.model)")
        tokenizer = load_tokenizer(folder if has_tokenizer else None)
        return cls(model, Processor(tokenizer, model.config), config)

    def with_config(self, config: CacheConfig) -> "CachedPolicy":
        """Another method on the same model and processor (no weights copied)."""
        return CachedPolicy(self.model, self.processor, config)

    # ------------------------------------------------------------------------------------------- episode state
    def reset(self) -> None:
        """Forget the episode: caches, selector history, frame counter. Only the stores a method reads exist."""
        model, method = self.model, self.method
        self.frame = 0
        self.guard.reset()
        self.prev_relevance: torch.Tensor | None = None
        self.prev_image: np.ndarray | None = None      # VLA-Cache compares raw 224 pixels
        self.prev_entropy: torch.Tensor | None = None  # [layer] VLA-Cache's schedule input
        self.selector.reset()
        self.tower_stores: dict[str, KVStore] | None = (
            {name: new_tower_store(t, model.dtype, model.device) for name, t in model.vision_backbone.towers.items()}
            if method.vit_store else None)
        self.llm_store: KVStore | None = (
            new_llm_store(model.language_model, 1 + model.config.num_patches, store_queries=method.llm == "kqv")
            if method.llm_store else None)  # BOS + vision slots
        self.fused_features: torch.Tensor | None = None  # TTF's cache of fused ViT output tokens
        self.last_fresh = torch.full((model.config.num_patches,), -1, dtype=torch.long)
        self.bos_stored = False  # the LLM store holds BOS's K/V (written by the episode's first prefill)
        self.last: ActionPrediction | None = None
        self.records: list[StepRecord] = []
        self.broken = False      # a step failed mid-way: the stores may mix two frames until this reset

    # ----------------------------------------------------------------------------------------------- one frame
    @torch.inference_mode()
    def step(self, image, instruction: str) -> np.ndarray:
        """One frame -> the un-normalised 7-dim action; `self.last` keeps its tokens and logits.

        Inputs are checked before anything changes; an error after that (out of memory, an observer's) marks the
        policy broken, and every later step raises until `reset()`.
        """
        if self.broken:
            raise RuntimeError(f"the previous step of this {self.name} policy failed mid-way, so its caches may "
                               "mix two frames; call reset() before the next step")
        image = validate_image(image)
        input_ids, pixel_values = self.processor(image, instruction)
        self.guard.check(image.shape, input_ids)
        try:
            return self._step(image, input_ids, pixel_values)
        except BaseException:
            self.broken = True
            raise

    def _step(self, image: np.ndarray, input_ids: torch.Tensor, pixel_values: torch.Tensor) -> np.ndarray:
        pixel_values = pixel_values.to(self.model.device, self.model.dtype)
        clock = StageClock(self.model.device)
        with clock.stage("select"):
            selection, reuse, image224 = self._select(image, pixel_values)
        out = self._forward(self.method, input_ids, pixel_values, reuse, clock, keep=True, observer=self.observer)
        record = self._bookkeep(out, selection, reuse, image224, clock.ms)
        if self.keep_records:
            self.records.append(record)
        if self.observer is not None:
            record.inputs = (input_ids, pixel_values)
            self.observer.on_step(record)
            record.inputs = None
        self.frame += 1
        return self.last.action

    def _select(self, image: np.ndarray, pixel_values: torch.Tensor) -> tuple[Selection | None, Reuse, np.ndarray | None]:
        """The unified selector's mask and, for VLA-Cache, its per-layer schedule (and the 224 image it compares)."""
        selection, reuse, image224 = None, Reuse(), None
        if self.method.unified_selector:
            selection = self.selector.select(pixel_values, self.prev_relevance)
            reuse.static_host = selection.reuse.numpy()
            reuse.static = to_device(reuse.static_host, self.model.device)
            if self.method.vit == "ttf":  # TTF keeps one mask per tower
                reuse.tower_static = to_device(selection.tower_reuse.numpy(), self.model.device)
        if self.method.llm == "vla_cache":
            image224 = resize_image(image, self.model.config.dino.image_size)
            if self.prev_image is not None and self.prev_entropy is not None:
                reusable = vla_cache_static_patches(self.prev_image, image224, self.prev_relevance, self.vla_config)
                reuse.llm_skip = vla_cache_layer_reuse(reusable, self.prev_entropy, self.vla_config)  # [layer, patch]
        return selection, reuse, image224

    def _forward(self, method: Method, input_ids: torch.Tensor, pixel_values: torch.Tensor, reuse: Reuse,
                 clock: StageClock, keep: bool, observer=None) -> Forward:
        """The towers, projector, prefill and decode of one frame under `method` and `reuse`.

        Args:
            keep: read and refresh the episode's stores (False: the shadow pass, nothing read or kept).
            observer: receives every layer's Q/K/V as used (`on_layer`).
        """
        model = self.model
        features, patches, vit_work = self._towers(method, pixel_values, reuse.static_host, clock, keep, observer)
        if method.vit == "ttf":
            features = self._ttf_fuse(features, reuse.tower_static)
        with clock.stage("projector"):
            projected = model.projector(features)  # [1, computed patch, llm_hidden]
        plans, embeds, seq_len, llm_reuse = self._llm_plans(method, input_ids, projected, patches, reuse)
        request = PrefillRequest(
            self.llm_store if keep else None, self.frame, text_start=1 + model.config.num_patches,
            prob_layers=(self.prob_layers | self.observed_prob_layers) if keep else frozenset(),
            entropy_layers=self.entropy_layers if keep else frozenset(), entropy_dtype=self.entropy_dtype,
            observer=observer)
        with clock.stage("llm_prefill"):
            out = prefill(model.language_model, embeds, seq_len, plans, request)
        if request.store is not None:
            self.bos_stored = True  # every plan carries BOS fresh until the store holds it
        with clock.stage("llm_decode"):
            token_ids, logits = model.decode_actions(out.logits, out.cache)
        return Forward(vit_work, int(projected.shape[1]), seq_len, llm_reuse, out, token_ids, logits)

    def _towers(self, method: Method, pixel_values: torch.Tensor, static: np.ndarray | None, clock: StageClock,
                keep: bool, observer) -> tuple[torch.Tensor, torch.Tensor, dict[str, list[F.LayerWork]]]:
        """Both towers -> (features [1, computed patch, vision_dim], which patches, work per tower)."""
        # The static patches' rows are dropped when nothing reads them: the LLM takes those tokens from its store.
        keep_static_rows = method.llm != "kqv" or self.config.faithful
        vit_static = static if method.vit == "kv" else None  # on the host
        features, vit_work, patches = [], {}, None
        towers = self.model.vision_backbone.towers.items()
        for (name, tower), px in zip(towers, torch.split(pixel_values, [3, 3], dim=1)):
            with clock.stage(name):
                plan = tower_plan(tower, vit_static, keep_static_rows, self.model.device)
                store = self.tower_stores[name] if keep and method.vit_store else None
                out = run_tower(tower, px, plan, store, self.frame, observer)
            features.append(out.features)
            patches, vit_work[name] = out.patches, out.work
        return torch.cat(features, dim=2), patches, vit_work

    def _ttf_fuse(self, features: torch.Tensor, tower_static: torch.Tensor | None) -> torch.Tensor:
        """TTF: each tower's static patches' output tokens replaced by its cached fused tokens (per-tower masks,
        as TTF's `PrismaticVisionBackbone.forward` fuses them); the cache holds the fused tokens."""
        if tower_static is not None and self.fused_features is not None:
            widths = (self.model.config.dino.hidden_size, self.model.config.siglip.hidden_size)
            static = torch.cat([m[:, None].expand(-1, w) for m, w in zip(tower_static, widths)], dim=1)  # [patch, dim]
            features = torch.where(static[None], self.fused_features, features)
        self.fused_features = features.clone()
        return features

    def _llm_plans(self, method: Method, input_ids: torch.Tensor, projected: torch.Tensor, patches: torch.Tensor,
                   reuse: Reuse) -> tuple[list[LayerPlan], torch.Tensor, int, torch.Tensor]:
        """Layer plans, the first layer's input embeddings (rows in position order), sequence length, and
        which vision tokens take K/V from the store at each layer ([layer, patch] bool, on the host)."""
        model, cfg = self.model, self.model.config
        device = projected.device
        text = model.language_model.get_input_embeddings()(input_ids.to(device))  # [1, text, llm_hidden]
        seq_len = text.shape[1] + cfg.num_patches
        if method.llm == "vla_cache":
            plans, llm_reuse = self._vla_cache_plans(seq_len, reuse.llm_skip, device)
        else:
            plans, llm_reuse = self._mask_plans(method, seq_len, reuse.static_host, device)
        # input embeddings of the first layer's rows: BOS/text from the token table, vision from the projector
        if patches.numel() == cfg.num_patches:  # every patch, in order
            vision = projected.to(text.dtype)
        else:
            vision = torch.zeros(1, cfg.num_patches, text.shape[-1], dtype=text.dtype, device=device)
            vision[:, patches] = projected.to(text.dtype)
        embeds = torch.cat([text[:, :1], vision, text[:, 1:]], dim=1)  # [1, seq, llm_hidden]
        if plans[0].rows.numel() != seq_len:
            embeds = embeds[:, plans[0].rows]  # [1, row, llm_hidden]
        return plans, embeds, seq_len, llm_reuse

    def _vla_cache_plans(self, seq_len: int, llm_skip: torch.Tensor | None,
                         device: torch.device) -> tuple[list[LayerPlan], torch.Tensor]:
        """VLA-Cache: a layer's skipped vision rows are dropped (no Q, no K/V, no MLP); their K/V are the store's.
        Made on the host from the host-side schedule; a layer whose rows are the previous layer's shares its plan."""
        layers, n_patches = self.model.config.llm.num_layers, self.model.config.num_patches
        skip = (llm_skip.numpy() if llm_skip is not None
                else np.zeros((layers, n_patches), dtype=bool))  # [layer, patch]
        plans: list[LayerPlan] = []
        for layer in range(layers):
            if layer and np.array_equal(skip[layer], skip[layer - 1]):
                plans.append(plans[-1])
                continue
            keep = np.ones(seq_len, dtype=bool)
            keep[1 : 1 + n_patches] = ~skip[layer]
            rows = np.flatnonzero(keep)
            ones = np.ones(len(rows), dtype=bool)
            plans.append(LayerPlan.from_host(rows, ones, ones, device))
        return plans, torch.from_numpy(skip)

    def _mask_plans(self, method: Method, seq_len: int, static: np.ndarray | None,
                    device: torch.device) -> tuple[list[LayerPlan], torch.Tensor]:
        """The unified mask at every layer: static vision tokens' K/V (kv) or Q/K/V (kqv) from the store. One plan,
        made on the host from the selector's host-side mask, serves every layer."""
        layers, n_patches = self.model.config.llm.num_layers, self.model.config.num_patches
        reuse = np.zeros((layers, n_patches), dtype=bool)  # [layer, patch]
        slot_static = np.zeros(seq_len, dtype=bool)  # [seq]: K/V from the store
        if method.llm in ("kqv", "kv") and static is not None and static.any():
            reuse[:] = static
            slot_static[1 : 1 + n_patches] = static
            slot_static[0] = self.bos_stored  # BOS never changes
        drop = method.llm == "kqv" and not self.config.faithful
        rows = np.flatnonzero(~slot_static) if drop else np.arange(seq_len)
        kv_fresh = ~slot_static[rows]
        q_fresh = kv_fresh.copy() if method.llm == "kqv" else np.ones_like(kv_fresh)
        return [LayerPlan.from_host(rows, kv_fresh, q_fresh, device)] * layers, torch.from_numpy(reuse)

    def _bookkeep(self, out: Forward, selection: Selection | None, reuse: Reuse, image224: np.ndarray | None,
                  latency_ms: dict[str, float]) -> StepRecord:
        """Keep what the next frame's selection needs; return the frame's record.

        The action tokens, the selector's relevance and VLA-Cache's entropies are read from the device together:
        the frame's one read after the forward."""
        model, frame = self.model, self.frame
        n_layers = model.config.llm.num_layers
        parts = [out.token_ids.double()]  # float64 holds the token ids and the float32 values exactly
        if self.method.needs_relevance:
            parts.append(text_relevance(out.prefill.text_probs[self.config.attention_layer_id]).double())
        if out.prefill.entropy:
            parts.append(torch.stack([out.prefill.entropy[layer] for layer in range(n_layers)]).double())
        host = torch.cat(parts).cpu().numpy()
        n_ids = out.token_ids.numel()
        token_ids, rest = host[:n_ids].astype(np.int64), host[n_ids:]
        relevance, n_patches = None, model.config.num_patches
        if self.method.needs_relevance:
            relevance, rest = torch.from_numpy(rest[:n_patches].astype(np.float32)), rest[n_patches:]
        self.prev_relevance, self.prev_image = relevance, image224
        if out.prefill.entropy:
            self.prev_entropy = torch.from_numpy(rest[:n_layers].astype(np.float32)).to(self.entropy_dtype)  # exact
        stale = out.llm_reuse.numpy().any(0)  # [patch]
        if reuse.static_host is not None:
            stale = stale | reuse.static_host
        self.last_fresh.numpy()[~stale] = frame
        normalized = model.action_tokenizer.decode(token_ids)
        action = unnormalize_action(normalized, model.action_stats(self.unnorm_key))
        self.last = ActionPrediction(out.token_ids, out.logits, normalized, action)
        return StepRecord(
            frame=frame, selection=selection, vit_work=out.vit_work, llm_work=out.prefill.work,
            llm_reuse=out.llm_reuse, projector_rows=out.projector_rows, seq_len=out.seq_len,
            flops=self._flops(out), latency_ms=latency_ms, relevance=relevance, staleness=frame - self.last_fresh,
            prediction=self.last, text_probs=out.prefill.text_probs,
        )

    def _flops(self, out: Forward) -> dict[str, int]:
        cfg = self.model.config
        return {
            "dino": F.vit_flops(cfg.dino, out.vit_work["dino"]),
            "siglip": F.vit_flops(cfg.siglip, out.vit_work["siglip"]),
            "projector": F.projector_flops(cfg, out.projector_rows),
            "llm_prefill": F.llm_flops(cfg.llm, out.prefill.work),
            "llm_decode": F.decode_flops(cfg, out.seq_len),
        }

    # ------------------------------------------------------------------------------------------- shadow pass
    @torch.inference_mode()
    def shadow_pass(self, input_ids: torch.Tensor, pixel_values: torch.Tensor, observer=None) -> Forward:
        """A full recompute of a frame through the same stages as `vanilla`, reading and keeping no store: the
        reference of drift recording."""
        return self._forward(VANILLA, input_ids, pixel_values, Reuse(), StageClock(self.model.device), keep=False,
                             observer=observer)
