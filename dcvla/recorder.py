"""Recording a policy's run into labelled arrays: `with Recorder(policy) as rec: ...; ds = rec.to_dataset()`.

The recorder attaches itself to a `CachedPolicy` as its observer for the duration of the `with` block and is
always detached on exit, also after an exception. Per frame it keeps what was asked for (`what`), with the
dimension names of the design's schema: frame, patch, tower (dino, siglip, llm), layer, head, action_dim, stage.
Large arrays are float16. With `drift=True` a shadow full recompute of the same frame (the `vanilla` engine
path, nothing cached) gives the reference Q/K/V, actions and action-token distributions; it doubles the cost.

With `path=` the frames stream to a netCDF file as they come (nothing accumulates in memory) and the file
appears, complete, only when the block exits cleanly: a crash leaves no result file behind.
"""

from __future__ import annotations

import functools
import json
import subprocess
from pathlib import Path
from typing import Iterable

import numpy as np
import torch
import xarray as xr

from . import __version__
from . import accessor  # noqa: F401  (registers ds.dcvla)
from .io import label_coords, open_recording  # noqa: F401  (open_recording is part of this API)
from .methods import CachedPolicy, vanilla_pass
from .schema import SCHEMA, STAGES, TOWERS, VARIABLE_GROUPS, StreamWriter, coordinates, dims_of
from .selector import MAX_TEXT_TOKENS

DEFAULT_WHAT = ("masks", "staleness", "text_to_vision", "actions", "flops", "latency")


@functools.cache  # one subprocess per process, not per recorded episode
def git_revision() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


class Recorder:
    """Records a `CachedPolicy`'s steps into an `xarray.Dataset`.

    Args:
        policy: the policy to observe (any method of `dcvla.methods`).
        what: variable groups to record; see `schema.VARIABLE_GROUPS` (unknown names raise).
        attention_layers: LLM layers whose full attention maps (text rows over the whole sequence) to keep.
        drift: run a shadow full recompute per frame for q/k/v drift, `action_ref` and `logit_kl`.
        path: stream frames to this netCDF file (written atomically on exit); None keeps them in memory.
        labels: scalar coordinates of the run (suite, task, episode, seed, ...), kept in the attrs too.
        control_hz: control rate, for the frame `time` coordinate (LIBERO: 20 Hz).
    """

    def __new__(cls, policy=None, *args, **kwargs):
        """`Recorder(pi0_policy, ...)` is a `dcvla.pi0.record.Pi0Recorder`: one recorder API for both families."""
        from .pi0.policy import Pi0Policy

        if cls is Recorder and isinstance(policy, Pi0Policy):
            from .pi0.record import Pi0Recorder

            return super().__new__(Pi0Recorder)
        return super().__new__(cls)

    def __init__(self, policy: CachedPolicy, what: Iterable[str] = DEFAULT_WHAT, attention_layers: Iterable[int] = (),
                 drift: bool = False, path: str | Path | None = None, labels: dict | None = None,
                 control_hz: float = 20.0) -> None:
        if not isinstance(policy, CachedPolicy):
            raise TypeError(f"Recorder needs a dcvla.methods.CachedPolicy, got {type(policy).__name__}")
        self._setup(policy, what, VARIABLE_GROUPS, drift, path, labels, control_hz,
                    "q/k/v drift from a shadow full recompute of every frame (doubles the cost)" if drift
                    else "drift not recorded (Recorder(drift=True) runs a shadow full recompute per frame)")
        cfg = policy.model.config
        self.depth: dict[str, int] = {"dino": cfg.dino.num_layers_run, "siglip": cfg.siglip.num_layers_run, "llm": cfg.llm.num_layers}
        self.attention_layers = tuple(attention_layers)
        bad = [layer for layer in self.attention_layers if not 0 <= layer < self.depth["llm"]]
        if bad:
            raise ValueError(f"attention_layers {bad} out of range: the LLM has layers 0..{self.depth['llm'] - 1}")
        self.n_layers = max(self.depth.values())
        self.heads = cfg.llm.num_heads
        self.attrs.update({
            "attention_layers": json.dumps(list(self.attention_layers)),
            "tower_depths": [self.depth[t] for t in TOWERS],  # layers past a component's depth are padding
        })
        self._layer_values: dict[tuple[str, int], tuple] = {}  # (component, layer) -> (rows, q, keys, values)

    def _setup(self, policy, what: Iterable[str], groups: dict, drift: bool, path: str | Path | None, labels: dict | None,
               control_hz: float, drift_note: str) -> None:
        """What every family's recorder keeps: the checked variable groups, where the frames go, the common attrs."""
        what = tuple(what)
        unknown = [w for w in what if w not in groups]
        if unknown:
            raise ValueError(f"unknown recording variable(s) {unknown}; known: {', '.join(groups)}")
        self.policy, self.what, self.drift, self.path = policy, what, drift, Path(path) if path else None
        self.control_hz = control_hz
        self.attrs = {
            "method": policy.name, "preset": policy.model.config.name,
            "config": json.dumps(vars(policy.config), default=list),
            "recorded": json.dumps(list(what)), "drift_recorded": int(drift), "drift_note": drift_note,
            "dcvla_version": __version__, "git_revision": git_revision(), "control_hz": control_hz,
            "label_coords": json.dumps(sorted(labels or {})), **(labels or {}),
        }
        self._frames: list[dict[str, np.ndarray]] = []
        self._writer: StreamWriter | None = None

    # ------------------------------------------------------------------------------------------- attach/detach
    def __enter__(self) -> "Recorder":
        if self.policy.observer is not None:
            raise RuntimeError("this policy already has a recorder attached")
        self.policy.observer = self
        self._attach()
        if self.path is not None:
            self.policy.keep_records = False
            self._writer = StreamWriter(self.path, self._dims(), self.attrs, self._coords(), self.schema)
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        self.policy.observer = None
        self._detach()
        self.policy.keep_records = True
        if self._writer is not None:
            self._writer.close(commit=exc_type is None)
        return False

    schema = SCHEMA  # variable -> dims after frame

    def _attach(self) -> None:
        """Ask the policy for the LLM attention probabilities the recording needs."""
        llm_layers = set(self.attention_layers)
        if "text_to_vision" in self.what:
            llm_layers |= set(range(self.depth["llm"]))
        self.policy.observed_prob_layers = frozenset(llm_layers)

    def _detach(self) -> None:
        self.policy.observed_prob_layers = frozenset()

    def _coords(self) -> dict[str, np.ndarray]:
        return coordinates(self.n_layers)

    def _dims(self) -> dict[str, int]:
        return {"patch": self.policy.model.config.num_patches, "tower": 3, "layer": self.n_layers,
                "head": self.heads, "action_dim": self.policy.model.config.action_dim, "stage": len(STAGES), "metric": 2,
                "action_bin": self.policy.model.config.n_action_bins}

    # --------------------------------------------------------------------------------------- policy callbacks
    def on_layer(self, component: str, layer: int, rows: torch.Tensor, q: torch.Tensor, keys: torch.Tensor,
                 values: torch.Tensor) -> None:
        """Keep the Q of the rows computed and the K/V attended at one layer (only when drift is recorded)."""
        if self.drift:
            self._layer_values[(component, layer)] = (rows, q, keys, values)

    def on_step(self, record, input_ids: torch.Tensor, pixel_values: torch.Tensor) -> None:
        frame = self._frame_arrays(record)
        if self.drift:  # the method's values were captured during its step; now a full recompute's
            used, self._layer_values = self._layer_values, {}
            ref_tokens, ref_logits, _ = vanilla_pass(self.policy.model, input_ids, pixel_values, observer=self)
            fresh, self._layer_values = self._layer_values, {}
            frame |= self._drift_arrays(used, fresh, record, ref_tokens, ref_logits)
        if self._writer is not None:
            self._writer.append(frame)
        else:
            self._frames.append(frame)

    # ---------------------------------------------------------------------------------------- per-frame data
    def _frame_arrays(self, record) -> dict[str, np.ndarray]:
        policy, cfg = self.policy, self.policy.model.config
        out: dict[str, np.ndarray] = {"frame": np.array(record.frame), "time": np.array(record.frame / self.control_hz)}
        sel, n = record.selection, cfg.num_patches
        if "masks" in self.what:
            zeros = np.zeros(n, bool)
            out["reuse"] = sel.reuse.numpy() if sel is not None else record.llm_reuse.any(0).numpy()
            out["pixel_dynamic"] = sel.pixel_dynamic.numpy() if sel is not None else zeros
            out["attn_relevant"] = sel.attn_relevant.numpy() if sel is not None else zeros
            out["keyframe"] = np.array(bool(sel.keyframe) if sel is not None else record.frame == 0)
            by_layer = np.zeros((3, self.n_layers, n), bool)  # [tower, layer, patch]
            if policy.method.vit == "kv" and sel is not None:
                by_layer[0, : self.depth["dino"]] = sel.reuse.numpy()
                by_layer[1, : self.depth["siglip"]] = sel.reuse.numpy()
            by_layer[2, : self.depth["llm"]] = record.llm_reuse.numpy()
            out["reuse_by_layer"] = by_layer
        if "staleness" in self.what:
            out["staleness"] = record.staleness.numpy().astype(np.int32)
        if "text_to_vision" in self.what:
            t2v = np.full((self.n_layers, self.heads, n), np.nan, np.float16)  # [layer, head, patch]
            for layer in range(self.depth["llm"]):
                probs = record.text_probs[layer][:, :MAX_TEXT_TOKENS]  # [head, text, seq]: the selector's rows
                t2v[layer] = probs[:, :, 1 : 1 + n].mean(dim=1).numpy().astype(np.float16)
            out["text_to_vision"] = t2v
        for layer in self.attention_layers:
            out[f"attention_l{layer}"] = record.text_probs[layer].numpy().astype(np.float16)  # [head, text, seq]
        if "actions" in self.what:
            out["action"] = record.prediction.action.astype(np.float32)
            out["action_tokens"] = record.prediction.token_ids.cpu().numpy().astype(np.int32)
            # float32: equivalence is judged on these at 1e-4, finer than float16 resolves near 1
            out["action_logits"] = action_bin_logits(record.prediction.logits, cfg).astype(np.float32)
        if "flops" in self.what:
            vit = {"dino": record.flops["dino"], "siglip": record.flops["siglip"]}
            llm = record.flops["projector"] + record.flops["llm_prefill"] + record.flops["llm_decode"]
            out["flops"] = np.array([vit["dino"], vit["siglip"], llm], np.float64)
        if "latency" in self.what:
            out["latency_ms"] = np.array([record.latency_ms.get(s, np.nan) for s in STAGES], np.float32)
        return out

    def _drift_arrays(self, used: dict, fresh: dict, record, ref_tokens, ref_logits) -> dict[str, np.ndarray]:
        """Used vs fresh Q/K/V per component, layer and patch; the reference action and the logit KL."""
        model = self.policy.model
        n = model.config.num_patches
        offsets = {"dino": model.config.dino.num_prefix_tokens, "siglip": 0, "llm": 1}  # token of patch 0
        drift = {x: np.full((3, self.n_layers, n, 2), np.nan, np.float32) for x in "qkv"}  # [tower, layer, patch, metric]
        for t, component in enumerate(TOWERS):
            slots = torch.arange(n) + offsets[component]  # [patch]
            for layer in range(self.depth[component]):
                rows_u, q_u, k_u, v_u = used[(component, layer)]
                rows_f, q_f, k_f, v_f = fresh[(component, layer)]
                drift["k"][t, layer] = _distances(k_u[0][:, slots], k_f[0][:, slots])  # K/V: every position
                drift["v"][t, layer] = _distances(v_u[0][:, slots], v_f[0][:, slots])
                computed = torch.isin(slots, rows_u)  # Q exists only for the rows the method computed
                q_used = q_u[0][:, torch.searchsorted(rows_u, slots[computed])]
                q_fresh = q_f[0][:, torch.searchsorted(rows_f, slots[computed])]
                drift["q"][t, layer, computed.numpy()] = _distances(q_used, q_fresh)
        log_method = torch.log_softmax(record.prediction.logits.float(), -1)  # [action_dim, vocab]
        log_ref = torch.log_softmax(ref_logits.float(), -1)
        kl = (log_ref.exp() * (log_ref - log_method)).sum(-1).mean()  # KL(reference || method), mean over tokens
        _, ref_action = model.decode_action(ref_tokens, self.policy.unnorm_key)
        return {"q_drift": drift["q"].astype(np.float16), "k_drift": drift["k"].astype(np.float16),
                "v_drift": drift["v"].astype(np.float16), "action_ref": ref_action.astype(np.float32),
                "logit_kl": np.array(float(kl), np.float32)}

    # ------------------------------------------------------------------------------------------------ output
    def to_dataset(self) -> xr.Dataset:
        """The frames recorded so far (in-memory mode), with coordinates and attrs."""
        if self._writer is not None:
            raise RuntimeError(f"frames were streamed to {self.path}; open it with dcvla.io.read_dataset")
        return frames_to_dataset(self._frames, self.attrs, self._coords(), self.schema)


def action_bin_logits(logits: torch.Tensor, cfg) -> np.ndarray:
    """[action_dim, vocab] -> [action_dim, action_bin]: the logits of the action tokens, bin 0 = id top - 1."""
    top = cfg.llm.text_vocab_size
    return logits[:, top - cfg.n_action_bins : top].flip(-1).float().cpu().numpy()


def action_kl(ds: xr.Dataset, reference: xr.Dataset) -> xr.DataArray:
    """Per frame: KL(reference || method) of the action-token distributions (softmax over the 256 action
    tokens), averaged over action dims, on the frames both runs have."""
    common = np.intersect1d(ds.frame.values, reference.frame.values)
    if common.size == 0:
        raise ValueError("action_kl: the two runs share no frame")
    ds, reference = ds.sel(frame=common), reference.sel(frame=common)
    def log_softmax(x):
        x = x.astype(np.float64)
        return x - x.max(-1, keepdims=True) - np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1, keepdims=True))

    log_m, log_r = log_softmax(ds.action_logits.values), log_softmax(reference.action_logits.values)
    kl = (np.exp(log_r) * (log_r - log_m)).sum(-1).mean(-1)  # [frame]
    return xr.DataArray(kl, coords={"frame": ds.frame}, dims="frame", name="action_kl")


def _distances(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    """[head, token, head_dim] pairs -> [token, metric]: cosine distance and relative L2 over all heads."""
    a, b = a.float().transpose(0, 1).flatten(1), b.float().transpose(0, 1).flatten(1)  # [token, head * head_dim]
    same = (a == b).all(dim=-1)  # identical values are exactly 0 apart (1 - cos would leave rounding noise)
    cos = torch.where(same, 0.0, 1 - torch.nn.functional.cosine_similarity(a, b, dim=-1))
    rel = torch.where(same, 0.0, (a - b).norm(dim=-1) / b.norm(dim=-1).clamp_min(1e-12))
    return torch.stack([cos, rel], dim=-1).numpy()


def frames_to_dataset(frames: list[dict[str, np.ndarray]], attrs: dict, fixed_coords: dict[str, np.ndarray],
                      schema: dict[str, tuple[str, ...]] = SCHEMA) -> xr.Dataset:
    """Stack per-frame arrays into a Dataset with the schema's dims and label coordinates."""
    if not frames:
        raise ValueError("nothing was recorded: the policy took no step inside the Recorder block")
    per_frame = [name for name in frames[0] if name not in ("frame", "time")]
    data_vars = {name: (("frame", *dims_of(name, schema)), np.stack([f[name] for f in frames])) for name in per_frame}
    used_dims = {d for dims, _ in data_vars.values() for d in dims}
    coords = {k: v for k, v in fixed_coords.items() if k in used_dims}
    coords["frame"] = np.array([int(f["frame"]) for f in frames])
    coords["time"] = ("frame", np.array([float(f["time"]) for f in frames]))
    return label_coords(xr.Dataset(data_vars, coords=coords, attrs=attrs))


def record_episode(policy, frames: np.ndarray, instruction: str, path: str | Path, states: np.ndarray | None = None,
                   **kwargs) -> Path:
    """Record one episode to `path` (streamed, atomic); a complete file already there is kept (resume).

    `states` [frame, state_dim]: the robot state per frame, for policies that take it (`uses_state`, Pi0).
    """
    path = Path(path)
    if path.exists():
        return path
    uses_state = getattr(policy, "uses_state", False)
    if uses_state and (states is None or len(states) != len(frames)):
        raise ValueError(f"{type(policy).__name__} needs one robot state per frame: got {len(frames)} frames and "
                         f"{'no' if states is None else len(states)} states")
    policy.reset()
    with Recorder(policy, path=path, **kwargs):
        for i, frame in enumerate(frames):
            policy.step(frame, instruction, states[i]) if uses_state else policy.step(frame, instruction)
    return path
