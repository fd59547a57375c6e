"""The recording schema (DESIGN section 4) and a netCDF writer that streams frames to disk.

Every recorded variable has a fixed list of dimensions after `frame`; the names are the xarray dims the
notebooks select on. `StreamWriter` appends one frame at a time along an unlimited `frame` dimension of an
HDF5/netCDF4 file (h5netcdf), so a 520-frame episode never sits in memory, and renames the finished file into
place only on a clean close: a killed run leaves at most a hidden temporary file, never a partial result.
"""

from __future__ import annotations

import os
from pathlib import Path

import h5netcdf
import h5py
import numpy as np

from .io import _netcdf_attr

TOWERS = ("dino", "siglip", "llm")
STAGES = ("select", "dino", "siglip", "projector", "llm_prefill", "llm_decode")
METRICS = ("cosine", "rel_l2")  # drift: cosine distance, relative L2 of used vs fresh values

SCHEMA: dict[str, tuple[str, ...]] = {  # variable -> dims after "frame"
    "reuse": ("patch",),                          # the selector's mask (vla_cache: reused at any layer)
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
}
ATTENTION_DIMS = ("head", "text", "seq")  # attention_l{layer}: full text-row attention maps of asked layers
VARIABLE_GROUPS: dict[str, tuple[str, ...]] = {
    "masks": ("reuse", "pixel_dynamic", "attn_relevant", "keyframe", "reuse_by_layer"),
    "staleness": ("staleness",),
    "text_to_vision": ("text_to_vision",),
    "actions": ("action", "action_tokens", "action_logits"),
    "flops": ("flops",),
    "latency": ("latency_ms",),
}
DRIFT_VARIABLES = ("q_drift", "k_drift", "v_drift", "action_ref", "logit_kl")


# The Pi0-style policy's recordings (dcvla.pi0): one row per control step ("frame"), the prefix spans and layers.
SPANS = ("vision", "text", "state")
PI0_STAGES = ("vision", "gate", "prefix", "expert")
PI0_SCHEMA: dict[str, tuple[str, ...]] = {
    "gate": (),                                   # the gate opened: the mode's spans were reused
    "vision_similarity": (),                      # cosine similarity of the image tokens to the reference step's
    "state_similarity": (),                       # the same for the state token
    "span_reuse": ("span", "layer"),              # K/V of the span taken from the store at that prefix layer
    "reuse_fraction": (),                         # share of the prefix's (token, layer) K/V taken from the store
    "staleness": ("span",),                       # steps since the span's K/V were computed (oldest layer)
    "action": ("horizon", "action_dim"),          # the un-normalised action chunk
    "flops": ("stage",),
    "latency_ms": ("stage",),
    "action_ref": ("horizon", "action_dim"),      # the no-reuse shadow pass's chunk (same noise)
    "action_drift": (),                           # mean over the chunk of |action - action_ref| (L2 per action)
    "k_drift": ("span", "layer", "metric"),       # used vs fresh prefix K, mean over the span's tokens
    "v_drift": ("span", "layer", "metric"),
}
PI0_VARIABLE_GROUPS: dict[str, tuple[str, ...]] = {
    "reuse": ("gate", "vision_similarity", "state_similarity", "span_reuse", "reuse_fraction"),
    "staleness": ("staleness",),
    "actions": ("action",),
    "flops": ("flops",),
    "latency": ("latency_ms",),
}


def dims_of(name: str, schema: dict[str, tuple[str, ...]] = SCHEMA) -> tuple[str, ...]:
    if name == "time":
        return ()
    return ATTENTION_DIMS if name.startswith("attention_l") else schema[name]


def coordinates(n_layers: int) -> dict[str, np.ndarray]:
    """Label coordinates of the fixed dims (frame gets its own values per run)."""
    return {"tower": np.array(TOWERS), "layer": np.arange(n_layers), "stage": np.array(STAGES),
            "metric": np.array(METRICS)}


def pi0_coordinates(n_layers: int) -> dict[str, np.ndarray]:
    """The Pi0 recordings' label coordinates."""
    return {"span": np.array(SPANS), "layer": np.arange(n_layers), "stage": np.array(PI0_STAGES),
            "metric": np.array(METRICS)}


class StreamWriter:
    """Append frames to a netCDF file; `close(commit=True)` renames it into place, anything else deletes it."""

    def __init__(self, path: str | Path, sizes: dict[str, int], attrs: dict, coords: dict[str, np.ndarray],
                 schema: dict[str, tuple[str, ...]] = SCHEMA) -> None:
        self.path = Path(path)
        self.schema = schema
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        self.file = h5netcdf.File(self.tmp, "w")
        self.file.dimensions = {"frame": None, **sizes}
        self.file.attrs.update({k: _netcdf_attr(v) for k, v in attrs.items()})
        for name, values in coords.items():
            if name in sizes:
                dtype = h5py.string_dtype() if values.dtype.kind == "U" else values.dtype
                self.file.create_variable(name, (name,), dtype=dtype, data=values.astype(object) if values.dtype.kind == "U" else values)
        self.file.create_variable("frame", ("frame",), dtype=np.int64)
        self.n = 0

    def append(self, frame: dict[str, np.ndarray]) -> None:
        """Write one frame's arrays (keyed by variable name, plus "frame": its index)."""
        self.file.resize_dimension("frame", self.n + 1)
        self.file.variables["frame"][self.n] = int(frame["frame"])
        for name, value in frame.items():
            if name == "frame":
                continue
            value = np.asarray(value)
            is_bool = value.dtype == bool
            if is_bool:  # netCDF has no bool: int8 with xarray's dtype="bool" marker, decoded back on reading
                value = value.astype(np.int8)
            if name not in self.file.variables:
                dims = dims_of(name, self.schema)
                for dim, size in zip(dims, value.shape):
                    if dim not in self.file.dimensions:  # e.g. the text and seq sizes of attention maps
                        self.file.dimensions[dim] = size
                var = self.file.create_variable(name, ("frame", *dims), dtype=value.dtype,
                                                chunks=(1, *value.shape), compression="gzip", compression_opts=4)
                if is_bool:
                    var.attrs["dtype"] = "bool"
            self.file.variables[name][self.n, ...] = value
        self.n += 1

    def close(self, commit: bool) -> None:
        self.file.close()
        if commit and self.n:
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(self.tmp, 0o666 & ~umask)
            os.replace(self.tmp, self.path)
        else:
            self.tmp.unlink(missing_ok=True)
