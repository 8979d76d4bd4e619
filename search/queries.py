"""What a query is: a slide (a slide file, or a TileSet already tiled) or a patch (an image file or an RGB
array), decided once here for `SlideIndex.search`, `histo search` and `histo serve`.

An image file is a patch when its suffix is an image format (PNG, JPEG, ...) or it is a TIFF that is
neither pyramidal nor an Aperio file; every other path is a slide for the slide reader.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from histo.errors import HistoError, InputFileError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"}


@dataclass(frozen=True)
class SlideQuery:
    """A query slide: `source` is its file (tiled with the index's tiling) or its TileSet."""

    name: str
    source: Any


@dataclass(frozen=True)
class PatchQuery:
    """A query patch: one RGB uint8 (H, W, 3) image at the index's tile resolution."""

    name: str
    rgb: np.ndarray


def as_query(query: Any, name: str | None = None) -> SlideQuery | PatchQuery:
    """The query a slide path, an image path, an RGB array or a TileSet is; `name` (default: the path,
    the slide ID, or "patch") is what results call it."""
    from pathology.tiler import TileSet

    if isinstance(query, (str, os.PathLike)):
        path = Path(query)
        if is_patch_file(path):
            return PatchQuery(name or os.fspath(query), read_patch(path))
        return SlideQuery(name or os.fspath(query), query)
    if isinstance(query, TileSet):
        return slide_query(query, name)
    if isinstance(query, np.ndarray):
        return patch_query(query, name)
    raise HistoError(
        f"a query is a slide path, an image path, an RGB array or a TileSet, not a {type(query).__name__}"
    )


def slide_query(query: Any, name: str | None = None) -> SlideQuery:
    """A slide query from a slide path or a TileSet (never read as a patch)."""
    default = os.fspath(query) if isinstance(query, (str, os.PathLike)) else query.record.slide_id
    return SlideQuery(name or default, query)


def patch_query(rgb: Any, name: str | None = None) -> PatchQuery:
    """A patch query from an RGB array; anything but uint8 (H, W, 3) is a HistoError."""
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise HistoError(f"a patch must be uint8 (H, W, 3), got {rgb.dtype} {rgb.shape}")
    return PatchQuery(name or "patch", rgb)


def is_patch_file(path: Path) -> bool:
    """An image file (PNG/JPEG/...), or a TIFF that is neither pyramidal nor Aperio, is a patch query."""
    suffix = path.suffix.lower()
    if suffix in IMAGE_SUFFIXES:
        return True
    if suffix not in (".tif", ".tiff"):
        return False
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            return not (tif.is_svs or len(tif.series[0].levels) > 1 or len(tif.pages) > 1)
    except (OSError, tifffile.TiffFileError):
        return False  # let the slide reader give the reason


def read_patch(path: Path) -> np.ndarray:
    """An RGB patch as uint8 (H, W, 3); InputFileError if unreadable or not RGB(A)/grey."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return np.array(im.convert("RGB"))  # a writable copy
    except (OSError, UnidentifiedImageError) as e:
        raise InputFileError(path, f"not a readable image ({type(e).__name__})") from None
