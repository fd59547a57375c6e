"""Recording a `CachedPolicy`: the schema of its datasets (DESIGN section 4) and the recorder that writes it.

Per frame: the selector's masks, reuse per tower and layer, staleness, text-to-vision attention, the action and
its tokens' logits, FLOPs and latency per stage. With `drift=True` the shadow pass (the `vanilla` stages, no
store) gives the reference Q/K/V per tower, layer and patch, `action_ref` and `logit_kl`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

import numpy as np
import torch
import xarray as xr

from ..recording import METRICS, Recorder, Schema, distances, register_recorder
from .policy import CachedPolicy, StepRecord

TOWERS = ("dino", "siglip", "llm")
STAGES = ("select", "dino", "siglip", "projector", "llm_prefill", "llm_decode")
SCHEMA = Schema(
    variables={  # variable -> dims after "frame"
        "reuse": ("patch",),                          # the unified mask (ttf: reused by both towers; vla_cache:
                                                      # reused at any layer)
        "tower_reuse": ("tower", "patch"),            # per tower, the patches whose values came from the cache
                                                      # (ttf: fused output tokens, per-tower masks; kv: K/V; llm: any layer)
        "pixel_dynamic": ("patch",),
        "attn_relevant": ("patch",),
        "keyframe": (),
        "reuse_by_layer": ("tower", "layer", "patch"),  # K/V (and Q) taken from the cache, per tower and layer
        "staleness": ("patch",),                      # frames since the patch's values were computed fresh
        "text_to_vision": ("layer", "head", "patch"),  # LLM attention, mean over text rows, per head
        "action": ("action_dim",),
        "action_tokens": ("action_dim",),
        "action_logits": ("action_dim", "action_bin"),  # logits of the 256 action tokens (bin 0 = id text_vocab-1)
        "flops": ("tower",),                          # llm: projector + prefill + decode
        "latency_ms": ("stage",),
        "q_drift": ("tower", "layer", "patch", "metric"),
        "k_drift": ("tower", "layer", "patch", "metric"),
        "v_drift": ("tower", "layer", "patch", "metric"),
        "action_ref": ("action_dim",),
        "logit_kl": (),
    },
    groups={
        "masks": ("reuse", "tower_reuse", "pixel_dynamic", "attn_relevant", "keyframe", "reuse_by_layer"),
        "staleness": ("staleness",),
        "text_to_vision": ("text_to_vision",),
        "actions": ("action", "action_tokens", "action_logits"),
        "flops": ("flops",),
        "latency": ("latency_ms",),
    },
    patterns={"attention_l": ("head", "text", "seq")},  # attention_l{layer}: full text-row maps of asked layers
)
DRIFT_VARIABLES = ("q_drift", "k_drift", "v_drift", "action_ref", "logit_kl")
DEFAULT_WHAT = ("masks", "staleness", "text_to_vision", "actions", "flops", "latency")


@register_recorder(CachedPolicy)
class OpenVLARecorder(Recorder):
    """Records a `CachedPolicy`'s steps into an `xarray.Dataset` (dims frame, patch, tower, layer, head,
    action_dim, action_bin, stage, metric).

    Args:
        policy: the policy to observe (any method of `METHODS`).
        what: variable groups to record; see `SCHEMA.groups`.
        attention_layers: LLM layers whose full attention maps (text rows over the whole sequence) to keep.
        drift: run the shadow pass per frame for q/k/v drift, `action_ref` and `logit_kl`.
        path, labels, control_hz: see `dcvla.recording.Recorder`.

    The OpenVLA family's other recorders (OpenVLA-OFT's) subclass it: they share the masks, staleness,
    text-to-vision, FLOPs, latency and drift variables over the policy's `num_vision` tokens (patch p of image i at
    p + i * 256) and set their own `schema`, `stages`, action variables (`_actions`, `_drift_readout`).
    """

    schema = SCHEMA
    default_what = DEFAULT_WHAT
    drift_note = "q/k/v drift from a shadow full recompute of every frame (doubles the cost)"
    policy_type: type = CachedPolicy
    policy_name = "dcvla.openvla.CachedPolicy"  # in errors: where users import it from
    family = "openvla"
    stages = STAGES

    def __init__(self, policy, what: Iterable[str] | None = None, attention_layers: Iterable[int] = (),
                 drift: bool = False, path: str | Path | None = None, labels: dict | None = None,
                 control_hz: float = 20.0) -> None:
        if not isinstance(policy, self.policy_type):
            raise TypeError(f"{type(self).__name__} needs a {self.policy_name}, got {type(policy).__name__}")
        super().__init__(policy, what, drift, path, labels, control_hz)
        cfg = policy.model.config
        self.depth = {"dino": cfg.dino.num_layers_run, "siglip": cfg.siglip.num_layers_run, "llm": cfg.llm.num_layers}
        self.attention_layers = tuple(attention_layers)
        bad = [layer for layer in self.attention_layers if not 0 <= layer < self.depth["llm"]]
        if bad:
            raise ValueError(f"attention_layers {bad} out of range: the LLM has layers 0..{self.depth['llm'] - 1}")
        self.n_layers = max(self.depth.values())
        self.heads = cfg.llm.num_heads
        self.n_vision = policy.num_vision  # vision tokens: 256 per image
        self.attrs.update({
            "family": self.family, "attention_layers": json.dumps(list(self.attention_layers)),
            "tower_depths": [self.depth[t] for t in TOWERS],  # layers past a component's depth are padding
            "images": json.dumps([name or "image" for name in policy.image_names]),
            "patches_per_image": cfg.num_patches,  # patch p of image i is at p + i * patches_per_image
        })
        self._layer_values: dict[tuple[str, int], list[tuple]] = {}  # (component, layer) -> per image (rows, q, k, v)

    def _attach(self) -> None:
        """Ask the policy for the LLM attention probabilities the recording needs."""
        llm_layers = set(self.attention_layers)
        if "text_to_vision" in self.what:
            llm_layers |= set(range(self.depth["llm"]))
        self.policy.observed_prob_layers = frozenset(llm_layers)

    def _detach(self) -> None:
        self.policy.observed_prob_layers = frozenset()

    def coords(self) -> dict[str, np.ndarray]:
        return {"tower": np.array(TOWERS), "layer": np.arange(self.n_layers), "stage": np.array(self.stages),
                "metric": np.array(METRICS)}

    def sizes(self) -> dict[str, int]:
        cfg = self.policy.model.config
        return {"patch": self.n_vision, "tower": len(TOWERS), "layer": self.n_layers, "head": self.heads,
                "action_dim": cfg.action_dim, "stage": len(self.stages), "metric": len(METRICS),
                "action_bin": cfg.n_action_bins}

    def on_layer(self, component: str, layer: int, rows: torch.Tensor, q: torch.Tensor, keys: torch.Tensor,
                 values: torch.Tensor) -> None:
        """Keep the Q of the rows computed and the K/V attended at one layer (only when drift is recorded); a
        tower runs once per image, in image order."""
        if self.drift:
            self._layer_values.setdefault((component, layer), []).append((rows, q, keys, values))

    # ---------------------------------------------------------------------------------------- per-frame data
    def frame_arrays(self, record: StepRecord) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {"frame": np.array(record.frame), "time": np.array(record.frame / self.control_hz)}
        if "masks" in self.what:
            out |= self._masks(record)
        if "staleness" in self.what:
            out["staleness"] = record.staleness.numpy().astype(np.int32)
        if "text_to_vision" in self.what:
            out["text_to_vision"] = self._text_to_vision(record)
        for layer in self.attention_layers:
            out[f"attention_l{layer}"] = record.text_probs[layer].cpu().numpy().astype(np.float16)  # [head, text, seq]
        if "actions" in self.what:
            out |= self._actions(record)
        if "flops" in self.what:
            f = record.flops
            out["flops"] = np.array([f["dino"], f["siglip"], sum(f.values()) - f["dino"] - f["siglip"]], np.float64)
        if "latency" in self.what:
            out["latency_ms"] = np.array([record.latency_ms.get(s, np.nan) for s in self.stages], np.float32)
        return out

    def _actions(self, record: StepRecord) -> dict[str, np.ndarray]:
        return {
            "action": record.prediction.action.astype(np.float32),
            "action_tokens": record.prediction.token_ids.cpu().numpy().astype(np.int32),
            # float32: equivalence is judged on these at 1e-4, finer than float16 resolves near 1
            "action_logits": action_bin_logits(record.prediction.logits, self.policy.model.config).astype(np.float32),
        }

    def _masks(self, record: StepRecord) -> dict[str, np.ndarray]:
        sel = record.selection
        by_layer = np.zeros((len(TOWERS), self.n_layers, self.n_vision), bool)  # [tower, layer, patch]
        if self.policy.method.vit == "kv" and sel is not None:
            by_layer[0, : self.depth["dino"]] = sel.reuse.numpy()
            by_layer[1, : self.depth["siglip"]] = sel.reuse.numpy()
        by_layer[2, : self.depth["llm"]] = record.llm_reuse.numpy()
        return selection_masks(record, self.policy.method) | {"reuse_by_layer": by_layer}

    def _text_to_vision(self, record: StepRecord) -> np.ndarray:
        n, rows = self.n_vision, self.policy.relevance_rows  # the rows every selector reads
        t2v = np.full((self.n_layers, self.heads, n), np.nan, np.float16)  # [layer, head, patch]
        for layer in range(self.depth["llm"]):
            probs = record.text_probs[layer][:, :rows]  # [head, text, seq]
            t2v[layer] = probs[:, :, 1 : 1 + n].mean(dim=1).cpu().numpy().astype(np.float16)
        return t2v

    def drift_arrays(self, record: StepRecord) -> dict[str, np.ndarray]:
        """Used vs fresh Q/K/V per component, layer and patch; the family's reference readout (`_drift_readout`)."""
        used, self._layer_values = self._layer_values, {}  # the method's values, captured during its step
        ref = self.policy.shadow_pass(*record.inputs, observer=self).readout
        fresh, self._layer_values = self._layer_values, {}
        drift = self._qkv_drift(used, fresh)
        return {f"{x}_drift": drift[x].astype(np.float16) for x in "qkv"} | self._drift_readout(record, ref)

    def _drift_readout(self, record: StepRecord, ref: tuple) -> dict[str, np.ndarray]:
        """OpenVLA: the full recompute's action and KL(reference || method) of the action tokens."""
        ref_ids, ref_logits = ref
        log_method = torch.log_softmax(record.prediction.logits.float(), -1)  # [action_dim, vocab]
        log_ref = torch.log_softmax(ref_logits.float(), -1)
        kl = (log_ref.exp() * (log_ref - log_method)).sum(-1).mean()  # mean over action tokens
        _, ref_action = self.policy.model.decode_action(ref_ids, self.policy.unnorm_key)
        return {"action_ref": ref_action.astype(np.float32), "logit_kl": np.array(float(kl), np.float32)}

    def _qkv_drift(self, used: dict, fresh: dict) -> dict[str, np.ndarray]:
        cfg = self.policy.model.config
        n = cfg.num_patches  # per image
        offsets = {"dino": cfg.dino.num_prefix_tokens, "siglip": 0}  # a tower's token of patch 0
        drift = {x: np.full((len(TOWERS), self.n_layers, self.n_vision, 2), np.nan, np.float32) for x in "qkv"}
        for t, component in enumerate(TOWERS):  # drift[x]: [tower, layer, patch, metric]
            for layer in range(self.depth[component]):
                # towers: one entry per image, its patches at offsets[tower]..; the LLM: one, patches at 1..n_vision
                parts = zip(used[(component, layer)], fresh[(component, layer)])
                for i, ((rows_u, q_u, k_u, v_u), (rows_f, q_f, k_f, v_f)) in enumerate(parts):
                    width = self.n_vision if component == "llm" else n
                    slots = torch.arange(width, device=k_u.device) + offsets.get(component, 1)
                    span = slice(i * n, i * n + width)
                    drift["k"][t, layer, span] = distances(k_u[0][:, slots], k_f[0][:, slots])  # K/V: every position
                    drift["v"][t, layer, span] = distances(v_u[0][:, slots], v_f[0][:, slots])
                    computed = torch.isin(slots, rows_u)  # Q exists only for the rows the method computed
                    q_used = q_u[0][:, torch.searchsorted(rows_u, slots[computed])]
                    q_fresh = q_f[0][:, torch.searchsorted(rows_f, slots[computed])]
                    drift["q"][t, layer, span][computed.cpu().numpy()] = distances(q_used, q_fresh)
        return drift


def selection_masks(record: StepRecord, method) -> dict[str, np.ndarray]:
    """The frame's selection as recorded by every OpenVLA-family recorder: reuse, tower_reuse [tower, patch] (TTF:
    each tower's mask; the K/V cache: the unified mask; llm: reused at any layer), pixel_dynamic, attn_relevant,
    keyframe. Without a selector (vanilla, vla_cache) the LLM's reuse stands for `reuse`."""
    sel, llm = record.selection, record.llm_reuse.numpy()  # llm: [layer, patch]
    towers = np.zeros((len(TOWERS), llm.shape[1]), bool)  # [tower, patch]
    if sel is not None and method.vit != "full":
        towers[:2] = sel.tower_reuse.numpy() if method.vit == "ttf" else sel.reuse.numpy()
    towers[2] = llm.any(0)
    none = np.zeros(llm.shape[1], bool)
    return {
        "reuse": sel.reuse.numpy() if sel is not None else towers[2],
        "tower_reuse": towers,
        "pixel_dynamic": sel.pixel_dynamic.numpy() if sel is not None else none,
        "attn_relevant": sel.attn_relevant.numpy() if sel is not None else none,
        "keyframe": np.array(bool(sel.keyframe) if sel is not None else record.frame == 0),
    }


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
