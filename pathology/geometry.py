"""The stored tile's geometry: `tile.*` resolved once into pixels, µm/px and µm, recorded, read back.

`--tile-px` sets `tile.px`; `TileConfig.geometry` resolves it with the scale (`tile.um`, else `tile.mpp`,
else `tile.magnification`) into one TileGeometry per config. The tiler reads it, a tile store records it
as `params.resolved`, and whoever reads a store or an index manifest gets it back with `recorded`. On one
slide a tile spans `level0_px(slide.mpp)` level-0 pixels (stored per slide as `tile_size_level0`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from histo.errors import HistoError

if TYPE_CHECKING:
    from pathology.config import TileSize

RESOLVED = "resolved"  # the key of the recorded geometry in a store's params / a manifest's tiling
MAGNIFICATION_UM = 10.0  # µm/px x objective magnification: 10x -> 1 µm/px, 20x -> 0.5, 40x -> 0.25


@dataclass(frozen=True)
class TileGeometry:
    """The stored tile: `px` pixels at `mpp` µm/px, i.e. `um` µm on a side."""

    px: int
    mpp: float
    um: float

    @classmethod
    def of(cls, tile: TileSize) -> TileGeometry:
        """Resolve `tile.*`: a physical size `um` in px, px at an µm/px, or px at a magnification."""
        if tile.um is not None:
            mpp = tile.um / tile.px
        elif tile.mpp is not None:
            mpp = tile.mpp
        else:
            mpp = MAGNIFICATION_UM / tile.magnification
        return cls(tile.px, mpp, tile.px * mpp)

    @classmethod
    def recorded(cls, params: Mapping[str, Any], source: str) -> TileGeometry:
        """The geometry that a store's params or an index manifest's `tiling` recorded; `source` names it."""
        resolved = params.get(RESOLVED)
        try:
            geometry = cls(
                int(resolved["tile_px"]), float(resolved["target_mpp"]), float(resolved["tile_um"])
            )
        except (KeyError, TypeError, ValueError):
            geometry = None
        if geometry is None or not min(geometry.px, geometry.mpp, geometry.um) > 0:
            raise HistoError(f"{source}: records no valid tile geometry ({RESOLVED}: {resolved!r})")
        return geometry

    def record(self) -> dict[str, float]:
        """The JSON a store records as `params.resolved` (read back by `recorded`)."""
        return {"tile_px": self.px, "target_mpp": self.mpp, "tile_um": self.um}

    def level0_px(self, slide_mpp: float) -> float:
        """The tile's side in level-0 pixels of a slide scanned at `slide_mpp` µm/px."""
        return self.um / slide_mpp
