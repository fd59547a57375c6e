"""Prefix K/V reuse across control steps for the Pi0-style policy: one config, one registry of modes, one policy.

Every control step computes the image tokens (the gate needs them), then a gate compares them, flattened, with
the reference step's by cosine similarity (and the state tokens too, for the synchronized gate). When the gate
opens, the mode's spans of the prefix take their K/V from the episode's store instead of being computed:

| mode         | spans reused when the gate opens              | gate                                  |
|--------------|-----------------------------------------------|---------------------------------------|
| none         | nothing (the no-reuse reference)              | never opens                           |
| full         | vision + text + state: the prefix is skipped  | vision similarity >= threshold        |
| vision_only  | vision                                        | vision similarity >= threshold        |
| state_only   | state                                         | vision similarity >= threshold        |
| text_fixed   | text                                          | vision similarity >= threshold        |
| layer_wise   | vision, in layers >= layer_wise_from only     | vision similarity >= threshold        |
| synchronized | vision + text + state                         | vision AND state similarity >= threshold |

A reused span's rows are not computed in the layers where they are reused (the prefix attention is bidirectional,
so the recomputed rows attend to the stale K/V; layer_wise recomputes the vision rows below `layer_wise_from` and
drops them above). Cosine similarity never exceeds 1, so a threshold above 1 never reuses and every step is the
no-reuse computation exactly. The store is per episode: `reset()` empties it and the first step recomputes all.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field

import numpy as np
import torch

from ..images import resize_image, validate_image
from ..kv_store import KVStore, LayerPlan
from ..stats import resolve_unnorm_key
from ..streaming import EpisodeGuard, StageClock
from ..tokenizer import load_tokenizer
from .config import LIBERO_ACTION_DIM, REPLAN_STEPS, SPANS
from .model import Pi0Model, PrefixInputs, random_pi0, run_prefix


@dataclass(frozen=True)
class ReuseMode:
    spans: tuple[str, ...]          # prefix spans whose K/V are reused when the gate opens
    gate: str                       # "never" | "vision" | "vision+state"
    upper_layers_only: bool = False  # reuse only in layers >= layer_wise_from (layer_wise)


MODES: dict[str, ReuseMode] = {
    "none": ReuseMode((), "never"),
    "full": ReuseMode(SPANS, "vision"),
    "vision_only": ReuseMode(("vision",), "vision"),
    "state_only": ReuseMode(("state",), "vision"),
    "text_fixed": ReuseMode(("text",), "vision"),
    "layer_wise": ReuseMode(("vision",), "vision", upper_layers_only=True),
    "synchronized": ReuseMode(SPANS, "vision+state"),
}
COMPARE_TO = ("previous", "anchor")


@dataclass
class ReuseConfig:
    """Everything that decides what the Pi0 policy reuses. Flat; the stability_cliff notebook mirrors it."""

    mode: str = "full"                 # a name from MODES
    threshold: float = 0.985           # cosine similarity at or above which the gate opens (> 1: never)
    compare_to: str = "previous"       # "previous": the last step's embeddings (the report's gate);
                                       # "anchor": those of the step that last computed the reused spans
    layer_wise_from: int | None = None  # layer_wise: first prefix layer whose vision K/V are reused (None: depth // 2)
    replan_steps: int = REPLAN_STEPS   # closed loop: actions of each chunk executed before the next inference
    unnorm_key: str | None = None      # dataset statistics (None: the model's only entry)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"ReuseConfig.mode: unknown mode {self.mode!r}; known: {', '.join(MODES)}")
        if not isinstance(self.threshold, numbers.Real) or not math.isfinite(self.threshold) or self.threshold < -1:
            raise ValueError(f"ReuseConfig.threshold must be a finite cosine similarity >= -1 (> 1 never reuses), got {self.threshold!r}")
        if self.compare_to not in COMPARE_TO:
            raise ValueError(f"ReuseConfig.compare_to must be one of {COMPARE_TO}, got {self.compare_to!r}")
        if self.layer_wise_from is not None and self.layer_wise_from < 0:
            raise ValueError(f"ReuseConfig.layer_wise_from must be >= 0, got {self.layer_wise_from}")
        if self.replan_steps < 1:
            raise ValueError(f"ReuseConfig.replan_steps must be >= 1, got {self.replan_steps}")


@dataclass
class Pi0StepRecord:
    """What one control step did."""

    step: int
    gate: bool                          # the gate opened (the mode's spans were reused)
    vision_similarity: float            # cosine similarity to the reference step's image tokens (NaN: no reference)
    state_similarity: float             # the same for the state token
    span_reuse: torch.Tensor            # [span, layer] bool: the span's K/V came from the store at that layer
    staleness: torch.Tensor             # [span] long: steps since the span's K/V were last computed (oldest layer)
    reuse_fraction: float               # share of the prefix's (token, layer) K/V taken from the store
    chunk: np.ndarray                   # [horizon, 7] un-normalised actions
    chunk_normalized: torch.Tensor      # [1, horizon, action_dim] the flow's output
    noise: torch.Tensor                 # [1, horizon, action_dim] the flow's starting point
    flops: dict[str, int]
    latency_ms: dict[str, float]
    inputs: PrefixInputs | None = field(default=None, repr=False)  # kept while an observer needs a shadow pass


class Pi0Policy:
    """The Pi0-style policy behind the streaming API: `reset()` per episode, `step(image, instruction, state)`.

    Args:
        model: the Pi0 model.
        tokenizer: prompt tokenizer (BOS first).
        config: the reuse mode and its parameters.
        seed: seeds the flow's noise; every episode (every `reset()`) draws the same noise sequence, so runs of
            different modes on the same frames differ only by what they reuse.
    """

    uses_state = True              # LIBERO runners pass the robot state
    action_convention = "libero"   # gripper -1 open / +1 close, no flip (Pi0 is trained on LIBERO's convention)

    def __init__(self, model: Pi0Model, tokenizer, config: ReuseConfig | None = None, seed: int = 0) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.config = config or ReuseConfig()
        self.mode = MODES[self.config.mode]
        self.name = self.config.mode
        self.seed = seed
        depth = model.config.num_layers
        self.layer_wise_from = depth // 2 if self.config.layer_wise_from is None else self.config.layer_wise_from
        if self.layer_wise_from >= depth:
            raise ValueError(f"ReuseConfig.layer_wise_from={self.layer_wise_from} is past the prefix LM's {depth} layers")
        key = resolve_unnorm_key(model.norm_stats, self.config.unnorm_key)
        stats = model.norm_stats[key]
        self.state_mean, self.state_std = (torch.tensor(stats["state"][k], dtype=torch.float32) for k in ("mean", "std"))
        self.action_mean, self.action_std = (np.asarray(stats["action"][k], np.float32) for k in ("mean", "std"))
        self.replan_steps = self.config.replan_steps
        self.observer = None           # a Recorder attaches itself here while it records
        self.keep_records = True
        self.guard = EpisodeGuard(self.name)
        self.reset()

    @classmethod
    def from_preset(cls, preset: str = "pi0-tiny", seed: int = 0, config: ReuseConfig | None = None) -> "Pi0Policy":
        """Random weights of a preset's architecture with dcvla's offline tokenizer; `seed` seeds both the weights
        and the flow's noise."""
        return cls(random_pi0(preset, seed), load_tokenizer(), config, seed=seed)

    def with_config(self, config: ReuseConfig) -> "Pi0Policy":
        """Another mode on the same model and tokenizer (no weights copied)."""
        return Pi0Policy(self.model, self.tokenizer, config, self.seed)

    # ------------------------------------------------------------------------------------------- episode state
    def reset(self) -> None:
        """Forget the episode: the K/V store, the gate's reference, the step counter, the noise sequence."""
        self.step_index = 0
        self.store: KVStore | None = None
        self.ref_vision: torch.Tensor | None = None
        self.ref_state: torch.Tensor | None = None
        self.guard.reset()
        self.generator = torch.Generator().manual_seed(self.seed)
        self.last: Pi0StepRecord | None = None
        self.records: list[Pi0StepRecord] = []

    # ---------------------------------------------------------------------------------------------- inputs
    def encode_prompt(self, instruction: str) -> torch.Tensor:
        """openpi's prompt: the instruction cleaned (underscores, newlines to spaces), BOS first, "\\n" last; a
        ValueError when the prefix and the action positions would pass the Gemma's `max_position_embeddings`."""
        if not isinstance(instruction, str):
            raise TypeError(f"instruction must be a str, got {type(instruction).__name__}")
        cleaned = instruction.strip().replace("_", " ").replace("\n", " ")
        if not cleaned:
            raise ValueError("instruction is empty; the policy needs a task description")
        ids = self.tokenizer(cleaned + "\n").input_ids
        if ids[0] != self.tokenizer.bos_token_id:
            ids = [self.tokenizer.bos_token_id, *ids]
        # the prefix [image | text | state] and then the expert's action positions share one RoPE position range
        cfg = self.model.config
        limit = min(self.model.language_model.config.max_position_embeddings, self.model.expert.config.max_position_embeddings)
        total = cfg.num_image_tokens + len(ids) + 1 + cfg.action_horizon
        if total > limit:
            over = total - limit
            raise ValueError(
                f"instruction too long: the Gemma would see {total} positions ({cfg.num_image_tokens} image + {len(ids)} "
                f"text + 1 state tokens, then {cfg.action_horizon} action positions), past its max_position_embeddings "
                f"of {limit}; shorten the instruction by at least {over} tokens (about "
                f"{-(-over * len(instruction) // len(ids))} of its {len(instruction)} characters)"
            )
        return torch.tensor([ids], dtype=torch.long)

    def normalize_state(self, state) -> torch.Tensor:
        """A 1-D finite robot state (LIBERO: 8 values) -> zero-padded, normalised [state_dim] float32."""
        dim = self.model.config.state_dim
        arr = np.asarray(state, dtype=np.float64)
        if arr.ndim != 1 or not 1 <= arr.shape[0] <= dim:
            raise ValueError(f"state must be a 1-D array of at most {dim} values (LIBERO: 8), got shape {arr.shape}")
        if not np.isfinite(arr).all():
            raise ValueError(f"state has non-finite values: {arr}")
        padded = torch.zeros(dim, dtype=torch.float32)
        padded[: arr.shape[0]] = torch.from_numpy(arr).float()
        return (padded - self.state_mean) / self.state_std

    def pixel_values(self, image) -> torch.Tensor:
        """uint8 RGB [H, W, 3] -> [1, 3, 224, 224] in [-1, 1] (SigLIP's normalisation)."""
        return self._pixels(validate_image(image))

    def _pixels(self, image: np.ndarray) -> torch.Tensor:
        """`pixel_values` of an image `validate_image` has already checked."""
        size = self.model.config.vision.image_size
        if image.shape[:2] != (size, size):
            image = resize_image(image, size)
        px = torch.tensor(image).permute(2, 0, 1)[None].float() / 255.0
        return ((px - 0.5) / 0.5).to(self.model.device, self.model.dtype)

    @property
    def broken(self) -> bool:
        """A step failed mid-way: the store may mix two steps, and every step is refused until `reset()`."""
        return self.guard.broken

    # --------------------------------------------------------------------------------------------- one step
    @torch.inference_mode()
    def step(self, image, instruction: str, state) -> np.ndarray:
        """One control step -> the un-normalised action chunk [horizon, 7]; `self.last` keeps the record.

        Inputs are checked before anything changes; an error after that (out of memory in the expert, say, after the
        prefix has refreshed the store) marks the policy broken, and every later step raises until `reset()`."""
        self.guard.check_usable()
        input_ids = self.encode_prompt(instruction)
        state_n = self.normalize_state(state)
        image = validate_image(image)
        self.guard.check(image.shape, input_ids)
        with self.guard.changing():  # from here on the step changes the episode's state
            model, cfg = self.model, self.model.config
            clock = StageClock(model.device)
            with clock.stage("vision"):
                inputs = PrefixInputs(model.embed_image(self._pixels(image)), model.embed_text(input_ids.to(model.device)),
                                      model.embed_state(state_n.to(model.device)))
            with clock.stage("gate"):
                vision_sim, state_sim = _cosine(inputs.vision, self.ref_vision), _cosine(inputs.state, self.ref_state)
                gate = self._gate(vision_sim, state_sim)
                if self.store is None:
                    self.store = model.new_store(inputs.length)
                span_reuse = self._span_reuse(gate)  # [span, layer]
                plans = self._plans(inputs, span_reuse)
            with clock.stage("prefix"):
                out = run_prefix(model, inputs, plans, self.store, self.step_index)
            with clock.stage("expert"):
                noise = torch.randn(1, cfg.action_horizon, cfg.action_dim, generator=self.generator).to(model.device)
                actions = model.sample_actions(self.store, noise)
            if self.config.compare_to == "previous" or not gate:
                self.ref_vision, self.ref_state = inputs.vision, inputs.state
            record = Pi0StepRecord(
                step=self.step_index, gate=gate, vision_similarity=vision_sim, state_similarity=state_sim,
                span_reuse=span_reuse, staleness=self._staleness(inputs), reuse_fraction=float(out.reused.float().mean()),
                chunk=self.unnormalize(actions), chunk_normalized=actions, noise=noise,
                flops=model.stage_flops(out.work, inputs.length), latency_ms=clock.ms,
            )
            self._emit(record, inputs)
            return record.chunk

    def _emit(self, record: Pi0StepRecord, inputs: PrefixInputs) -> None:
        """Keep the record and hand it to the observer (with the prefix inputs its shadow pass needs)."""
        self.last = record
        if self.keep_records:
            self.records.append(record)
        if self.observer is not None:
            record.inputs = inputs
            self.observer.on_step(record)
            record.inputs = None
        self.step_index += 1

    def _gate(self, vision_sim: float, state_sim: float) -> bool:
        threshold, kind = self.config.threshold, self.mode.gate
        if kind == "never" or math.isnan(vision_sim):  # NaN: the episode's first step has nothing to reuse
            return False
        if kind == "vision+state":
            return vision_sim >= threshold and state_sim >= threshold
        return vision_sim >= threshold

    def _span_reuse(self, gate: bool) -> torch.Tensor:
        depth = self.model.config.num_layers
        reuse = torch.zeros(len(SPANS), depth, dtype=torch.bool)
        if gate:
            first = self.layer_wise_from if self.mode.upper_layers_only else 0
            for span in self.mode.spans:
                reuse[SPANS.index(span), first:] = True
        return reuse

    def _plans(self, inputs: PrefixInputs, span_reuse: torch.Tensor) -> list[LayerPlan]:
        """Per layer, the prefix rows computed: all but the reused spans' (a layer's rows shrink monotonically).
        Made on the host; a layer whose rows are the previous layer's shares its plan (one copy to the device each)."""
        spans, reuse = inputs.spans, span_reuse.numpy()  # [span, layer]
        plans: list[LayerPlan] = []
        for layer in range(reuse.shape[1]):
            if layer and np.array_equal(reuse[:, layer], reuse[:, layer - 1]):
                plans.append(plans[-1])
                continue
            keep = np.ones(inputs.length, dtype=bool)
            for i, span in enumerate(SPANS):
                if reuse[i, layer]:
                    keep[spans[span]] = False
            rows = np.flatnonzero(keep)
            ones = np.ones(len(rows), dtype=bool)
            plans.append(LayerPlan.from_host(rows, ones, ones, self.model.device))
        return plans

    def _staleness(self, inputs: PrefixInputs) -> torch.Tensor:
        computed = self.store.computed_at.cpu()  # [layer, slot]
        return torch.stack([self.step_index - computed[:, s].min() for s in inputs.spans.values()])

    def unnormalize(self, actions: torch.Tensor) -> np.ndarray:
        """[1, horizon, action_dim] normalised -> [horizon, 7] with the dataset's mean/std (LIBERO's 7 dims)."""
        a = actions[0, :, :LIBERO_ACTION_DIM].float().cpu().numpy()
        return a * self.action_std[:LIBERO_ACTION_DIM] + self.action_mean[:LIBERO_ACTION_DIM]

    # ------------------------------------------------------------------------------------------ shadow pass
    @torch.inference_mode()
    def no_reuse_pass(self, inputs: PrefixInputs, noise: torch.Tensor) -> tuple[torch.Tensor, KVStore]:
        """A full recompute of one step's prefix into a throwaway store, then the flow from the same noise:
        the reference of drift recording. Returns (actions [1, horizon, action_dim], the fresh store)."""
        store = self.model.new_store(inputs.length)
        depth = self.model.config.num_layers
        run_prefix(self.model, inputs, [LayerPlan.full(inputs.length, self.model.device)] * depth, store, 0)
        return self.model.sample_actions(store, noise), store


def _cosine(a: torch.Tensor, b: torch.Tensor | None) -> float:
    """Cosine similarity of two embeddings, flattened, in float32, clamped to [-1, 1] (float32 rounding can give
    1.0000002 for identical inputs, and a threshold above 1 must never open the gate). NaN without a reference."""
    if b is None:
        return float("nan")
    return float(torch.nn.functional.cosine_similarity(a.float().flatten(), b.float().flatten(), dim=0).clamp(-1.0, 1.0))
