"""The slide-reading interface: physical scale resolution, level choice and bounded-memory scaled reads
over any backend (pathology/slide/ backends: OpenSlide, tiatoolbox, in-memory arrays).

Levels are always chosen by downsample (never by index), and any region is read in blocks so that
memory stays bounded whatever the slide's size or pyramid layout. A backend only reads one region of
one level as RGB on white; everything else lives here, the same for every backend.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
from PIL import Image

from histo.errors import InputFileError
from pathology.diagnose import describe

# File extensions OpenSlide reads (DICOM series are opened through any one of their files).
SLIDE_EXTENSIONS = (
    ".svs", ".tif", ".tiff", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".svslide", ".bif", ".dcm",
)  # fmt: skip
PLAUSIBLE_MPP = (0.05, 50.0)  # µm/px; outside this a scale tag is not a microscope scale (e.g. 72 dpi)
BLOCK_OUT_PX = 1024  # largest output block of a scaled read
MAX_READ_PX = 2048  # largest side of one OpenSlide read (bounds memory when the pyramid lacks a level)


@dataclass(frozen=True)
class Scale:
    """Level-0 µm/px, where it came from, and every candidate seen (for the failure message)."""

    mpp: float
    source: str


def _float(value: str | None) -> float | None:
    try:
        v = float(value) if value not in (None, "") else None
    except ValueError:
        return None
    return v if v is not None and math.isfinite(v) and v > 0 else None


def resolve_scale(props: dict, vendor: str, mpp_override: float | None, path: object) -> Scale:
    """MPP from metadata, then objective power, then TIFF resolution tags, then the user override.

    OpenSlide fills `openslide.mpp-x` from the TIFF resolution tags for generic TIFFs; that value is
    reported as "tiff-resolution" and ranked after objective power. Implausible scales are skipped.
    """
    lo, hi = PLAUSIBLE_MPP
    mpp_x, mpp_y = _float(props.get("openslide.mpp-x")), _float(props.get("openslide.mpp-y"))
    mpp = math.sqrt(mpp_x * mpp_y) if mpp_x and mpp_y else (mpp_x or mpp_y)
    from_tiff_tags = vendor == "generic-tiff" and "tiff.ResolutionUnit" in props
    power = _float(props.get("openslide.objective-power"))
    candidates = [
        ("metadata", None if from_tiff_tags else mpp),
        ("objective-power", 10.0 / power if power else None),
        ("tiff-resolution", mpp if from_tiff_tags else None),
        ("override", mpp_override),
    ]
    rejected = []
    for source, value in candidates:
        if value is None:
            continue
        if lo <= value <= hi:
            return Scale(float(value), source)
        rejected.append(f"{source} gives {value:.4g} µm/px")
    detail = f" ({'; '.join(rejected)}: outside {lo}-{hi})" if rejected else ""
    raise InputFileError(
        path, f"no usable physical scale: no MPP, objective power or resolution tags{detail}; pass --mpp"
    )


class Backend(Protocol):
    """What a reader gives the interface: pyramid geometry, OpenSlide-named properties, one level read."""

    name: str  # e.g. "openslide"
    version: str  # the library's version, recorded per slide
    read_errors: tuple[type[BaseException], ...]  # the library's read failures (reported naming the file)
    level_dimensions: tuple[tuple[int, int], ...]
    level_downsamples: tuple[float, ...]
    properties: dict[str, str]  # openslide.vendor, openslide.mpp-x/-y, openslide.objective-power, ...

    def read_region(self, level: int, x0: int, y0: int, w: int, h: int) -> np.ndarray:
        """w x h pixels of `level` at level-0 origin (x0, y0), RGB uint8 on white outside the slide."""

    def close(self) -> None: ...


class Slide:
    """An open whole-slide image with a resolved physical scale, read through a backend."""

    def __init__(self, path: Path, backend: Backend, scale: Scale, slide_id: str) -> None:
        self.path = path
        self.slide_id = slide_id
        self.backend = backend
        self.width, self.height = (int(v) for v in backend.level_dimensions[0])
        props = backend.properties
        self.vendor = props.get("openslide.vendor", "unknown")
        self.mpp = scale.mpp
        self.mpp_source = scale.source
        self.objective_power = _float(props.get("openslide.objective-power"))
        self.level_downsamples = tuple(float(d) for d in backend.level_downsamples)
        self.level_dimensions = tuple(tuple(int(v) for v in d) for d in backend.level_dimensions)
        self.reader = f"{backend.name} {backend.version}"

    def best_level(self, downsample: float) -> int:
        """The coarsest level whose downsample does not exceed `downsample` (chosen by value, not index)."""
        ok = [i for i, d in enumerate(self.level_downsamples) if d <= downsample * 1.001]
        return max(ok, key=lambda i: self.level_downsamples[i]) if ok else 0

    def read_region(self, level: int, x0: int, y0: int, w: int, h: int) -> np.ndarray:
        """One backend read (level-0 origin, size at `level`) as RGB on white; errors name the file."""
        try:
            return self.backend.read_region(level, int(x0), int(y0), int(w), int(h))
        except self.backend.read_errors as e:
            reason = describe(self.path, f"read error at ({x0}, {y0}) level {level}: {e}")
            raise InputFileError(self.path, reason) from None

    def read_scaled(self, x0: float, y0: float, w0: float, h0: float, out_w: int, out_h: int) -> np.ndarray:
        """Level-0 box (x0, y0, w0, h0) resampled to out_w x out_h RGB, read block by block from the
        best level for that scale, so memory is bounded by the output size whatever the pyramid."""
        scale = max(w0 / out_w, h0 / out_h)
        level = self.best_level(scale)
        ds = self.level_downsamples[level]
        sx, sy = w0 / out_w / ds, h0 / out_h / ds  # level pixels per output pixel
        resample = Image.Resampling.BOX if min(sx, sy) >= 1 else Image.Resampling.BILINEAR
        out = np.empty((out_h, out_w, 3), np.uint8)
        margin = 0 if resample == Image.Resampling.BOX else 2
        block = max(1, min(BLOCK_OUT_PX, int(MAX_READ_PX // max(sx, sy, 1.0))))
        ax0, ay0 = x0 / ds, y0 / ds  # region origin in level coordinates
        for oy in range(0, out_h, block):
            for ox in range(0, out_w, block):
                bw, bh = min(block, out_w - ox), min(block, out_h - oy)
                # Source box of this output block in level coordinates (float).
                fx0, fy0 = ax0 + ox * sx, ay0 + oy * sy
                fx1, fy1 = ax0 + (ox + bw) * sx, ay0 + (oy + bh) * sy
                lx0, ly0 = math.floor(fx0) - margin, math.floor(fy0) - margin
                lw, lh = math.ceil(fx1) + margin - lx0, math.ceil(fy1) + margin - ly0
                region = self.read_region(level, round(lx0 * ds), round(ly0 * ds), lw, lh)
                box = (fx0 - lx0, fy0 - ly0, fx1 - lx0, fy1 - ly0)
                img = Image.fromarray(region).resize((bw, bh), resample, box=box)
                out[oy : oy + bh, ox : ox + bw] = np.asarray(img)
        return out

    def read_tile(self, x0: float, y0: float, size_level0: float, out_px: int) -> np.ndarray:
        """A square tile of `size_level0` level-0 px at (x0, y0), as out_px x out_px RGB uint8."""
        return self.read_scaled(x0, y0, size_level0, size_level0, out_px, out_px)

    def read_at_mpp(self, mpp: float) -> np.ndarray:
        """The whole slide at `mpp` µm/px (rounded to whole pixels), RGB uint8."""
        out_w = max(1, round(self.width * self.mpp / mpp))
        out_h = max(1, round(self.height * self.mpp / mpp))
        return self.read_scaled(0, 0, self.width, self.height, out_w, out_h)

    def thumbnail(self, max_px: int) -> np.ndarray:
        """The whole slide with its long side `max_px` pixels (aspect ratio kept)."""
        f = max_px / max(self.width, self.height)
        out_w, out_h = max(1, round(self.width * f)), max(1, round(self.height * f))
        return self.read_scaled(0, 0, self.width, self.height, out_w, out_h)

    def close(self) -> None:
        self.backend.close()

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def slide_id_of(path: str | os.PathLike) -> str:
    """A slide's ID: the file name without its extension (the folder name for a DICOM series)."""
    path = Path(path)
    if path.suffix.lower() == ".dcm":
        return path.parent.name
    return path.name[: -len(path.suffix)] if path.suffix else path.name
