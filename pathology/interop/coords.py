"""CLAM and TRIDENT patch-coordinate files: export a tile store's tiles, read a lab's patching back.

Both tools write one `.h5` per slide holding a dataset `coords` (N, 2) of level-0 x, y (top-left corner
of each patch), with the patching parameters as attributes of that dataset:

CLAM (`create_patches_fp.py`, file `patches/<slide>.h5`)
    patch_size             side of a patch in pixels *at the read level* `patch_level`
    patch_level            pyramid level the patch is read from (OpenSlide index)
    downsample             (x, y) downsample of that level (from the level dimensions when they disagree
                           with OpenSlide's reported downsample)
    level_dim, downsampled_level_dim   (width, height) of that level
    name, save_path        slide ID and the folder written to
    Level-0 side of a patch = patch_size * downsample. Fishing-Rod files may add `custom_downsample`,
    read as TRIDENT does (a further factor on the level-0 side).

TRIDENT (`extract_tissue_coords`, file `patches/<slide>_patches.h5`)
    patch_size             side in pixels *at the target magnification*
    patch_size_level0      side in level-0 pixels (what its slide encoders and overlays use)
    level0_magnification, target_magnification   the slide's and the patch's magnification
    overlap, name, savetodir, level0_width, level0_height
    Level-0 side = patch_size_level0 (else patch_size * level0_magnification / target_magnification).

histo writes both layouts from a store (its tiles are squares of `tile_size_level0` level-0 pixels,
resampled to `tile_px`) with exact values: magnifications are 10 / µm per px, not TRIDENT's rounded
buckets, so either tool reads back the very same regions. It adds `histo_mpp` (the level-0 µm/px it used).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from histo.errors import InputFileError
from pathology.interop.h5 import read_h5, write_h5

FORMATS = ("clam", "trident")
PATCHES_DIR = "patches"  # both tools' sub-folder for coordinate files
TRIDENT_SUFFIX = "_patches"


def coords_file(out_dir: str | os.PathLike, slide_id: str, fmt: str) -> Path:
    """Where each tool keeps a slide's coordinates under its output folder."""
    suffix = TRIDENT_SUFFIX if fmt == "trident" else ""
    return Path(out_dir) / PATCHES_DIR / f"{slide_id}{suffix}.h5"


def clam_level_downsample(dimensions: tuple, level: int) -> tuple[float, float]:
    """CLAM's per-axis downsample of a level: level-0 size over the level's size."""
    (w0, h0), (w, h) = dimensions[0], dimensions[level]
    return float(w0) / w, float(h0) / h


def clam_attrs(slide: Any, size_level0: float, tile_px: int, save_path: str) -> dict[str, Any]:
    """CLAM's attributes for tiles of `size_level0` level-0 px shown at `tile_px`: read from the coarsest
    level that is not coarser than the tile's resolution (as histo reads them)."""
    level = slide.best_level(size_level0 / tile_px)
    ds = clam_level_downsample(slide.level_dimensions, level)
    dim = tuple(int(v) for v in slide.level_dimensions[level])
    return {
        "patch_size": round(size_level0 / ds[0]),
        "patch_level": level,
        "downsample": ds,
        "downsampled_level_dim": dim,
        "level_dim": dim,
        "name": slide.slide_id,
        "save_path": save_path,
    }


def trident_attrs(record: Any, target_mpp: float, save_path: str) -> dict[str, Any]:
    """TRIDENT's attributes of a store slide (a SlideRecord) whose tiles are `target_mpp` µm/px."""
    return {
        "patch_size": int(record.tile_px),
        "patch_size_level0": round(record.tile_size_level0),
        "level0_magnification": 10.0 / record.mpp,
        "target_magnification": 10.0 / target_mpp,
        "overlap": 0,
        "name": record.slide_id,
        "savetodir": save_path,
        "level0_width": int(record.width),
        "level0_height": int(record.height),
    }


def write_coords(path: str | os.PathLike, coords: np.ndarray, attrs: dict[str, Any], mpp: float) -> Path:
    """One coordinate file: `coords` (N, 2) int64 level-0 x, y with `attrs` (+ histo_mpp) on it."""
    coords = np.asarray(coords, np.int64).reshape(-1, 2)
    return write_h5(path, {"coords": coords}, {"coords": {**attrs, "histo_mpp": float(mpp)}})


@dataclass(frozen=True)
class CoordsFile:
    """A slide's patching read from a CLAM or TRIDENT file: level-0 corners and level-0 patch side."""

    slide_id: str
    path: Path
    format: str
    coords: np.ndarray
    size_level0: float
    attrs: dict[str, Any]


def _positive(attrs: dict, key: str, path: Path) -> float:
    value = attrs.get(key)
    if isinstance(value, list):  # CLAM's downsample is (x, y)
        value = value[0] if value else None
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not np.isfinite(value) or value <= 0:
        raise InputFileError(path, f"coords attribute {key!r} must be a positive number, got {value!r}")
    return float(value)


def patch_side_level0(attrs: dict, path: Path, level_downsamples: tuple | None) -> tuple[str, float]:
    """(format, level-0 patch side) from the attributes; CLAM files without `downsample` need the slide's."""
    if "patch_size_level0" in attrs:
        return "trident", _positive(attrs, "patch_size_level0", path)
    if "level0_magnification" in attrs and "target_magnification" in attrs:
        size = _positive(attrs, "patch_size", path)
        mag = _positive(attrs, "level0_magnification", path) / _positive(attrs, "target_magnification", path)
        return "trident", size * mag
    if "patch_level" not in attrs:
        raise InputFileError(
            path, "coords has neither TRIDENT (patch_size_level0) nor CLAM (patch_level) attributes"
        )
    size = _positive(attrs, "patch_size", path)
    level = attrs["patch_level"]
    if "downsample" in attrs:
        ds = _positive(attrs, "downsample", path)
    elif level_downsamples is not None and isinstance(level, int) and 0 <= level < len(level_downsamples):
        ds = float(level_downsamples[level])
    else:
        raise InputFileError(
            path, f"coords has no downsample attribute and level {level!r} is not in the slide"
        )
    custom = _positive(attrs, "custom_downsample", path) if "custom_downsample" in attrs else 1.0
    return "clam", size * ds * custom


def read_coords(
    path: str | os.PathLike, level_downsamples: tuple | None = None, bounds: tuple[int, int] | None = None
) -> CoordsFile:
    """Read a CLAM or TRIDENT coordinate file (format told by its attributes); with `bounds` (level-0
    width, height) every patch corner must lie on the slide. One-line InputFileError otherwise."""
    path = Path(path)
    data, attrs = read_h5(path, ("coords",))
    if "coords" not in data:
        raise InputFileError(path, "no 'coords' dataset (not a CLAM/TRIDENT coordinate file)")
    coords, a = data["coords"], attrs["coords"]
    if coords.ndim != 2 or coords.shape[1] != 2:
        raise InputFileError(path, f"coords must be (N, 2) level-0 x, y, got shape {coords.shape}")
    whole = np.issubdtype(coords.dtype, np.integer) or (
        np.isfinite(coords).all() and np.array_equal(coords, np.round(coords))
    )
    if not whole:
        raise InputFileError(path, "coords must be whole level-0 pixel positions")
    coords = coords.astype(np.int64)
    fmt, size = patch_side_level0(a, path, level_downsamples)
    if bounds is not None and len(coords):
        w, h = bounds
        bad = (coords[:, 0] < 0) | (coords[:, 1] < 0) | (coords[:, 0] >= w) | (coords[:, 1] >= h)
        if bad.any():
            x, y = coords[np.flatnonzero(bad)[0]]
            raise InputFileError(
                path, f"{int(bad.sum())} patch corner(s) outside the {w}x{h} slide, first ({x}, {y})"
            )
    name = a.get("name")
    slide_id = name if isinstance(name, str) and name not in ("", "None") else _stem_id(path)
    return CoordsFile(slide_id, path, fmt, coords, size, a)


def _stem_id(path: Path) -> str:
    stem = path.stem
    return stem[: -len(TRIDENT_SUFFIX)] if stem.endswith(TRIDENT_SUFFIX) else stem


def find_coords_files(folder: str | os.PathLike) -> dict[str, Path]:
    """Slide ID -> coordinate file in `folder` or its `patches/` (a CLAM save_dir, a TRIDENT job folder,
    or the patches folder itself); named `<id>.h5` (CLAM) or `<id>_patches.h5` (TRIDENT)."""
    folder = Path(folder).absolute()
    if not folder.is_dir():
        raise InputFileError(folder, "not a folder of CLAM/TRIDENT coordinate files")
    found: dict[str, Path] = {}
    for d in (folder, folder / PATCHES_DIR):
        for f in sorted(d.glob("*.h5")) if d.is_dir() else []:
            slide_id = _stem_id(f)
            if slide_id in found:
                raise InputFileError(
                    f, f"a second coordinate file for slide {slide_id!r} ({found[slide_id]})"
                )
            found[slide_id] = f
    if not found:
        raise InputFileError(folder, "no .h5 coordinate files here or in patches/")
    return found
