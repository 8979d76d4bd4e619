"""Tiles given by a lab's CLAM/TRIDENT patching (`histo tile --from-coords DIR`), checked against the store.

The patches keep their level-0 corners and level-0 side; the store's tiles are `tile.px` pixels at the
target resolution, so a patch must cover the store's physical tile size (within SIZE_TOLERANCE, which
absorbs TRIDENT's rounding of magnifications to 20x/40x buckets). What is applied on top is
`from_coords.select`: none (every patch is kept), cellularity (the high-cellularity subset), mosaic
(the Yottixel colour/spatial mosaic over the patches, then the cellularity subset).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from histo.errors import InputFileError
from pathology.interop.coords import CoordsFile, read_coords

SIZE_TOLERANCE = 0.05  # relative difference allowed between a patch's and the store's physical side


def read_given_tiles(path: str | os.PathLike, slide: Any, geometry: Any) -> CoordsFile:
    """A slide's coordinate file read against the open slide: corners on the slide, and a patch side
    matching the store's tile size in µm (one-line InputFileError suggesting the tile options otherwise)."""
    given = read_coords(Path(path), slide.level_downsamples, (slide.width, slide.height))
    um = given.size_level0 * slide.mpp
    if abs(um / geometry.um - 1.0) > SIZE_TOLERANCE:
        px = given.attrs.get("patch_size")
        px = int(px) if isinstance(px, (int, float)) and px >= 8 else geometry.px
        raise InputFileError(
            given.path,
            f"patches are {um:.1f} µm ({given.size_level0:.0f} level-0 px at {slide.mpp:.4g} µm/px) but "
            f"the store's tiles are {geometry.um:.1f} µm ({geometry.px} px at {geometry.mpp:.4g} µm/px); "
            f"match them, e.g. --tile-px {px} --magnification {10.0 * px / um:.4g}",
        )
    return given
