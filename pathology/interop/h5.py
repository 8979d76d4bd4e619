"""HDF5 files laid out as CLAM and TRIDENT write them: resizable datasets with per-dataset attributes.

Both tools' `save_hdf5`/`save_h5` create every dataset with its first axis resizable (maxshape None) and
chunked along it, and keep metadata as attributes of the dataset it describes (`coords.attrs`,
`features.attrs`). Files are written to a temporary sibling and renamed, so a kill never leaves half a file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from histo.errors import InputFileError
from histo.io import atomic_path

CHUNK_ROWS = 32  # CLAM's chunk size along the first axis


def _attr_value(value: Any) -> Any:
    """An attribute value h5py can store: None as 'None' and dicts as JSON, as TRIDENT's save_h5 does."""
    if value is None:
        return "None"
    if isinstance(value, dict):
        return json.dumps(value)
    return value


def write_h5(path: str | os.PathLike, datasets: dict[str, np.ndarray], attrs: dict[str, dict]) -> Path:
    """Write `datasets` (name -> array) with `attrs` (dataset name -> {attribute: value}) atomically."""
    import h5py

    path = Path(path)
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        for name, data in datasets.items():
            data = np.ascontiguousarray(data)
            chunks = (max(1, min(CHUNK_ROWS, len(data))), *data.shape[1:])
            dset = f.create_dataset(name, data=data, maxshape=(None, *data.shape[1:]), chunks=chunks)
            for key, value in attrs.get(name, {}).items():
                dset.attrs[key] = _attr_value(value)
    return path


def plain(value: Any) -> Any:
    """An h5py attribute value as plain Python: bytes -> str, numpy scalars/arrays -> numbers/lists."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, np.ndarray):
        return [plain(v) for v in value.tolist()] if value.ndim else plain(value.item())
    if isinstance(value, np.generic):
        return value.item()
    return value


def read_h5(path: str | os.PathLike, names: tuple[str, ...]) -> tuple[dict[str, np.ndarray], dict[str, dict]]:
    """The datasets `names` present in the file and every dataset's attributes (as plain Python);
    InputFileError naming the file when it is no HDF5 file."""
    import h5py

    path = Path(path)
    try:
        with h5py.File(path, "r") as f:
            data = {n: np.asarray(f[n][...]) for n in names if n in f and isinstance(f[n], h5py.Dataset)}
            attrs = {n: {k: plain(v) for k, v in f[n].attrs.items()} for n in f}
    except OSError as e:
        raise InputFileError(path, f"not a readable HDF5 file ({str(e).splitlines()[0]})") from None
    return data, attrs


def h5_shapes(path: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """Shape of every top-level dataset, without reading the data."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            return {n: tuple(f[n].shape) for n in f if isinstance(f[n], h5py.Dataset)}
    except OSError as e:
        raise InputFileError(path, f"not a readable HDF5 file ({str(e).splitlines()[0]})") from None
