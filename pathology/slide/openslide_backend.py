"""The OpenSlide backend (default): Aperio, Hamamatsu, Leica, MIRAX, generic tiled TIFF, DICOM, ..."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import openslide
from PIL import Image

from histo.errors import InputFileError
from pathology.diagnose import describe


def composite_white(region: Image.Image) -> np.ndarray:
    """RGBA from openslide-python (not premultiplied; transparent outside the slide) -> RGB over white,
    rounded: (rgb * a + 255 * (255 - a)) / 255."""
    rgba = np.asarray(region)
    alpha = rgba[..., 3:4].astype(np.uint32)
    if alpha.min() == 255:  # the common case: no transparency
        return np.ascontiguousarray(rgba[..., :3])
    out = (rgba[..., :3].astype(np.uint32) * alpha + 255 * (255 - alpha) + 127) // 255
    return out.astype(np.uint8)


class OpenSlideBackend:
    """A slide opened by OpenSlide; InputFileError with the reason when it cannot be."""

    name = "openslide"
    read_errors = (openslide.OpenSlideError,)

    def __init__(self, path: Path) -> None:
        try:
            self._osr = openslide.OpenSlide(str(path))
        except openslide.OpenSlideUnsupportedFormatError:  # or a TIFF cut short: say which
            raise InputFileError(path, describe(path, "not a slide format OpenSlide can read")) from None
        except (openslide.OpenSlideError, OSError) as e:
            raise InputFileError(path, describe(path, f"unreadable slide: {e}")) from None
        self.version = openslide.__library_version__
        self.level_dimensions = tuple(self._osr.level_dimensions)
        self.level_downsamples = tuple(self._osr.level_downsamples)
        self.properties = dict(self._osr.properties)

    def read_region(self, level: int, x0: int, y0: int, w: int, h: int) -> np.ndarray:
        return composite_white(self._osr.read_region((x0, y0), level, (w, h)))

    def close(self) -> None:
        self._osr.close()
