"""histo's own OME-Zarr (NGFF 0.4/0.5) backend on zarr, a core dependency: brightfield RGB pyramids read
without the tiatoolbox extra, with the µm/px of the coordinateTransformations and the downsamples they
declare. Axes may come in any order (c, y, x or y, x, c); t and z must have one plane."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import zarr

import histo
from histo.errors import InputFileError
from pathology.slide.blosc_check import open_checked
from pathology.slide.ngff import Multiscale, read_multiscale


def _register_codecs() -> None:
    """Let zarr decode the imagecodecs codecs (JPEG, JPEG 2000, ...) that some NGFF writers use."""
    from imagecodecs import numcodecs

    numcodecs.register_codecs(verbose=False)


def _check_level(path: Path, ms: Multiscale, i: int, arr: zarr.Array, base: tuple[int, int]) -> None:
    """A level's array agrees with the axes (RGB uint8, one t/z plane) and with its declared downsample."""
    where = f"level {i} ({ms.paths[i]})"
    if len(arr.shape) != len(ms.axes):
        raise InputFileError(path, f"{where} has {len(arr.shape)} dimensions for axes {list(ms.axes)}")
    size = dict(zip(ms.axes, arr.shape, strict=True))
    if size.get("c") != 3 or arr.dtype != np.uint8:
        raise InputFileError(
            path, f"{where} is {arr.dtype} with {size.get('c', 1)} channels: histo reads RGB uint8 images"
        )
    extra = {a: n for a, n in size.items() if a not in ("c", "y", "x") and n != 1}
    if extra:
        raise InputFileError(path, f"{where} has {extra} planes: histo reads one 2-D plane")
    ds = ms.downsamples[i]
    for axis, full in zip(("x", "y"), base, strict=True):
        if abs(size[axis] * ds - full) > ds:
            raise InputFileError(
                path,
                f"{where} is {size[axis]} px in {axis}, but its scale says {full / ds:g} px ({full} px / {ds:g})",
            )


class NgffBackend:
    """An OME-Zarr image opened with zarr; InputFileError naming the folder when it is not one histo reads."""

    name = "ngff"
    read_errors = (ValueError, OSError, RuntimeError)

    def __init__(self, path: Path) -> None:
        ms = read_multiscale(path)
        _register_codecs()
        try:
            arrays = [open_checked(path / p) for p in ms.paths]
        except (OSError, ValueError, KeyError, zarr.errors.BaseZarrError) as e:
            raise InputFileError(path, f"unreadable NGFF level array: {e}") from None
        size0 = dict(zip(ms.axes, arrays[0].shape, strict=False))
        base = (int(size0.get("x", 0)), int(size0.get("y", 0)))
        for i, arr in enumerate(arrays):
            _check_level(path, ms, i, arr, base)
        self._ms, self._arrays = ms, arrays
        self.version = f"{histo.__version__} (zarr {zarr.__version__}, NGFF {ms.version})"
        shapes = [dict(zip(ms.axes, a.shape, strict=True)) for a in arrays]
        self.level_dimensions = tuple((int(s["x"]), int(s["y"])) for s in shapes)
        self.level_downsamples = ms.downsamples
        self.properties = {"openslide.vendor": "ngff"}
        if ms.mpp is not None:
            self.properties |= {"openslide.mpp-x": str(ms.mpp[0]), "openslide.mpp-y": str(ms.mpp[1])}

    def read_region(self, level: int, x0: int, y0: int, w: int, h: int) -> np.ndarray:
        ds = self.level_downsamples[level]
        lx, ly = round(x0 / ds), round(y0 / ds)
        W, H = self.level_dimensions[level]
        out = np.full((h, w, 3), 255, np.uint8)
        sx0, sy0, sx1, sy1 = max(0, lx), max(0, ly), min(W, lx + w), min(H, ly + h)
        if sx1 <= sx0 or sy1 <= sy0:
            return out
        window = {"x": slice(sx0, sx1), "y": slice(sy0, sy1), "c": slice(None)}
        block = self._arrays[level][tuple(window.get(a, 0) for a in self._ms.axes)]
        kept = [a for a in self._ms.axes if a in window]
        out[sy0 - ly : sy1 - ly, sx0 - lx : sx1 - lx] = np.transpose(block, [kept.index(a) for a in "yxc"])
        return out

    def close(self) -> None:
        pass
