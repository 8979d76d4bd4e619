"""Regions of interest from QuPath GeoJSON applied to the tissue mask (`histo tile --roi PATH`).

`roi.mode`: restrict (tissue mask ∩ include regions − exclude regions) or replace (the include regions
minus the exclude regions are the mask). Annotations whose class is in `roi.exclude` are exclude regions
(QuPath's own class for that is "Ignore*", with the asterisk); the others are include regions, or only
those whose class is in `roi.include` when that list is not empty. PATH is one .geojson for every slide
or a folder with `<slide id>.geojson` per slide.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from histo.errors import InputFileError
from pathology.config import RoiConfig
from pathology.interop.geojson import rasterize, read_regions

SUFFIXES = (".geojson", ".json")


def roi_files(path: str | os.PathLike) -> Path | dict[str, Path]:
    """One GeoJSON file for all slides, or slide ID -> file of a folder."""
    path = Path(path).absolute()
    if path.is_file():
        return path
    if not path.is_dir():
        raise InputFileError(path, "no such GeoJSON file or folder")
    found = {f.stem: f for f in sorted(path.iterdir()) if f.suffix.lower() in SUFFIXES and f.is_file()}
    if not found:
        raise InputFileError(path, "no .geojson files in this folder")
    return found


def apply_roi(mask: np.ndarray, path: Path, width: int, height: int, roi: RoiConfig) -> np.ndarray:
    """The tissue mask (spanning a width x height slide) restricted or replaced by the file's regions."""
    regions, _ = read_regions(path, width, height)
    exclude = [r for r in regions if r.name in roi.exclude]
    include = [r for r in regions if r.name not in roi.exclude and (not roi.include or r.name in roi.include)]
    if not include and (roi.include or roi.mode == "replace"):
        wanted = f" of class {', '.join(roi.include)}" if roi.include else ""
        raise InputFileError(path, f"no include annotation{wanted} (roi.mode {roi.mode})")
    out = mask.copy() if roi.mode == "restrict" else np.ones_like(mask)
    if include:
        out &= rasterize(include, mask.shape, width, height)
    if exclude:
        out &= ~rasterize(exclude, mask.shape, width, height)
    return out
