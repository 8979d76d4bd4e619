"""Slide reading: one interface (pathology/slide/base.py) over backends chosen explicitly.

Backends: OpenSlide (default, openslide_backend.py), histo's own OME-Zarr/NGFF reader on zarr
(ngff_backend.py, metadata in ngff.py), tiatoolbox for OME-TIFF, NGFF, DICOM, JP2 and plain images (extra
`tiatoolbox`, tiatoolbox_backend.py), in-memory arrays (array_backend.py). To add one: a class with the
`Backend` protocol's members and a name in `open.READERS` (`pathology.config.Reader`).
"""

from pathology.slide.base import (
    BLOCK_OUT_PX,
    MAX_READ_PX,
    PLAUSIBLE_MPP,
    SLIDE_EXTENSIONS,
    Backend,
    Scale,
    Slide,
    resolve_scale,
    slide_id_of,
)
from pathology.slide.open import READERS, open_array, open_backend, open_slide, recorded_reader

__all__ = [
    "BLOCK_OUT_PX", "MAX_READ_PX", "PLAUSIBLE_MPP", "READERS", "SLIDE_EXTENSIONS", "Backend", "Scale",
    "Slide", "open_array", "open_backend", "open_slide", "recorded_reader", "resolve_scale", "slide_id_of",
]  # fmt: skip
