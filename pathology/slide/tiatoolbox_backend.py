"""The tiatoolbox backend (extra `tiatoolbox`, lane 2) for what OpenSlide cannot open: OME-TIFF and other
tiled TIFFs, OME-Zarr/NGFF, DICOM-WSI, JPEG 2000 (Omnyx JP2), plain images.

The reader class is chosen explicitly from the file (tiatoolbox's `WSIReader.open` falls back to a
virtual reader on some generic TIFFs before trying OpenSlide, which would silently read a single
page): .zarr/.ngff folders -> NGFFWSIReader, .dcm or a DICOM folder -> DICOMWSIReader, .jp2 ->
JP2WSIReader, .tif/.tiff/.ome.tif -> TIFFWSIReader, PNG/JPEG -> VirtualWSIReader. Reads are at pyramid
levels (`units="level"`), raw pixels (`post_proc=None`), white outside the image.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from histo.errors import HistoError, InputFileError

PLAIN_IMAGES = (".png", ".jpg", ".jpeg", ".bmp")
OME_EXTENSIONS = (".ome.tif", ".ome.tiff")
EXTENSIONS = (*OME_EXTENSIONS, ".tif", ".tiff", ".jp2", ".dcm", ".zarr", ".ngff", *PLAIN_IMAGES)


def reader_class(path: Path) -> type:
    """The tiatoolbox reader meant for this file (never the auto-detecting `WSIReader.open`)."""
    from tiatoolbox.wsicore import wsireader as w

    name = path.name.lower()
    if (path.is_dir() and (path / ".zattrs").exists()) or name.endswith((".zarr", ".ngff")):
        return w.NGFFWSIReader
    if path.is_dir() or name.endswith(".dcm"):
        return w.DICOMWSIReader
    if name.endswith(".jp2"):
        return w.JP2WSIReader
    if name.endswith((".tif", ".tiff")):
        return w.TIFFWSIReader
    if name.endswith(PLAIN_IMAGES):
        return w.VirtualWSIReader
    raise InputFileError(path, f"not a format the tiatoolbox backend reads ({', '.join(EXTENSIONS)})")


class TiatoolboxBackend:
    """A slide opened by the tiatoolbox reader class meant for its format."""

    name = "tiatoolbox"
    read_errors = (ValueError, OSError, RuntimeError)

    def __init__(self, path: Path) -> None:
        try:
            import tiatoolbox
        except ImportError:
            raise HistoError(
                "the tiatoolbox reader needs the extra: pip install 'histo[tiatoolbox]'"
            ) from None
        cls = reader_class(path)
        kwargs = {} if cls.__name__ == "VirtualWSIReader" else {"post_proc": None}
        try:
            self._reader = cls(path, **kwargs)
            info = self._reader.info
        except Exception as e:  # each tiatoolbox reader raises its own library's errors
            raise InputFileError(
                path, f"unreadable by tiatoolbox {cls.__name__}: {str(e).splitlines()[0]}"
            ) from None
        self.version = f"{tiatoolbox.__version__} {cls.__name__}"
        self.level_dimensions = tuple(tuple(int(v) for v in d) for d in info.level_dimensions)
        self.level_downsamples = tuple(float(d) for d in info.level_downsamples)
        self.properties = {"openslide.vendor": f"tiatoolbox-{info.vendor or cls.__name__}"}
        if info.mpp is not None:
            self.properties |= {"openslide.mpp-x": str(info.mpp[0]), "openslide.mpp-y": str(info.mpp[1])}
        if info.objective_power:
            self.properties["openslide.objective-power"] = str(info.objective_power)

    def read_region(self, level: int, x0: int, y0: int, w: int, h: int) -> np.ndarray:
        img = self._reader.read_rect(
            (x0, y0), (w, h), resolution=level, units="level", pad_mode="constant", pad_constant_values=255
        )
        return np.ascontiguousarray(np.asarray(img)[..., :3], dtype=np.uint8)

    def close(self) -> None:
        close = getattr(self._reader, "close", None)
        if close is not None:
            close()
