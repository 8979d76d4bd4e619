"""The tiatoolbox backend (extra `tiatoolbox`, lane 2) for what OpenSlide cannot open: OME-TIFF and other
tiled TIFFs, OME-Zarr/NGFF, DICOM-WSI, JPEG 2000 (Omnyx JP2), plain images.

The reader class is chosen explicitly from the file (tiatoolbox's `WSIReader.open` falls back to a
virtual reader on some generic TIFFs before trying OpenSlide, which would silently read a single
page): .zarr/.ngff folders -> NGFFWSIReader, .dcm or a DICOM folder -> DICOMWSIReader, .jp2 ->
JP2WSIReader, .tif/.tiff/.ome.tif -> TIFFWSIReader, PNG/JPEG -> VirtualWSIReader. Reads are at pyramid
levels (`units="level"`), raw pixels (`post_proc=None`), white outside the image. An NGFF image's
metadata is checked by histo first (pathology/slide/ngff.py), which also gives its µm/px.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from types import ModuleType

import numpy as np

from histo.errors import HistoError, InputFileError
from pathology.slide.ngff import Multiscale, is_ngff, read_multiscale

PLAIN_IMAGES = (".png", ".jpg", ".jpeg", ".bmp")
OME_EXTENSIONS = (".ome.tif", ".ome.tiff")
EXTENSIONS = (*OME_EXTENSIONS, ".tif", ".tiff", ".jp2", ".dcm", ".zarr", ".ngff", *PLAIN_IMAGES)


def import_tiatoolbox() -> ModuleType | None:
    """tiatoolbox, or None without the extra. Its first import, when the root logger has no handler, adds
    an INFO stdout and a stderr handler to the root and sends warnings to logging: a library opening one
    OME-TIFF must not change how its caller's process logs, so the root is left as it was."""
    root = logging.getLogger()
    handlers, level, showwarning = list(root.handlers), root.level, warnings.showwarning
    try:
        import tiatoolbox
    except ImportError:
        return None
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
        warnings.showwarning = showwarning
    return tiatoolbox


def reader_class(path: Path) -> type:
    """The tiatoolbox reader meant for this file (never the auto-detecting `WSIReader.open`)."""
    from tiatoolbox.wsicore import wsireader as w

    name = path.name.lower()
    if is_ngff(path) or name.endswith((".zarr", ".ngff")):
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


def ngff_for_tiatoolbox(path: Path) -> Multiscale:
    """The checked NGFF metadata, refused where tiatoolbox 2.1's NGFFWSIReader would fail or misread it
    (NGFF 0.4 only, `omero` metadata required, axes c,y,x or y,x,c); its µm/px is taken from here, as
    tiatoolbox reads the scale of any unit as micrometres."""
    ms = read_multiscale(path)
    problem = (
        f"NGFF {ms.version} (it reads 0.4)" if ms.version != "0.4"
        else "no omero metadata (it needs it)" if not ms.has_omero
        else f"axes {','.join(ms.axes)} (it reads c,y,x or y,x,c)" if "".join(ms.axes) not in ("cyx", "yxc")
        else None
    )  # fmt: skip
    if problem:
        raise InputFileError(
            path, f"tiatoolbox NGFFWSIReader cannot read this image: {problem}; use --reader ngff"
        )
    return ms


def _source(path: Path, cls: type) -> Path:
    """What the reader is given: a DICOM series' folder for any one of its files (DICOMWSIReader opens
    only the file it is given, one level of the pyramid, where OpenSlide opens the series)."""
    return path.parent if cls.__name__ == "DICOMWSIReader" and path.is_file() else path


def without_guesses(cls: type) -> type:
    """`cls` reporting only the scale its file states: tiatoolbox's readers otherwise fill a missing
    objective power from the MPP (0.5 µm/px -> "20x") or the MPP from the power, which histo would
    record as read (it ranks the power itself, naming it as the scale's source)."""

    def as_stated(objective_power: float | None, mpp: object) -> tuple[float | None, object]:
        return objective_power, mpp

    return type(cls.__name__, (cls,), {"_estimate_mpp_objective_power": staticmethod(as_stated)})


class TiatoolboxBackend:
    """A slide opened by the tiatoolbox reader class meant for its format."""

    name = "tiatoolbox"
    read_errors = (ValueError, OSError, RuntimeError)

    def __init__(self, path: Path) -> None:
        tiatoolbox = import_tiatoolbox()
        if tiatoolbox is None:
            raise HistoError("the tiatoolbox reader needs the extra: pip install 'histo[tiatoolbox]'")
        cls = reader_class(path)
        ngff = ngff_for_tiatoolbox(path) if cls.__name__ == "NGFFWSIReader" else None
        kwargs = {} if cls.__name__ == "VirtualWSIReader" else {"post_proc": None}
        try:
            self._reader = without_guesses(cls)(_source(path, cls), **kwargs)
            info = self._reader.info
        except Exception as e:  # each tiatoolbox reader raises its own library's errors
            raise InputFileError(
                path, f"unreadable by tiatoolbox {cls.__name__}: {str(e).splitlines()[0]}"
            ) from None
        self.version = f"{tiatoolbox.__version__} {cls.__name__}"
        # tiatoolbox 2.1's NGFFWSIReader lists every level's size but one downsample (1) and refuses reads
        # below level 0: the levels kept are those with a downsample.
        n = min(len(info.level_dimensions), len(info.level_downsamples))
        self.level_dimensions = tuple(tuple(int(v) for v in d) for d in info.level_dimensions[:n])
        self.level_downsamples = tuple(float(d) for d in info.level_downsamples[:n])
        self.properties = {"openslide.vendor": f"tiatoolbox-{info.vendor or cls.__name__}"}
        mpp = ngff.mpp if ngff is not None else info.mpp
        if mpp is not None:
            self.properties |= {"openslide.mpp-x": str(mpp[0]), "openslide.mpp-y": str(mpp[1])}
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
