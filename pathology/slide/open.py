"""Opening a slide with the reader asked for: `auto` (histo's NGFF backend for OME-Zarr, OpenSlide, then
tiatoolbox for what OpenSlide cannot open, when the extra is installed), `openslide`, `tiatoolbox`,
`ngff`, or an in-memory array."""

from __future__ import annotations

import os
from pathlib import Path
from typing import get_args

import numpy as np

from histo.errors import HistoError, InputFileError
from pathology.config import Reader
from pathology.diagnose import access_problem, truncation_problem
from pathology.slide.base import Backend, Slide, resolve_scale, slide_id_of

READERS = get_args(Reader)


def _has_tiatoolbox() -> bool:
    from pathology.slide.tiatoolbox_backend import import_tiatoolbox

    return import_tiatoolbox() is not None


def _backend(path: Path, reader: str) -> Backend:
    """The backend that opens `path`; `auto` takes histo's own NGFF backend for an OME-Zarr folder (in
    every lane, so a store records the same reader with or without the extra), tiatoolbox for OME-TIFF
    when it is installed (OpenSlide reads OME-TIFF as a generic TIFF, without the OME-XML scale) and
    otherwise only when OpenSlide says the format is not its own (a damaged slide of a format OpenSlide
    knows stays OpenSlide's error)."""
    from pathology.slide.ngff import is_ngff
    from pathology.slide.ngff_backend import NgffBackend
    from pathology.slide.openslide_backend import OpenSlideBackend
    from pathology.slide.tiatoolbox_backend import EXTENSIONS, OME_EXTENSIONS, TiatoolboxBackend

    if reader == "openslide":
        return OpenSlideBackend(path)
    if reader == "ngff" or (reader == "auto" and is_ngff(path)):
        return NgffBackend(path)
    if reader == "tiatoolbox" or (path.name.lower().endswith(OME_EXTENSIONS) and _has_tiatoolbox()):
        return TiatoolboxBackend(path)

    try:
        return OpenSlideBackend(path)
    except InputFileError as e:
        theirs = path.is_dir() or path.name.lower().endswith(EXTENSIONS)
        if "not a slide format OpenSlide can read" not in e.reason or not theirs:
            raise
        if not _has_tiatoolbox():
            raise InputFileError(
                path,
                f"{e.reason} (install the extra histo[tiatoolbox] for OME-TIFF, NGFF, JP2, plain images)",
            ) from None
        return TiatoolboxBackend(path)


def open_backend(backend: Backend, path: Path, slide_id: str, mpp_override: float | None) -> Slide:
    """A Slide over an opened backend with its physical scale resolved (closing the backend on failure)."""
    try:
        vendor = backend.properties.get("openslide.vendor", "unknown")
        scale = resolve_scale(backend.properties, vendor, mpp_override, path)
        w, h = backend.level_dimensions[0]
        if w < 1 or h < 1:
            raise InputFileError(path, f"slide has no pixels ({w}x{h})")
    except BaseException:
        backend.close()
        raise
    return Slide(path, backend, scale, slide_id)


def open_slide(path: str | os.PathLike, mpp_override: float | None = None, reader: str = "auto") -> Slide:
    """Open a slide and resolve its physical scale; InputFileError with the reason otherwise."""
    if reader not in READERS:
        raise HistoError(f"unknown reader {reader!r} (choose from {', '.join(READERS)})")
    path = Path(path)
    # Missing, a link loop, permission denied, empty, or cut short (OpenSlide reads past the end of a
    # truncated TIFF without a word): said as such.
    problem = access_problem(path) or truncation_problem(path)
    if problem:
        raise InputFileError(path, problem)
    return open_backend(_backend(path, reader), path, slide_id_of(path), mpp_override)


def open_array(rgb: np.ndarray, mpp: float, slide_id: str = "array") -> Slide:
    """A virtual slide over an RGB uint8 array at `mpp` µm/px (a plain image, a patch query, a test)."""
    from pathology.slide.array_backend import ArrayBackend

    return open_backend(ArrayBackend(rgb, mpp), Path(f"<array {slide_id}>"), slide_id, None)


def recorded_reader(reader: str | None) -> str:
    """The reader to reopen a slide with, from the `reader` a store recorded ("openslide 4.0.1", ...)."""
    name = (reader or "auto").split()[0]
    return name if name in READERS else "auto"
