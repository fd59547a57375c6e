"""Atomic writes: a crash mid-write leaves the previous file (or none), never half a file."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

import xarray as xr


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it is renamed onto `path`, on error removed.

    The temporary file lives in the same directory so the final `os.replace` is a same-filesystem rename.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes owner-only files; results should read like any other file
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _netcdf_attr(value: Any) -> Any:
    """netCDF attributes must be str, number or a list of those; anything nested goes in as JSON."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, (str, int, float)):
        return value
    if isinstance(value, (list, tuple)) and all(isinstance(v, (str, int, float)) and not isinstance(v, bool) for v in value):
        return list(value)
    return json.dumps(value, default=str)


def write_dataset(ds: xr.Dataset, path: str | os.PathLike, compress: bool = True) -> Path:
    """Write `ds` to netCDF (h5netcdf, zlib-compressed) atomically and return the path.

    Attributes are coerced to netCDF-safe types (nested values become JSON strings).
    """
    ds = ds.copy(deep=False)
    ds.attrs = {k: _netcdf_attr(v) for k, v in ds.attrs.items()}
    for var in ds.variables.values():
        var.attrs = {k: _netcdf_attr(v) for k, v in var.attrs.items()}
    encoding = {}
    if compress:
        encoding = {name: {"zlib": True, "complevel": 4} for name, var in ds.data_vars.items() if var.dtype.kind in "fiub"}
    with atomic_path(path) as tmp:
        ds.to_netcdf(tmp, engine="h5netcdf", encoding=encoding)
    return Path(path)


def read_dataset(path: str | os.PathLike) -> xr.Dataset:
    """Load a dataset fully into memory (the file is closed on return)."""
    with xr.open_dataset(path, engine="h5netcdf") as ds:
        return ds.load()


def label_coords(ds: xr.Dataset) -> xr.Dataset:
    """Promote a recording's labels (the attrs listed in `label_coords`) and `time` to coordinates."""
    labels = json.loads(ds.attrs.get("label_coords", "[]"))
    ds = ds.assign_coords({name: ds.attrs[name] for name in labels})
    return ds.set_coords("time") if "time" in ds.data_vars else ds


def open_recording(path: str | os.PathLike) -> xr.Dataset:
    """A dataset written by `dcvla.recorder`, loaded into memory, with its label and time coordinates."""
    return label_coords(read_dataset(path))
