"""A virtual slide: an RGB array (a plain image, a crop, a patch query) with a stated µm/px.

One level; reads outside the array are white, as on glass. Handy for patch queries and for tests."""

from __future__ import annotations

import numpy as np

import histo


class ArrayBackend:
    """An in-memory H x W x 3 uint8 image as a one-level slide at `mpp` µm/px."""

    name = "array"
    version = histo.__version__
    read_errors: tuple[type[BaseException], ...] = ()

    def __init__(self, rgb: np.ndarray, mpp: float | None = None, vendor: str = "array") -> None:
        rgb = np.asarray(rgb)
        if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8 or 0 in rgb.shape:
            raise ValueError(
                f"a virtual slide needs a non-empty uint8 (H, W, 3) array, got {rgb.dtype} {rgb.shape}"
            )
        self._rgb = rgb
        self.level_dimensions = ((rgb.shape[1], rgb.shape[0]),)
        self.level_downsamples = (1.0,)
        self.properties = {"openslide.vendor": vendor}
        if mpp is not None:
            self.properties |= {"openslide.mpp-x": str(mpp), "openslide.mpp-y": str(mpp)}

    def read_region(self, level: int, x0: int, y0: int, w: int, h: int) -> np.ndarray:
        out = np.full((h, w, 3), 255, np.uint8)
        H, W = self._rgb.shape[:2]
        sx0, sy0, sx1, sy1 = max(0, x0), max(0, y0), min(W, x0 + w), min(H, y0 + h)
        if sx1 > sx0 and sy1 > sy0:
            out[sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0] = self._rgb[sy0:sy1, sx0:sx1]
        return out

    def close(self) -> None:
        pass
