"""The tile store: a zarr v3 group holding the mosaic of every slide, safe for concurrent shards.

Layout::

    STORE.zarr/zarr.json          root group; attributes: format, version, params (the tiling config)
    STORE.zarr/slides/<slide_id>/ one group per slide; attributes: record (SlideRecord); arrays coords
                                  (N, 2) int64 level-0 x, y; cluster (N,) int32; cellularity (N,) float32;
                                  selected (N,) bool; optional pixels (n_selected, px, px, 3) uint8
    STORE.zarr/.partial/          slide groups being written (renamed into slides/ when complete)

A slide's group appears only when complete: it is written under .partial/ and renamed. Shards write
different slides, so they never touch the same group; the root is created by an atomic rename.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from histo.errors import HistoError, InputFileError
from histo.identity import SourceIdentity
from histo.io import atomic_write_json
from pathology.config import StainConfig, TileConfig

log = logging.getLogger(__name__)

FORMAT = "histo-tile-store"
VERSION = 1
SLIDES = "slides"
PARTIAL = ".partial"
ARRAYS = ("coords", "cluster", "cellularity", "selected")
# Every stored array: zstd (zarr's default) and then a crc32c per chunk, verified by zarr on every read.
# Arrays of stores written before this have no checksum and are read as they are.
CHUNK_CODECS = (zarr.codecs.ZstdCodec(level=0), zarr.codecs.Crc32cCodec())
# Record fields a labels CSV sets (and a re-run may correct without tiling again); the index copies them.
METADATA = ("label", "patient", "site", "project")
DAMAGED = "damaged"  # status listed for a slide whose record cannot be read
_TMP_RE = re.compile(r"^(?P<slide_id>.+)\.tmp-\d+-[0-9a-f]{8}$")


@dataclass
class SlideRecord:
    """What is known about one slide in the store: source, scale, labels and the tiling outcome."""

    slide_id: str
    source_path: str
    label: str | None = None
    patient: str | None = None
    site: str | None = None
    project: str | None = None
    width: int = 0
    height: int = 0
    vendor: str | None = None
    mpp: float | None = None
    mpp_source: str | None = None
    objective_power: float | None = None
    tile_size_level0: float = 0.0
    tile_px: int = 0
    status: str = "done"
    reason: str | None = None
    n_mosaic: int = 0
    n_selected: int = 0
    given_coords: str | None = None  # the CLAM/TRIDENT coordinate file its tiles came from
    roi: str | None = None  # the QuPath GeoJSON file whose regions restricted its tissue mask
    reader: str | None = None  # the slide reader backend and its version ("openslide 4.0.1")
    source_size: int | None = None  # bytes of the source file (None: a store written before this was kept)
    source_fingerprint: str | None = None  # histo.identity.fingerprint of the source file (None: unknown)
    tiles_digest: str | None = None  # what the tiles were made from, for an index to see a re-tiling

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def identity(self) -> SourceIdentity:
        """The source file this record came from (size and fingerprint None in an older store)."""
        return SourceIdentity(self.source_path, self.source_size, self.source_fingerprint)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SlideRecord:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


def slide_id_problem(slide_id: str) -> str | None:
    """Why a slide ID cannot name a group inside the store (path escape, hidden, reserved), or None."""
    if not slide_id or slide_id.strip() != slide_id:
        return f"slide ID {slide_id!r} is empty or has surrounding spaces"
    if "/" in slide_id or "\\" in slide_id or slide_id.startswith("."):  # ".." too; "case..1" is fine
        return f"slide ID {slide_id!r} would escape or hide inside the store path"
    if slide_id.startswith("__") or any(ord(c) < 32 for c in slide_id):
        return f"slide ID {slide_id!r} is reserved by zarr or has control characters"
    return None


def decoded(where: Path, read: Callable[[], Any]) -> np.ndarray:
    """`read()` of stored chunks as an array; a chunk whose checksum or compression does not decode is
    an InputFileError naming the array `where` (the slide then fails with that reason)."""
    try:
        return np.asarray(read())
    except (ValueError, RuntimeError) as e:  # zarr: crc32c mismatch (ValueError), zstd (RuntimeError)
        if "checksum" in str(e):
            raise InputFileError(where, "damaged data: a chunk fails its crc32c checksum") from None
        raise InputFileError(
            where, f"damaged data: a chunk does not decode ({type(e).__name__}: {e})"
        ) from None


def _read_record(group: Path) -> SlideRecord:
    """The SlideRecord in a slide group's zarr.json; InputFileError when it is unreadable or damaged."""
    try:
        record = json.loads((group / "zarr.json").read_text())["attributes"]["record"]
        if not isinstance(record, dict) or not isinstance(record.get("slide_id"), str):
            raise ValueError("no slide_id")
        return SlideRecord.from_dict(record)
    except (OSError, ValueError, KeyError, TypeError) as e:
        why = e.strerror if isinstance(e, OSError) else f"{type(e).__name__}: {e}"
        raise InputFileError(
            group, f"damaged slide record ({why}); tile the slide again to repair it"
        ) from None


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj))


def _tmp_name(slide_id: str) -> str:
    return f"{slide_id}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"


class TileStore:
    """Read (and, for the tiler, write) a tile store."""

    def __init__(self, path: Path, params: dict) -> None:
        self.path = path
        self.params = params

    @classmethod
    def open(cls, path: str | os.PathLike) -> TileStore:
        """Open an existing store; InputFileError if `path` is not one."""
        path = Path(path)
        meta = path / "zarr.json"
        try:
            attrs = json.loads(meta.read_text()).get("attributes", {})
        except (OSError, ValueError):
            raise InputFileError(path, "not a tile store (no readable zarr.json)") from None
        if attrs.get("format") != FORMAT:
            raise InputFileError(path, f"not a tile store (format {attrs.get('format')!r})")
        if attrs.get("version") != VERSION:
            raise InputFileError(
                path, f"tile store version {attrs.get('version')} (this code reads {VERSION})"
            )
        return cls(path, attrs["params"])

    @classmethod
    def create_or_open(
        cls, path: str | os.PathLike, params: dict, complete: Callable[[dict], dict] | None = None
    ) -> TileStore:
        """Open the store for writing, creating it atomically if absent; the tiling parameters of an
        existing store must equal `params` (several shards share one store). `complete` fills in the
        keys a store of an earlier release lacks (with the defaults that reproduce what it did)."""
        path = Path(path)
        params = _jsonable(params)
        if not (path / "zarr.json").exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.parent / f".{path.name}.{_tmp_name('new')}"
            root = zarr.open_group(tmp, mode="w")
            root.attrs.update({"format": FORMAT, "version": VERSION, "params": params})
            root.create_group(SLIDES)
            (tmp / PARTIAL).mkdir()
            try:
                os.rename(tmp, path)  # atomic; fails when the path is taken (e.g. another shard's new store)
            except OSError:
                shutil.rmtree(tmp, ignore_errors=True)
                # Judged only now: a shard that created the store since our first look is no error.
                if not (path / "zarr.json").exists():
                    raise InputFileError(path, "exists and is not a tile store") from None
        store = cls.open(path)
        stored = _jsonable(complete(store.params)) if complete is not None else store.params
        if stored != params:
            differ = sorted(_diff_keys(stored, params))
            raise HistoError(
                f"{path}: made with different tiling parameters ({', '.join(differ)}); use a new store"
            )
        return store

    # ---- reading -------------------------------------------------------------------------------
    def _group_dir(self, slide_id: str) -> Path:
        problem = slide_id_problem(slide_id)
        if problem:
            raise HistoError(f"{self.path}: {problem}")
        return self.path / SLIDES / slide_id

    def _records(self) -> list[SlideRecord]:
        """Every slide's record; a damaged one is listed with status "damaged" (and a warning)."""
        root = self.path / SLIDES
        records = []
        for d in sorted(root.iterdir()) if root.exists() else []:
            if not (d / "zarr.json").exists():
                continue
            try:
                records.append(_read_record(d))
            except InputFileError as e:
                log.warning("%s", e)
                records.append(SlideRecord(d.name, "", status=DAMAGED, reason=e.reason))
        return records

    def slide_ids(self, status: str | None = "done") -> list[str]:
        """Sorted IDs of the slides with this status ("done", "failed"; None for all)."""
        return [r.slide_id for r in self._records() if status is None or r.status == status]

    def has_slide(self, slide_id: str) -> bool:
        return (self._group_dir(slide_id) / "zarr.json").exists()

    def record(self, slide_id: str) -> SlideRecord:
        """The slide's record; InputFileError naming its group when the record is damaged."""
        group = self._group_dir(slide_id)
        if not (group / "zarr.json").exists():
            raise HistoError(f"{self.path}: no slide {slide_id!r} in the store")
        return _read_record(group)

    def _array(self, slide_id: str, name: str) -> np.ndarray:
        group = zarr.open_group(self._group_dir(slide_id), mode="r")
        if name not in group:
            raise HistoError(
                f"{self.path}: slide {slide_id!r} has no {name} (status {self.record(slide_id).status})"
            )
        return decoded(self._group_dir(slide_id) / name, lambda: group[name][...])

    def coords(self, slide_id: str) -> np.ndarray:
        return self._array(slide_id, "coords")

    def cluster(self, slide_id: str) -> np.ndarray:
        return self._array(slide_id, "cluster")

    def cellularity(self, slide_id: str) -> np.ndarray:
        return self._array(slide_id, "cellularity")

    def selected(self, slide_id: str) -> np.ndarray:
        return self._array(slide_id, "selected")

    def has_pixels(self, slide_id: str) -> bool:
        return (self._group_dir(slide_id) / "pixels" / "zarr.json").exists()

    def read_selected(self, slide_id: str, indices: np.ndarray | list[int] | None = None) -> np.ndarray:
        """The selected tiles (M, tile_px, tile_px, 3) uint8 in order, or those at `indices` among them;
        from the stored pixels when saved, otherwise read from the source slide; stain-normalized when the
        tiling says so (saved pixels were normalized when they were saved)."""
        rec = self.record(slide_id)
        if self.has_pixels(slide_id):
            pixels = zarr.open_group(self._group_dir(slide_id), mode="r")["pixels"]
            where = self._group_dir(slide_id) / "pixels"
            if indices is None:
                return decoded(where, lambda: pixels[...])
            return decoded(where, lambda: pixels.oindex[np.asarray(indices, np.int64)])
        coords = self.coords(slide_id)[self.selected(slide_id)]
        if indices is not None:
            coords = coords[np.asarray(indices, np.int64)]
        from pathology.slide import open_slide, recorded_reader

        if not Path(rec.source_path).exists():
            raise InputFileError(
                rec.source_path, f"slide file of {slide_id!r} in {self.path} has moved or is missing"
            )
        with open_slide(rec.source_path, mpp_override=rec.mpp, reader=recorded_reader(rec.reader)) as slide:
            return self.normalize(
                read_tiles(slide, coords, rec.tile_size_level0, rec.tile_px), rec.source_path
            )

    @cached_property
    def stain(self) -> StainConfig:
        """The stain normalization the store's tiles get (`stain` of its tiling; none in older stores)."""
        return TileConfig.section("stain", self.params.get("stain"), source=str(self.path))

    def normalize(self, tiles: np.ndarray, where: object) -> np.ndarray:
        """Tiles read from a slide, normalized as the store's tiling says (saved pixels already are)."""
        from pathology.stain import normalize_tiles

        return normalize_tiles(tiles, self.stain, where)

    # ---- writing (tiler) -------------------------------------------------------------------------
    def update_record(self, slide_id: str, changes: dict[str, Any]) -> SlideRecord:
        """Change fields of a slide's record (labels, patient, site, source path) without touching its
        arrays: its zarr.json is rewritten atomically. Returns the new record."""
        group = self._group_dir(slide_id)
        doc = json.loads((group / "zarr.json").read_text())
        record = SlideRecord.from_dict({**_read_record(group).to_dict(), **changes})
        doc["attributes"]["record"] = _jsonable(record.to_dict())
        atomic_write_json(group / "zarr.json", doc)
        return record

    def clean_partial(self, slide_id: str) -> int:
        """Remove leftovers of an interrupted write of `slide_id`; returns how many were removed."""
        partial = self.path / PARTIAL
        removed = 0
        for d in partial.iterdir() if partial.exists() else []:
            m = _TMP_RE.match(d.name)
            if m and m["slide_id"] == slide_id:
                shutil.rmtree(d, ignore_errors=True)
                removed += 1
        return removed

    def write_slide(
        self,
        record: SlideRecord,
        arrays: dict[str, np.ndarray] | None = None,
        pixels: np.ndarray | None = None,
    ) -> None:
        """Write one slide's group under .partial/ and rename it into place (replacing an old record)."""
        final = self._group_dir(record.slide_id)
        partial = self.path / PARTIAL
        partial.mkdir(exist_ok=True)
        tmp = partial / _tmp_name(record.slide_id)
        group = zarr.open_group(tmp, mode="w")
        group.attrs["record"] = _jsonable(record.to_dict())
        for name, data in (arrays or {}).items():
            chunks = (max(1, len(data)), *data.shape[1:])
            group.create_array(name, data=np.ascontiguousarray(data), chunks=chunks, compressors=CHUNK_CODECS)
        if pixels is not None:
            group.create_array("pixels", data=pixels, chunks=(1, *pixels.shape[1:]), compressors=CHUNK_CODECS)
        old = None
        if final.exists():
            old = partial / _tmp_name(record.slide_id)
            os.rename(final, old)
        os.rename(tmp, final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def tiles_digest(record: SlideRecord, coords: np.ndarray) -> str:
    """What a slide's tiles were made from: its source fingerprint, tile geometry and the level-0 coords
    of the selected tiles (sha256, 32 hex digits). An index keeps it to see a slide tiled anew."""
    h = hashlib.sha256()
    h.update(json.dumps([record.source_fingerprint, record.tile_size_level0, record.tile_px]).encode())
    h.update(np.ascontiguousarray(coords, np.int64).tobytes())
    return h.hexdigest()[:32]


def read_tiles(slide: Any, coords: np.ndarray, size_level0: float, tile_px: int) -> np.ndarray:
    """Tiles at `coords` (level-0 x, y) read from an open Slide at the target resolution."""
    out = np.empty((len(coords), tile_px, tile_px, 3), np.uint8)
    for i, (x, y) in enumerate(coords):
        out[i] = slide.read_tile(int(x), int(y), size_level0, tile_px)
    return out


def _diff_keys(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out: list[str] = []
        for k in sorted(set(a) | set(b)):
            out += _diff_keys(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [] if a == b else [prefix.rstrip(".")]
