"""`FlowPolicy`: a flow-matching VLA (pi0, pi0.5, SmolVLA) behind the streaming API, with K/V reuse across
inferences under a mode and a gate of `dcvla.prefix_reuse`. Each family subclasses it with its prompt, its image
preprocessing and its constructors (`dcvla.pi0.Pi0Policy`, `dcvla.smolvla.SmolVLAPolicy`).

One inference: the images are embedded (every gate needs them); the gate compares with its reference; the prefix
runs on the rows not reused (layer plans made on the host); a state token in the expert (pi0) goes through it once
unless reused; the flow integrates the chunk from the episode's seeded noise. The store is per episode.

What the policy needs of a model (`PiModel`, `SmolVLAModel`):
- `config`: `chunk_size`, `max_action_dim`, `max_state_dim`, `max_token_len`, `vocab_size`, `num_image_slots`, `image_size`,
  `prefix_depth`, `delta_action_dims`, `variant`, and `state_token`, where the state enters: "expert" (a token of
  the expert's suffix, its K/V from `expert_state_kv`), "prompt" (bins in the prompt), "prefix" (a projected token,
  last in the prefix) or "none";
- `normalization`, `device`, `dtype`; `prefix_inputs(pixels, present, token_ids, state)` -> `dcvla.flow.PrefixInputs`;
  `new_store(length)`; `run_prefix(inputs, plans, store, step)` -> `PrefixOutput`;
  `sample_actions(store, noise, state_kv=...)`; `stage_flops(work, prefix_len, num_images, state_reused)`.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from .flow import PrefixInputs
from .images import validate_image
from .kv_store import KVStore, LayerPlan
from .normalization import ACTION, STATE
from .prefix_reuse import GRIPPER, LIBERO_ACTION_DIM, MODES, SPANS, ReuseConfig, gate_opens, near_contact
from .streaming import EpisodeGuard, StageClock

STATE_TOKENS = ("expert", "prompt", "prefix", "none")


@dataclass
class StepInputs:
    """One inference's inputs, as the shadow pass needs them again."""

    prefix: PrefixInputs
    state: torch.Tensor | None    # the normalised state padded to max_state_dim where a token carries it, else None
    spans: dict[str, np.ndarray]  # span -> prefix rows (pi0's state span is in the expert: no rows)
    noise: torch.Tensor
    raw_state: np.ndarray         # as given (relative-action checkpoints add it back to their chunk)


@dataclass
class FlowStepRecord:
    """What one inference did."""

    step: int
    gate: bool                          # the gate opened (the mode's spans were reused)
    vision_similarity: float            # cosine similarity of the image tokens to the reference's (NaN: none)
    state_similarity: float             # the same for the normalised state
    pixel_change: float                 # mean |pixel change| of the cameras since the reference (NaN: none)
    near_contact: bool                  # phase_aware's detector: the gripper command flipped
    moved: tuple[str, ...]              # spans whose rows moved (pi0.5's prompt changed length): computed afresh
    spans: dict[str, np.ndarray]        # span -> its prefix rows (pi0's state: none, it is the expert's token)
    span_reuse: torch.Tensor            # [span, layer] bool: the span's K/V came from the store at that layer
    staleness: torch.Tensor             # [span] long: inferences since the span's K/V were last computed
    reuse_fraction: float               # share of the prefix's (token, layer) K/V taken from the store
    chunk: np.ndarray                   # [chunk, 7] un-normalised actions
    chunk_normalized: torch.Tensor      # [1, chunk, max_action_dim] the flow's output
    noise: torch.Tensor                 # [1, chunk, max_action_dim] the flow's starting point
    flops: dict[str, int]
    latency_ms: dict[str, float]
    inputs: StepInputs | None = field(default=None, repr=False)  # kept while an observer needs a shadow pass


class FlowPolicy:
    """A flow-matching VLA behind the streaming API: `reset()` per episode, `step(images, instruction, state)` per
    inference -> the un-normalised chunk [chunk_size, 7].

    Args:
        model: the model, with its normalisation.
        tokenizer: the prompt tokenizer (a fast tokenizer: pi0.5 locates the state's tokens by offsets).
        config: the reuse mode, gate and their parameters; none given: mode "none", every inference computed in
            full (what a policy loaded to be evaluated should do; a caching study names its mode).
        seed: seeds the flow's noise; every episode (every `reset()`) draws the same noise sequence, so runs of
            different modes on the same frames differ only by what they reuse.
    """

    family = ""                    # the recorder's `family` attribute
    uses_state = True              # LIBERO runners pass the robot state
    uses_wrist = True              # and [agent view, wrist view]
    action_convention = "libero"   # gripper -1 open / +1 close, no flip (trained on LIBERO's convention)
    prepend_bos = False            # the prompt starts with the tokenizer's BOS, added if the tokenizer does not

    def __init__(self, model, tokenizer, config: ReuseConfig | None = None, seed: int = 0) -> None:
        if model.normalization is None:
            raise ValueError("the model has no normalisation statistics (a checkpoint without policy_preprocessor.json?)")
        if model.config.state_token not in STATE_TOKENS:
            raise ValueError(f"the model's config.state_token must be one of {STATE_TOKENS}, got {model.config.state_token!r}")
        self.model, self.tokenizer = model, tokenizer
        self.config = config or ReuseConfig(mode="none")
        self.mode = MODES[self.config.mode]
        self.name, self.gate_name = self.config.mode, self.config.gate_name
        self.seed = seed
        depth = model.config.prefix_depth
        self.layer_wise_from = depth // 2 if self.config.layer_wise_from is None else self.config.layer_wise_from
        if self.layer_wise_from >= depth:
            raise ValueError(f"ReuseConfig.layer_wise_from={self.layer_wise_from} is past the prefix LM's {depth} layers")
        self.replan_steps = self.config.replan_steps
        self.observer = None           # a Recorder attaches itself here while it records
        self.keep_records = True
        self.guard = EpisodeGuard(self.name)
        self.reset()

    def with_config(self, config: ReuseConfig) -> "FlowPolicy":
        """Another mode or gate on the same model and tokenizer (no weights copied)."""
        return type(self)(self.model, self.tokenizer, config, self.seed)

    # ------------------------------------------------------------------------------------------- episode state
    def reset(self) -> None:
        """Forget the episode: the K/V store, the gate's reference, the step counter, the noise sequence."""
        self.step_index = 0
        self.store: KVStore | None = None
        self.layout: tuple | None = None         # the stored prefix's (image tokens, text rows, state rows)
        self.moved: tuple[str, ...] = ()         # spans whose rows moved this inference (computed afresh)
        self.state_kv: list | None = None        # a state token in the expert: its K/V
        self.state_kv_step = -1
        self.ref: dict | None = None             # the gate's reference: image tokens, state, pixels
        self.computed_step = -1                  # the last inference whose gate was closed (everything fresh)
        self.gripper: list[float] = []           # the executed gripper commands' signs, per inference
        self.guard.reset()
        self.generator = torch.Generator().manual_seed(self.seed)
        self.last: FlowStepRecord | None = None
        self.records: list[FlowStepRecord] = []

    @property
    def last_reuse(self) -> float | None:
        """The share of the prefix's (token, layer) K/V the last inference took from the store (None before one);
        the LIBERO evaluation records it per call."""
        return None if self.last is None else self.last.reuse_fraction

    @property
    def broken(self) -> bool:
        """A step failed mid-way: the store may mix two steps, and every step is refused until `reset()`."""
        return self.guard.broken

    # ---------------------------------------------------------------------------------------- family hooks
    def prompt(self, instruction: str, state_n: np.ndarray) -> tuple[str, tuple[int, int]]:
        """The prompt's text for a checked, non-empty instruction, and the character range of the state's bins in
        it ((0, 0) without)."""
        raise NotImplementedError

    def resize(self, images: list[np.ndarray]) -> torch.Tensor:
        """Checked uint8 [H, W, 3] images -> float pixels [camera, 3, size, size] in [0, 1] on the model's device."""
        raise NotImplementedError

    # ---------------------------------------------------------------------------------------------- inputs
    def normalize_state(self, state) -> np.ndarray:
        """A 1-D finite robot state (LIBERO: 8 values) -> normalised with the checkpoint's statistics (float64)."""
        arr = np.asarray(state, dtype=np.float64)
        if arr.ndim != 1 or not 1 <= arr.shape[0] <= self.model.config.max_state_dim:
            raise ValueError(f"state must be a 1-D array of at most {self.model.config.max_state_dim} values "
                             f"(LIBERO: 8), got shape {arr.shape}")
        if not np.isfinite(arr).all():
            raise ValueError(f"state has non-finite values: {arr}")
        width = self.model.normalization.width(STATE)
        if width is not None and width != arr.shape[0]:
            raise ValueError(f"state has {arr.shape[0]} values; the checkpoint's statistics have {width}")
        return self.model.normalization.normalize(arr, STATE)

    def encode_prompt(self, instruction: str, state: np.ndarray | None = None) -> tuple[list[int], np.ndarray, np.ndarray]:
        """The prompt's token ids (`prompt`), and which of them are words (`text`) and which the state's bins."""
        if not isinstance(instruction, str):
            raise TypeError(f"instruction must be a str, got {type(instruction).__name__}")
        if not instruction.strip():
            raise ValueError("instruction is empty; the policy needs a task description")
        prompt, state_chars = self.prompt(instruction, state)
        encoded = self.tokenizer(prompt, return_offsets_mapping=True)
        ids, offsets = list(encoded.input_ids), list(encoded.offset_mapping)
        if self.prepend_bos and ids[0] != self.tokenizer.bos_token_id:
            ids, offsets = [self.tokenizer.bos_token_id, *ids], [(0, 0), *offsets]
        limit = self.model.config.max_token_len
        if len(ids) > limit:
            raise ValueError(f"the prompt is {len(ids)} tokens, past the model's {limit} (tokenizer_max_length); "
                             f"shorten the instruction ({len(instruction)} characters)")
        vocab = self.model.config.vocab_size
        if max(ids) >= vocab:
            raise ValueError(f"the tokenizer gave token id {max(ids)}, past the model's vocabulary of {vocab}: is it "
                             "the checkpoint's tokenizer?")
        in_state = np.array([state_chars[0] <= a and b <= state_chars[1] and b > a for a, b in offsets], dtype=bool)
        return ids, np.flatnonzero(~in_state), np.flatnonzero(in_state)

    def pixel_values(self, images) -> tuple[list[np.ndarray], torch.Tensor]:
        """One RGB image or a list of 1..num_image_slots (agent view, wrist view): the checked images (as given,
        uint8) and their pixels [camera, 3, size, size] at the model's size in [-1, 1] (`x * 2 - 1`, as lerobot)."""
        images = list(images) if isinstance(images, (list, tuple)) else [images]
        slots = self.model.config.num_image_slots
        if not 1 <= len(images) <= slots:
            raise ValueError(f"{len(images)} images; the model has {slots} camera slots (give 1..{slots})")
        checked = [validate_image(image) for image in images]
        return checked, self.resize(checked) * 2.0 - 1.0

    # --------------------------------------------------------------------------------------------- one step
    @torch.inference_mode()
    def step(self, images, instruction: str, state) -> np.ndarray:
        """One inference -> the un-normalised action chunk [chunk_size, 7]; `self.last` keeps the record.

        Inputs are checked before anything changes; an error after that (out of memory in the expert, say, after the
        prefix has refreshed the store) marks the policy broken, and every later step raises until `reset()`."""
        self.guard.check_usable()
        model, cfg = self.model, self.model.config
        state_n = self.normalize_state(state)
        ids, text_rows, state_rows = self.encode_prompt(instruction, state_n)
        checked, pixels = self.pixel_values(images)
        task_ids = torch.tensor([[ids[i] for i in text_rows]])  # the episode's key: the words, not the state bins
        self.guard.check(tuple(image.shape for image in checked), task_ids)
        with self.guard.changing():  # from here on the step changes the episode's state
            clock = StageClock(model.device)
            padded = _padded(state_n, cfg.max_state_dim, model.device) if cfg.state_token in ("expert", "prefix") else None
            with clock.stage("vision"):
                present = [True] * len(checked) + [False] * (cfg.num_image_slots - len(checked))
                prefix = model.prefix_inputs(pixels, present, torch.tensor([ids], device=model.device),
                                             padded if cfg.state_token == "prefix" else None)
                spans = self._spans(prefix, text_rows, state_rows)
            with clock.stage("gate"):
                pixels01 = ((pixels.float().cpu().numpy() + 1.0) / 2.0)  # [camera, 3, size, size] in [0, 1]
                vision = torch.cat(prefix.images, dim=1)  # every camera's image tokens, the gates' embedding
                gate, sims = self._gate(vision, state_n, pixels01, self._fit_store(prefix.length, spans))
                span_reuse = self._span_reuse(gate)  # [span, layer]
                gate = gate and bool(span_reuse.any())  # a gate whose spans all moved reuses nothing
                plans = self._plans(prefix.length, spans, span_reuse)
            with clock.stage("prefix"):
                out = model.run_prefix(prefix, plans, self.store, self.step_index)
            with clock.stage("expert"):
                noise = torch.randn(1, cfg.chunk_size, cfg.max_action_dim, generator=self.generator).to(model.device)
                in_expert = cfg.state_token == "expert"
                state_reused = in_expert and gate and "state" in self.mode.spans
                if in_expert and not state_reused:
                    self.state_kv, self.state_kv_step = model.expert_state_kv(self.store, padded), self.step_index
                actions = model.sample_actions(self.store, noise, state_kv=self.state_kv if in_expert else None)
            chunk = self.unnormalize(actions, state)
            self._update_reference(gate, vision, state_n, pixels01, chunk)
            record = FlowStepRecord(
                step=self.step_index, gate=gate, vision_similarity=sims["vision"], state_similarity=sims["state"],
                pixel_change=sims["pixels"], near_contact=sims["contact"], moved=self.moved, spans=spans,
                span_reuse=span_reuse, staleness=self._staleness(spans),
                reuse_fraction=float(out.reused.float().mean()), chunk=chunk, chunk_normalized=actions, noise=noise,
                latency_ms=clock.ms, flops=model.stage_flops(out.work, prefix.length, len(checked), state_reused),
            )
            self._emit(record, StepInputs(prefix, padded, spans, noise, np.asarray(state, np.float64)))
            return record.chunk

    def _spans(self, prefix: PrefixInputs, text_rows: np.ndarray, state_rows: np.ndarray) -> dict[str, np.ndarray]:
        """Each span's prefix rows: the image tokens first, then the prompt's words; the state's bins in the prompt,
        or the state token last in the prefix; no rows for a state in the expert or nowhere."""
        n_vision, where = prefix.num_image_tokens, self.model.config.state_token
        state = {"prompt": n_vision + state_rows, "prefix": np.arange(prefix.spans["state"].start, prefix.length)}
        return {"vision": np.arange(n_vision), "text": n_vision + text_rows,
                "state": state.get(where, np.zeros(0, np.int64))}

    def _emit(self, record: FlowStepRecord, inputs: StepInputs) -> None:
        """Keep the record and hand it to the observer (with the inputs its shadow pass needs)."""
        self.last = record
        if self.keep_records:
            self.records.append(record)
        if self.observer is not None:
            record.inputs = inputs
            self.observer.on_step(record)
            record.inputs = None
        self.step_index += 1

    # ------------------------------------------------------------------------------------------------ gates
    def _fit_store(self, length: int, spans: dict[str, np.ndarray]) -> bool:
        """Lay the store out for this prefix; False when nothing stored can be reused (a new episode, other
        cameras). When pi0.5's state bins change the prompt's tokens, its spans moved (`self.moved`): they are
        computed afresh, while the image tokens, first in the prefix, keep their slots and K/V."""
        self.moved = ()
        n_vision = len(spans["vision"])
        layout = (n_vision, tuple(spans["text"]), tuple(spans["state"]))
        if self.store is None or self.layout is None or n_vision != self.layout[0]:
            self.store, self.layout, self.state_kv = self.model.new_store(length), layout, None
            return False
        if layout != self.layout:
            self.moved, self.layout = ("text", "state"), layout
            if length != self.store.num_slots:
                self.store = _carry_over(self.store, self.model.new_store(length), n_vision)
        return True

    def _gate(self, vision: torch.Tensor, state_n: np.ndarray, pixels01: np.ndarray, reusable: bool
              ) -> tuple[bool, dict]:
        """Whether the mode's spans may reuse (`reusable`: the store fits this prefix), and what the gate measured
        against the reference: image-token and state similarity, pixel change, the contact detector."""
        ref = self.ref
        sims = {"vision": float("nan"), "state": float("nan"), "pixels": float("nan"), "contact": near_contact(self.gripper)}
        if ref is not None:
            sims["vision"] = _cosine(vision, ref["vision"])
            sims["state"] = _cosine(torch.from_numpy(state_n), torch.from_numpy(ref["state"]))
            sims["pixels"] = float(np.abs(pixels01 - ref["pixels"]).mean()) if ref["pixels"].shape == pixels01.shape else float("inf")
        if not reusable or not self.mode.spans or ref is None:
            return False, sims
        return gate_opens(self.config, sims, self.step_index - self.computed_step), sims

    def _update_reference(self, gate: bool, vision: torch.Tensor, state_n: np.ndarray, pixels01: np.ndarray,
                          chunk: np.ndarray) -> None:
        if not gate:
            self.computed_step = self.step_index
        if self.config.compare_to == "previous" or not gate:
            self.ref = {"vision": vision, "state": state_n, "pixels": pixels01}
        self.gripper.append(chunk[: self.replan_steps, GRIPPER].copy())

    # ------------------------------------------------------------------------------------------------ plans
    def _span_reuse(self, gate: bool) -> torch.Tensor:
        depth = self.model.config.prefix_depth
        reuse = torch.zeros(len(SPANS), depth, dtype=torch.bool)
        if gate:
            first = self.layer_wise_from if self.mode.upper_layers_only else 0
            for span in self.mode.spans:
                if span not in self.moved:
                    reuse[SPANS.index(span), first:] = True
        return reuse

    def _plans(self, length: int, spans: dict[str, np.ndarray], span_reuse: torch.Tensor) -> list[LayerPlan]:
        """Per layer, the prefix rows computed: all but the reused spans' (a layer's rows shrink monotonically).
        Made on the host; a layer whose rows are the previous layer's shares its plan (one copy to the device each)."""
        reuse = span_reuse.numpy()  # [span, layer]
        plans: list[LayerPlan] = []
        for layer in range(reuse.shape[1]):
            if layer and np.array_equal(reuse[:, layer], reuse[:, layer - 1]):
                plans.append(plans[-1])
                continue
            keep = np.ones(length, dtype=bool)
            for i, span in enumerate(SPANS):
                if reuse[i, layer]:
                    keep[spans[span]] = False
            rows = np.flatnonzero(keep)
            ones = np.ones(len(rows), dtype=bool)
            plans.append(LayerPlan.from_host(rows, ones, ones, self.model.device))
        return plans

    def _staleness(self, spans: dict[str, np.ndarray]) -> torch.Tensor:
        """[span]: inferences since each span's K/V were computed (its oldest layer); a state in the expert: its
        expert K/V; a span with no rows anywhere: 0."""
        computed = self.store.computed_at.cpu()  # [layer, slot]
        out = []
        for span in SPANS:
            rows = spans[span]
            if len(rows):
                out.append(self.step_index - int(computed[:, torch.from_numpy(rows)].min()))
            else:
                out.append(self.step_index - self.state_kv_step if self.model.config.state_token == "expert" else 0)
        return torch.tensor(out)

    def unnormalize(self, actions: torch.Tensor, state) -> np.ndarray:
        """[1, chunk, max_action_dim] normalised -> [chunk, 7] with the checkpoint's statistics; the dims a
        pi0_libero-style checkpoint predicts relative to the state get the raw state added back."""
        a = actions[0, :, :LIBERO_ACTION_DIM].float().cpu().numpy().astype(np.float64)
        a = self.model.normalization.normalize(a, ACTION, inverse=True)
        delta = self.model.config.delta_action_dims
        if delta:
            a[:, :delta] += np.asarray(state, np.float64)[:delta]
        return a

    # ------------------------------------------------------------------------------------------ shadow pass
    @torch.inference_mode()
    def no_reuse_pass(self, inputs: StepInputs) -> tuple[torch.Tensor, KVStore]:
        """A full recompute of one inference (prefix into a throwaway store, a state token in the expert, the flow
        from the same noise): the reference of drift recording. Returns (actions [1, chunk, max_action_dim], the
        store)."""
        store = self.model.new_store(inputs.prefix.length)
        self.model.run_prefix(inputs.prefix, None, store, 0)
        in_expert = self.model.config.state_token == "expert"
        state_kv = self.model.expert_state_kv(store, inputs.state) if in_expert else None
        return self.model.sample_actions(store, inputs.noise, state_kv=state_kv), store


def _carry_over(old: KVStore, new: KVStore, slots: int) -> KVStore:
    """`new` holding `old`'s K/V and computation steps for the first `slots` slots (the image tokens)."""
    new.keys[:, :, :slots] = old.keys[:, :, :slots]
    new.values[:, :, :slots] = old.values[:, :, :slots]
    new.computed_at[:, :slots] = old.computed_at[:, :slots]
    return new


def _padded(state_n: np.ndarray, dim: int, device) -> torch.Tensor:
    out = torch.zeros(dim, dtype=torch.float32)
    out[: len(state_n)] = torch.from_numpy(state_n).float()
    return out.to(device)


def _cosine(a: torch.Tensor, b: torch.Tensor | None) -> float:
    """Cosine similarity of two embeddings, flattened, in float32, clamped to [-1, 1] (float32 rounding can give
    1.0000002 for identical inputs, and a threshold above 1 must never open the gate). NaN without a reference."""
    if b is None or a.shape != b.shape:
        return float("nan")
    return float(torch.nn.functional.cosine_similarity(a.float().flatten(), b.float().flatten(), dim=0).clamp(-1.0, 1.0))
