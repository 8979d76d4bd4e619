"""The indexed slides as the page shows them, and the only ways a request reaches a slide file.

A request names a slide by its index ID or a `--slides-root` file by its key (its path relative to the
root, as listed by the server); both are looked up in tables built here from the index's own records
and a listing of the root, so no request parameter is ever joined into a file path.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from histo.errors import HistoError
from search.web import query

MAX_LISTED_FILES = 10_000  # a --slides-root listing stops here (the page lists them in one select)


class NotFound(HistoError):
    """An ID or key that names nothing the server serves (answered 404)."""

    status = 404


@dataclass(frozen=True)
class SlideEntry:
    """One indexed slide: catalog fields, tile-store fields (when the store is readable) and its file."""

    slide_id: str
    label: str | None
    patient: str | None
    site: str | None
    n_tiles: int
    project: str | None = None
    n_mosaic: int | None = None
    path: Path | None = None  # the slide file; None when neither its record nor --slides-root has it
    mpp: float | None = None  # level-0 µm/px as tiled (the store's record)
    tile_size_level0: float | None = None  # the indexed tile's side in level-0 pixels
    store: Path | None = None

    def as_json(self) -> dict[str, Any]:
        """The catalog row of `GET /api/slides` (no file paths: the API never reveals them)."""
        return {
            "slide_id": self.slide_id,
            "label": self.label,
            "patient": self.patient,
            "site": self.site,
            "project": self.project,
            "n_tiles": self.n_tiles,
            "n_mosaic": self.n_mosaic,
            "has_file": self.path is not None,
        }


class Archive:
    """The open index, its slides by ID, and the slide files under `--slides-root` by key."""

    def __init__(self, index: Any, slides_root: Path | None) -> None:
        from pathology.slide import SLIDE_EXTENSIONS

        self.index = index
        self.geometry = query.tile_geometry(index)
        self.slides_root = slides_root.resolve() if slides_root is not None else None
        self._extensions = SLIDE_EXTENSIONS
        self._files: dict[str, Path] = self.list_files()
        by_stem = {_stem(p): p for p in self._files.values()}
        rows = query.catalog_rows(index)
        stores = _store_records(rows)
        self.slides: dict[str, SlideEntry] = {}
        for row in rows:
            rec = stores.get(row["slide_id"])
            self.slides[row["slide_id"]] = _entry(row, rec, by_stem.get(row["slide_id"]))

    def __len__(self) -> int:
        return len(self.slides)

    def slide(self, slide_id: str) -> SlideEntry:
        """The indexed slide with this ID; NotFound otherwise."""
        entry = self.slides.get(slide_id)
        if entry is None:
            raise NotFound(f"no indexed slide {slide_id!r}")
        return entry

    def slide_file(self, entry: SlideEntry) -> Path:
        """The slide's file, which must still exist; HistoError naming the slide otherwise."""
        if entry.path is None or not entry.path.is_file():
            where = " or under --slides-root" if self.slides_root else " (pass --slides-root where it is now)"
            raise NotFound(f"slide file of {entry.slide_id!r} not found at its recorded path{where}")
        return entry.path

    def indexed_tile(self, entry: SlideEntry, tile: int) -> tuple[int, int]:
        """Level-0 x, y of the slide's `tile`-th indexed tile; NotFound for a tile it does not have."""
        coords = query.indexed_coords(self.index, entry.slide_id)
        if not 0 <= tile < len(coords):
            raise NotFound(f"slide {entry.slide_id!r} has no indexed tile {tile}")
        return int(coords[tile][0]), int(coords[tile][1])

    def indexed_coords(self, entry: SlideEntry) -> np.ndarray:
        return query.indexed_coords(self.index, entry.slide_id)

    def mosaic_coords(self, entry: SlideEntry) -> np.ndarray | None:
        """Level-0 x, y of the slide's whole mosaic (from its tile store), or None when unreadable."""
        if entry.store is None:
            return None
        from pathology.store import TileStore

        try:
            return TileStore.open(entry.store).coords(entry.slide_id)
        except (HistoError, OSError):
            return None

    # ---- --slides-root ----------------------------------------------------------------------------
    def list_files(self) -> dict[str, Path]:
        """{key: file} of the slide files (and OME-Zarr image folders) under --slides-root (key: the path
        relative to the root; hidden entries and links leading outside the root are left out)."""
        from pathology.slide.ngff import is_ngff

        root = self.slides_root
        if root is None:
            return {}
        files: dict[str, Path] = {}
        for folder, dirs, names in os.walk(root):
            visible = sorted(d for d in dirs if not d.startswith("."))
            images = [d for d in visible if is_ngff(Path(folder) / d)]
            dirs[:] = [d for d in visible if d not in images]  # an image folder is a slide, not a folder
            for name in sorted([*names, *images]):
                path = Path(folder) / name
                if name.startswith(".") or (
                    name not in images and path.suffix.lower() not in self._extensions
                ):
                    continue
                real = path.resolve()
                if (real.is_file() or name in images) and real.is_relative_to(root):
                    files[path.relative_to(root).as_posix()] = real
                if len(files) >= MAX_LISTED_FILES:
                    return files
        return files

    def refresh_files(self) -> dict[str, Path]:
        """Re-list --slides-root (new files appear in the query page)."""
        self._files = self.list_files()
        return self._files

    def file(self, key: str) -> Path:
        """The --slides-root file listed under `key`; NotFound for any other key."""
        path = self._files.get(key)
        if path is None:
            raise NotFound(f"no slide file {key!r} under --slides-root (reload the query page)")
        return path


def _stem(path: Path) -> str:
    from pathology.slide import slide_id_of

    return slide_id_of(path)


def _store_records(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """{slide_id: SlideRecord} from the tile stores the index records (unreadable stores are skipped)."""
    from pathology.store import TileStore

    records: dict[str, Any] = {}
    for store_path in sorted({r["store"] for r in rows if r["store"]}):
        try:
            store = TileStore.open(store_path)
        except HistoError:
            continue
        for row in rows:
            if row["store"] == store_path:
                try:
                    records[row["slide_id"]] = (Path(store_path), store.record(row["slide_id"]))
                except (HistoError, OSError, ValueError):
                    continue
    return records


def _entry(row: dict[str, Any], store_rec: Any, root_file: Path | None) -> SlideEntry:
    """A SlideEntry from a catalog row, its (store path, SlideRecord) if any, and a --slides-root file."""
    base = {k: row[k] for k in ("slide_id", "label", "patient", "site", "n_tiles")}
    if store_rec is None:
        return SlideEntry(**base, path=root_file)
    store, rec = store_rec
    recorded = Path(rec.source_path)
    return SlideEntry(
        **base,
        project=rec.project,
        n_mosaic=rec.n_mosaic,
        path=recorded if recorded.is_file() else root_file,
        mpp=rec.mpp,
        tile_size_level0=rec.tile_size_level0,
        store=store,
    )
