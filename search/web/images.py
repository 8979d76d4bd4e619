"""Pictures of slides for the page: thumbnails and tile crops (cached on disk) and Deep Zoom tiles.

Crops are read exactly as the tiler read the indexed tiles (`Slide.read_tile` at the index's tile
resolution), so a crop is the pixels the feature extractor saw. The cache lives in its own folder (by
default `INDEX/.serve-cache`, which is not one of the index's verified files); a file's cache key includes
its path, size and modification time, so a replaced slide is never served from a stale picture.
"""

from __future__ import annotations

import hashlib
import io
import threading
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from histo.errors import HistoError, InputFileError
from histo.io import atomic_write_bytes
from search.web.archive import Archive, NotFound, SlideEntry

THUMBNAIL_PX = 256  # long side of a slide thumbnail
DZ_TILE, DZ_OVERLAP, DZ_QUALITY = 254, 1, 85  # Deep Zoom tiles: 254 + 2 px overlap (OpenSlide's default)
OPEN_SLIDES = 16  # open slide handles kept (least recently used closed first)


def encode(rgb: np.ndarray, fmt: str) -> bytes:
    """RGB uint8 -> PNG or JPEG bytes."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def display_copy(rgb: np.ndarray, max_px: int) -> np.ndarray:
    """The image with its long side at most `max_px` (aspect kept; smaller images unchanged)."""
    from PIL import Image

    if max(rgb.shape[:2]) <= max_px:
        return rgb
    im = Image.fromarray(rgb)
    im.thumbnail((max_px, max_px), Image.Resampling.LANCZOS)
    return np.asarray(im)


class DiskCache:
    """Bytes by key in a folder (sha256-named files, written atomically; concurrent makers are harmless)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def get(self, key: str, suffix: str, make: Callable[[], bytes]) -> bytes:
        """The cached bytes of `key`, or `make()`'s, stored first."""
        digest = hashlib.sha256(key.encode()).hexdigest()
        path = self.root / digest[:2] / f"{digest}{suffix}"
        try:
            return path.read_bytes()
        except FileNotFoundError:
            pass
        data = make()
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, data)
        return data


def _file_key(path: Path) -> str:
    """A slide file's identity for cache keys: path, size and modification time."""
    st = path.stat()
    return f"{path}|{st.st_size}|{st.st_mtime_ns}"


class _Handles:
    """A small thread-safe LRU of open slide handles by file. An evicted handle is only dropped, never
    closed: a request may still be reading it, and OpenSlide closes it when the last reference goes."""

    def __init__(self, size: int, opener: Callable[..., Any]) -> None:
        self.size, self.opener = size, opener
        self.items: OrderedDict[str, Any] = OrderedDict()
        self.lock = threading.Lock()

    def get(self, path: Path, *args: Any) -> Any:
        """The open handle of `path` (opened with `opener(path, *args)` on first use)."""
        key = _file_key(path)
        with self.lock:
            if key in self.items:
                self.items.move_to_end(key)
                return self.items[key]
        handle = self.opener(path, *args)
        with self.lock:
            self.items[key] = handle
            while len(self.items) > self.size:
                self.items.popitem(last=False)
        return handle

    def clear(self) -> None:
        with self.lock:
            self.items.clear()


class _DeepZoom:
    """An OpenSlide handle and its DeepZoomGenerator (tiles cover the slide's bounds, if it has them)."""

    def __init__(self, path: Path) -> None:
        import openslide
        from openslide.deepzoom import DeepZoomGenerator

        try:
            osr = openslide.OpenSlide(str(path))
        except (openslide.OpenSlideError, OSError) as e:
            raise InputFileError(path, f"unreadable slide ({type(e).__name__})") from None
        props = osr.properties
        self.offset = (int(props.get("openslide.bounds-x", 0)), int(props.get("openslide.bounds-y", 0)))
        self.generator = DeepZoomGenerator(osr, DZ_TILE, DZ_OVERLAP, limit_bounds=True)


class SlideImages:
    """Thumbnails, crops and Deep Zoom tiles of the archive's slides (and of query slide files)."""

    def __init__(self, archive: Archive, cache_dir: Path) -> None:
        from pathology.slide import open_slide

        self.archive = archive
        self.cache = DiskCache(cache_dir)
        self._slides = _Handles(OPEN_SLIDES, open_slide)
        self._deepzoom = _Handles(OPEN_SLIDES, _DeepZoom)

    def close(self) -> None:
        self._slides.clear()
        self._deepzoom.clear()

    # ---- thumbnails and crops (disk cache) ----------------------------------------------------------
    def thumbnail(self, path: Path, mpp: float | None = None) -> bytes:
        """JPEG thumbnail (long side THUMBNAIL_PX) of a slide file (`mpp`: the scale it was tiled with,
        used only when the file itself has none)."""

        def make() -> bytes:
            return encode(self._slides.get(path, mpp).thumbnail(THUMBNAIL_PX), "JPEG")

        return self.cache.get(f"thumbnail|{THUMBNAIL_PX}|{_file_key(path)}", ".jpg", make)

    def crop(self, path: Path, xy: tuple[int, int], side: float, mpp: float | None = None) -> bytes:
        """PNG of the tile at level-0 `xy`, `side` level-0 pixels wide, read at the index's tile
        resolution exactly as the tiler read it."""
        px = self.archive.geometry.px

        def make() -> bytes:
            return encode(self._slides.get(path, mpp).read_tile(xy[0], xy[1], side, px), "PNG")

        return self.cache.get(f"crop|{px}|{side!r}|{xy[0]}|{xy[1]}|{_file_key(path)}", ".png", make)

    def tile_side(self, entry: SlideEntry) -> float:
        """An indexed slide's tile side in level-0 pixels (the store's record, else from its scale)."""
        if entry.tile_size_level0 is not None:
            return entry.tile_size_level0
        return self.archive.geometry.level0_px(
            self._slides.get(self.archive.slide_file(entry), entry.mpp).mpp
        )

    def tile_crop(self, entry: SlideEntry, tile: int) -> bytes:
        """PNG of an indexed slide's `tile`-th indexed tile."""
        xy = self.archive.indexed_tile(entry, tile)
        return self.crop(self.archive.slide_file(entry), xy, self.tile_side(entry), entry.mpp)

    # ---- Deep Zoom --------------------------------------------------------------------------------
    def dzi(self, entry: SlideEntry) -> tuple[str, tuple[int, int]]:
        """The slide's DZI XML and the level-0 offset of its Deep Zoom image (the slide's bounds)."""
        dz = self._deepzoom.get(self.archive.slide_file(entry))
        return dz.generator.get_dzi("jpeg"), dz.offset

    def dz_tile(self, entry: SlideEntry, level: int, col: int, row: int) -> bytes:
        """One JPEG Deep Zoom tile; NotFound for a level or address outside the pyramid."""
        gen = self._deepzoom.get(self.archive.slide_file(entry)).generator
        if not 0 <= level < gen.level_count:
            raise NotFound(f"no Deep Zoom level {level}")
        cols, rows = gen.level_tiles[level]
        if not (0 <= col < cols and 0 <= row < rows):
            raise NotFound(f"no Deep Zoom tile {col}_{row} at level {level}")
        try:
            tile = gen.get_tile(level, (col, row))
        except Exception as e:  # OpenSlide's read errors surface as several types
            raise HistoError(
                f"slide {entry.slide_id!r}: Deep Zoom read failed ({type(e).__name__})"
            ) from None
        buf = io.BytesIO()
        tile.convert("RGB").save(buf, "JPEG", quality=DZ_QUALITY)
        return buf.getvalue()
