"""What a query is: a slide (a slide file, or a TileSet already tiled) or a patch (an image file or an RGB
array), decided once here for `SlideIndex.search`, `histo search` and `histo serve`.

An image file is a patch when its suffix is an image format (PNG, JPEG, ...) or it is a TIFF that is
neither pyramidal nor an Aperio file; every other path is a slide for the slide reader.

A patch file's header is read first and its pixels decoded only when it declares at most
`query.max_pixels` (a decompression bomb fails that query alone). `SlideIndex.search` (so `histo search`
too) runs `file_query` on a query file, which also checks a patch's field of view against the index's tile (search/patch_fit.py) and tiles a
slide with `query.mpp` (--mpp) when it has no scale of its own.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from histo.errors import HistoError, InputFileError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"}
PATCH_FORMATS = ("PNG", "JPEG", "TIFF", "BMP", "GIF", "WEBP")  # what Pillow may open a patch file as


@dataclass(frozen=True)
class SlideQuery:
    """A query slide: `source` is its TileSet (a query file is tiled with the index's tiling first)."""

    name: str
    source: Any


@dataclass(frozen=True)
class PatchQuery:
    """A query patch: one RGB uint8 (H, W, 3) image (a file's checked against the index's tile first)."""

    name: str
    rgb: np.ndarray


def as_query(query: Any, name: str | None = None) -> SlideQuery | PatchQuery:
    """The query a TileSet or an RGB array is (a query file goes through `file_query` first); `name`
    (default: the slide ID, or "patch") is what results call it."""
    from pathology.tiler import TileSet

    if isinstance(query, TileSet):
        return slide_query(query, name)
    if isinstance(query, np.ndarray):
        return patch_query(query, name)
    raise HistoError(
        f"a query is a slide path, an image path, an RGB array or a TileSet, not a {type(query).__name__}"
    )


def slide_query(tiles: Any, name: str | None = None) -> SlideQuery:
    """A slide query from a TileSet (named by its slide ID unless `name`)."""
    return SlideQuery(name or tiles.record.slide_id, tiles)


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


def open_header(fp: Any, prefix: bytes, formats: Sequence[str]) -> Any | None:
    """The image in `fp` (a path or a binary file) opened by the first of `formats` whose opener accepts
    its first bytes `prefix`, with only its header read; None when none does. The format's opener is
    called as `Image.open` calls it, without Pillow's own pixel limit (`Image.MAX_IMAGE_PIXELS`, an
    error only past twice its value), so the caller's limit is the only one and names the size."""
    from PIL import Image

    Image.init()
    for fmt in formats:
        factory, accept = Image.OPEN[fmt]
        accepted = accept is None or accept(prefix)
        if accepted and not isinstance(accepted, str):  # a str: the format, in a variant not read
            return factory(fp)
    return None


def open_image(path: Path, max_pixels: int) -> Any:
    """The image file with only its header read (a PIL image, not decoded); InputFileError naming the
    declared size when it has more than `max_pixels` pixels, or when it is not a patch format."""
    from pathology.diagnose import os_reason

    try:
        with open(path, "rb") as fh:
            prefix = fh.read(16)
    except OSError as e:
        raise InputFileError(path, os_reason(e)) from None
    try:
        im = open_header(os.fspath(path), prefix, PATCH_FORMATS)
    except (OSError, SyntaxError, ValueError, IndexError, EOFError) as e:
        raise InputFileError(path, f"not a readable image ({type(e).__name__})") from None
    if im is None:
        raise InputFileError(path, f"not a readable image (not {', '.join(PATCH_FORMATS)})")
    w, h = im.size
    if w * h == 0:
        im.close()
        raise InputFileError(path, f"declares an empty image ({w} x {h} px)")
    if w * h > max_pixels:
        im.close()
        raise InputFileError(
            path,
            f"declares {w} x {h} px ({w * h:,} pixels), over the {max_pixels:,} a query image may have "
            "(search config query.max_pixels); refused before decoding it",
        )
    return im


def decode_rgb(im: Any, path: Path) -> np.ndarray:
    """The pixels of an opened image as RGB uint8 (H, W, 3) (its first frame); InputFileError if they
    cannot be decoded."""
    from PIL import UnidentifiedImageError

    try:
        return np.array(im.convert("RGB"))  # a writable copy
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as e:
        raise InputFileError(path, f"not a readable image ({type(e).__name__})") from None


def file_query(index: Any, path: str, checks: Any) -> tuple[Any, dict[str, Any]]:
    """What `histo search` passes to `index.search` for a query file (with name=path) and what its outcome
    records (`search.query`): a patch's RGB, read and checked against the index's tile by `checks` (the
    search config's `query`), or a slide's TileSet, tiled with the index's tiling and `checks.mpp` where
    it has no scale of its own."""
    from pathology.geometry import TileGeometry
    from search.manifest import MANIFEST
    from search.patch_fit import fit_patch, patch_scale

    if not is_patch_file(Path(path)):
        tiles = index.tile_query(path, checks.mpp)
        rec = tiles.record
        return tiles, {"kind": "slide", "mpp": rec.mpp, "mpp_source": rec.mpp_source}
    tile = TileGeometry.recorded(index.manifest["tiling"], str(index.path / MANIFEST))
    with open_image(Path(path), checks.max_pixels) as im:
        scale = patch_scale(im.info, checks.mpp, tile)
        fit = fit_patch(path, im.size, scale, tile, checks.patch)
        return decode_rgb(im, Path(path)), fit.record()
