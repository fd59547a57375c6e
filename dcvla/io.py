"""Files: atomic writes (a crash mid-write leaves the previous file, or none, never half a file), the netCDF
writer that streams a recording frame by frame, and reading recordings back.

`StreamWriter` appends one frame at a time along an unlimited `frame` dimension of an HDF5/netCDF4 file
(h5netcdf), so a 520-frame episode never sits in memory, and renames the finished file into place only on a clean
close: a killed run leaves at most a hidden temporary file, never a partial result.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

import h5netcdf
import h5py
import numpy as np
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


class CorruptFileError(ValueError):
    """A file that is there but cannot be read as what it should be (truncated, corrupt, another format); the
    message names the file."""


def read_dataset(path: str | os.PathLike) -> xr.Dataset:
    """Load a dataset fully into memory (the file is closed on return).

    Raises:
        FileNotFoundError: no file at `path`.
        CorruptFileError: the file is there but is not a readable netCDF/HDF5 dataset (a truncated copy, a crash of
            another tool mid-write, another format); HDF5's own message names no file, this one does.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no dataset file {path}" + (" (it is a directory)" if path.is_dir() else ""))
    try:
        with xr.open_dataset(path, engine="h5netcdf") as ds:
            return ds.load()
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CorruptFileError(f"{path} is not a readable netCDF dataset (truncated or corrupt?): "
                               f"{type(err).__name__}: {err}") from err


def label_coords(ds: xr.Dataset) -> xr.Dataset:
    """Promote a recording's labels (the attrs listed in `label_coords`) and `time` to coordinates."""
    labels = json.loads(ds.attrs.get("label_coords", "[]"))
    ds = ds.assign_coords({name: ds.attrs[name] for name in labels})
    return ds.set_coords("time") if "time" in ds.data_vars else ds


def open_recording(path: str | os.PathLike) -> xr.Dataset:
    """A dataset written by a `dcvla.recording.Recorder`, loaded into memory, with its label and time coordinates."""
    return label_coords(read_dataset(path))


class StreamWriter:
    """Append frames to a netCDF file; `close(commit=True)` renames it into place, anything else deletes it."""

    def __init__(self, path: str | Path, sizes: dict[str, int], attrs: dict, coords: dict[str, np.ndarray],
                 dims_of: Callable[[str], tuple[str, ...]]) -> None:
        self.path = Path(path)
        self.dims_of = dims_of  # variable -> its dims after frame
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
                dims = self.dims_of(name)
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
        """Close the file; with `commit` rename it onto `path`, else delete it.

        Raises:
            ValueError: `commit` with no frame appended: no file is written (an empty recording would pass for a
                result), and the error names the path that was not written.
        """
        self.file.close()
        if commit and self.n:
            try:
                umask = os.umask(0)
                os.umask(umask)
                os.chmod(self.tmp, 0o666 & ~umask)
                os.replace(self.tmp, self.path)
            except BaseException:  # e.g. the path is a directory: leave no temporary file behind
                self.tmp.unlink(missing_ok=True)
                raise
            return
        self.tmp.unlink(missing_ok=True)
        if commit:
            raise ValueError(f"no frame was recorded, so {self.path} was not written (the policy took no step while "
                             "the recorder was attached)")
