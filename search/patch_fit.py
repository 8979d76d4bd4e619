"""Whether a query patch shows what an index tile shows: its field of view against the tile's.

The index's tiles are `px` pixels at `mpp` µm/px, `um` µm a side (its manifest's recorded geometry); the
encoder resized each to its input. A query patch of w x h px at m µm/px covers w*m x h*m µm and is resized
to the same input, so its tissue appears 1/r times the size of the indexed tissue, r = patch µm / tile µm
per side. The search config's `query.patch` bands decide (README "Query files"):

    refused  min(r) < refuse_below, max(r) > refuse_above, or long side / short side > refuse_aspect
    warned   min(r) < warn_below, max(r) > warn_above, or long side / short side > warn_aspect
    as is    otherwise.

The patch's µm/px is `query.mpp` (--mpp) when given, else its own resolution metadata (TIFF resolution
tags, PNG pHYs, JPEG density) when it is a microscope scale (PLAUSIBLE_MPP: 72 dpi is not), else assumed
to be the tile's: a patch cut from a slide at the index's resolution, as `SlideIndex.search` documents.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Literal

from histo.errors import InputFileError
from pathology.geometry import TileGeometry
from search.config import PatchBands

log = logging.getLogger(__name__)
UM_PER_INCH = 25400.0
Rule = Literal["as is", "warned"]
SOURCES = {"override": "--mpp", "metadata": "its resolution metadata", "assumed": "assumed: the tile's"}


@dataclass(frozen=True)
class PatchScale:
    """A patch's µm/px and where it came from: override (--mpp), metadata, or assumed (the tile's)."""

    mpp: float
    source: str


@dataclass(frozen=True)
class PatchFit:
    """A patch (w, h px at `scale`) against the index's `tile`: the rule applied and, when warned, why."""

    size: tuple[int, int]
    scale: PatchScale
    tile: TileGeometry
    rule: Rule
    warning: str | None = None

    @property
    def ratio(self) -> tuple[float, float]:
        """Patch side over tile side in µm, (x, y)."""
        return tuple(side * self.scale.mpp / self.tile.um for side in self.size)  # type: ignore[return-value]

    def record(self) -> dict[str, Any]:
        """What a query outcome records: the patch, the tile, the rule and the resize it leads to."""
        w, h = self.size
        return {
            "kind": "patch",
            "px": [w, h],
            "mpp": self.scale.mpp,
            "mpp_source": self.scale.source,
            "tile": {"px": self.tile.px, "mpp": self.tile.mpp, "um": self.tile.um},
            "field_ratio": [round(r, 4) for r in self.ratio],  # patch µm / tile µm, x and y
            "resize": [round(self.tile.px / side, 4) for side in self.size],  # tile px per patch px
            "rule": self.rule,
            "warning": self.warning,
        }


def patch_scale(info: dict[str, Any], given: float | None, tile: TileGeometry) -> PatchScale:
    """The patch's µm/px: `given` (--mpp), else its metadata's (PIL's `dpi`) if plausible, else the tile's."""
    from pathology.slide import PLAUSIBLE_MPP

    if given is not None:
        return PatchScale(float(given), "override")
    dpi = info.get("dpi")
    try:
        mpp = UM_PER_INCH / (float(dpi[0]) * float(dpi[1])) ** 0.5
    except (TypeError, ValueError, IndexError, ZeroDivisionError):
        mpp = None
    if mpp is not None and PLAUSIBLE_MPP[0] <= mpp <= PLAUSIBLE_MPP[1]:
        return PatchScale(mpp, "metadata")
    return PatchScale(tile.mpp, "assumed")


def fit_patch(
    name: str, size: tuple[int, int], scale: PatchScale, tile: TileGeometry, bands: PatchBands
) -> PatchFit:
    """The patch's fit to the tile by `bands`; InputFileError (one line: its size, scale, what the index
    expects) when refused, a logged warning when in a warn band."""
    fit = PatchFit(size, scale, tile, "as is")
    low, high = min(fit.ratio), max(fit.ratio)
    aspect = max(size) / min(size)
    if low < bands.refuse_below or high > bands.refuse_above or aspect > bands.refuse_aspect:
        raise InputFileError(
            name,
            f"{_described(fit)}; a query patch must cover {bands.refuse_below:g}-{bands.refuse_above:g} "
            f"times the tile's side, at most {bands.refuse_aspect:g}:1 (search config query.patch)"
            f"{'; pass --mpp with its scale' if scale.source != 'override' else ''}",
        )
    if low < bands.warn_below or high > bands.warn_above or aspect > bands.warn_aspect:
        warning = f"{_described(fit)}; searched resized by {_resize(fit)} to the tile's pixels"
        log.warning("%s: %s", name, warning)
        return PatchFit(size, scale, tile, "warned", warning)
    return fit


def _described(fit: PatchFit) -> str:
    """'50 x 50 px at 0.5 µm/px (assumed) covers 0.05 x 0.05 of the index's 1000 px tile at 0.5 µm/px'."""
    (w, h), (rx, ry), t = fit.size, fit.ratio, fit.tile
    return (
        f"{w} x {h} px at {fit.scale.mpp:.4g} µm/px ({SOURCES[fit.scale.source]}) covers {rx:.3g} x {ry:.3g} of "
        f"the index's {t.px} px tile at {t.mpp:.4g} µm/px ({t.um:.4g} µm)"
    )


def _resize(fit: PatchFit) -> str:
    fx, fy = (fit.tile.px / side for side in fit.size)
    return f"{fx:.3g}" if abs(fx - fy) < 1e-9 else f"{fx:.3g} x {fy:.3g}"
