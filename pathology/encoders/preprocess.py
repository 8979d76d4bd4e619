"""How a tile of the store becomes an encoder's input, and how crop embeddings become the tile's feature.

Tile rules (recorded in the feature definition, chosen per index):
  resize  the whole tile is resized to the encoder's input (the tile's field of view, at a lower
          resolution when the tile is larger: a 1000 px tile at 0.5 µm/px into 224 px is ~2.2 µm/px);
  grid    the tile is cut into n x n equal crops (centred; a remainder of under n px per side is left
          out), each crop becomes one input and the tile's feature is the mean of the n^2 embeddings.
          n defaults to round(tile µm / encoder field µm), the field being input_px / crop_pct pixels
          at the encoder's µm/px, so crops match the magnification the encoder was trained at.
Each input is then resized (antialiased, `interpolation`) to input_px / crop_pct and centre-cropped to
input_px (timm's crop_pct; 1 = plain resize), clamped to [0, 1], put in the encoder's colour order and
normalised with its mean/std.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from histo.errors import HistoError

log = logging.getLogger(__name__)
TILE_RULES = ("resize", "grid")


@dataclass(frozen=True)
class Preprocess:
    """uint8 (N, H, W, 3) RGB tiles -> (N * n^2, 3, input_px, input_px) normalised encoder inputs."""

    input_px: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bilinear"
    crop_pct: float = 1.0
    colour: str = "RGB"
    crops_per_side: int = 1  # the tile rule: 1 = resize, n > 1 = grid of n x n crops

    @property
    def inputs_per_tile(self) -> int:
        return self.crops_per_side**2

    def __call__(self, tiles: torch.Tensor) -> torch.Tensor:
        x = tiles.movedim(-1, -3).float().div_(255.0)
        if self.crops_per_side > 1:
            x = grid_crops(x, self.crops_per_side)
        x = resize_crop(x, self.input_px, self.crop_pct, self.interpolation)
        if self.colour == "BGR":
            x = x.flip(-3)
        mean = x.new_tensor(self.mean).view(3, 1, 1)
        std = x.new_tensor(self.std).view(3, 1, 1)
        return (x - mean) / std

    def definition(self) -> dict[str, Any]:
        """The preprocessing part of a feature definition."""
        n = self.crops_per_side
        return {
            "input_px": self.input_px,
            "interpolation": f"{self.interpolation}, antialiased, clamped to [0, 1]",
            "crop_pct": self.crop_pct,
            "colour": self.colour,
            "mean": list(self.mean),
            "std": list(self.std),
            "tile_rule": {
                "rule": "resize" if n == 1 else "grid",
                "crops_per_side": n,
                "aggregate": "the tile's embedding" if n == 1 else f"mean of the {n * n} crop embeddings",
            },
        }


def grid_crops(x: torch.Tensor, n: int) -> torch.Tensor:
    """(N, C, H, W) -> (N * n * n, C, H // n, W // n): n x n centred crops per image, row-major."""
    N, C, H, W = x.shape
    h, w = H // n, W // n
    if h < 1 or w < 1:
        raise HistoError(f"a {H}x{W} px tile cannot be cut into {n}x{n} crops")
    top, left = (H - n * h) // 2, (W - n * w) // 2
    x = x[:, :, top : top + n * h, left : left + n * w]
    return x.reshape(N, C, n, h, n, w).permute(0, 2, 4, 1, 3, 5).reshape(N * n * n, C, h, w)


def resize_crop(x: torch.Tensor, size: int, crop_pct: float, interpolation: str) -> torch.Tensor:
    """Antialiased resize of (N, C, H, W) to round(size / crop_pct), then the central size x size."""
    full = round(size / crop_pct)
    if x.shape[-2:] != (full, full):
        x = F.interpolate(x, size=(full, full), mode=interpolation, antialias=True, align_corners=False)
        if interpolation != "bilinear":  # bicubic overshoots; image libraries clamp to the pixel range
            x = x.clamp_(0.0, 1.0)
    if full != size:
        top = (full - size) // 2
        x = x[:, :, top : top + size, top : top + size]
    return x


def tile_geometry(tiling: Mapping[str, Any] | None) -> tuple[int, float] | None:
    """(tile px, tile µm/px) recorded in a tile store's parameters, or None when unknown."""
    resolved = (tiling or {}).get("resolved") or {}
    if "tile_px" in resolved and "target_mpp" in resolved:
        return int(resolved["tile_px"]), float(resolved["target_mpp"])
    return None


def crops_per_side(
    rule: str,
    grid: int | None,
    field_px: float | None,
    mpp: float | None,
    tiling: Mapping[str, Any] | None,
) -> int:
    """n of the tile rule: 1 for resize; `grid`, or the n that matches the encoder's field of view
    (field_px pixels at mpp µm/px; None for a network without a native resolution)."""
    if rule not in TILE_RULES:
        raise HistoError(f"unknown tile rule {rule!r} (choose from {', '.join(TILE_RULES)})")
    if rule == "resize":
        if grid is not None:
            raise HistoError(f"grid = {grid} is given but the tile rule is resize (set tile_rule: grid)")
        return 1
    if grid is not None:
        if grid < 1:
            raise HistoError(f"grid must be a positive number of crops per side, got {grid}")
        return int(grid)
    if field_px is None or mpp is None:
        raise HistoError(
            "a histo-trained network has no native µm/px: give the grid's crops per side (grid: N)"
        )
    geometry = tile_geometry(tiling)
    if geometry is None:
        raise HistoError("tile rule grid without a crop count needs the tile store's tile size and µm/px")
    tile_px, tile_mpp = geometry
    return max(1, round(tile_px * tile_mpp / (field_px * mpp)))


def warn_resolution(name: str, pre: Preprocess, mpp: float, tiling: Mapping[str, Any] | None) -> None:
    """Log when the tile rule feeds the encoder far from the µm/px it expects."""
    geometry = tile_geometry(tiling)
    if geometry is None:
        return
    tile_px, tile_mpp = geometry
    effective = tile_px * tile_mpp / pre.crops_per_side / (pre.input_px / pre.crop_pct)
    if not 0.8 <= effective / mpp <= 1.25:
        log.warning(
            "encoder %s expects %.2f µm/px; %s of %d px tiles at %.2f µm/px gives %.2f µm/px "
            "(tile_rule: grid matches the encoder's magnification)",
            name,
            mpp,
            pre.definition()["tile_rule"]["rule"],
            tile_px,
            tile_mpp,
            effective,
        )
