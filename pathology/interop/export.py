"""`histo export`: a tile store's slides as CLAM or TRIDENT coordinate files, or QuPath GeoJSON.

One file per done slide of the store, written atomically; a slide whose file cannot be made (its source
slide moved, for the formats that need the slide's pyramid or tissue) fails alone, through histo.batch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from histo.batch import BatchSummary, Outcome, run_batch
from histo.errors import HistoError, InputFileError
from pathology.geometry import TileGeometry
from pathology.interop.coords import clam_attrs, coords_file, trident_attrs, write_coords

EXPORT_FORMATS = ("clam", "trident", "qupath")
WHICH = ("selected", "mosaic")


@dataclass(frozen=True)
class _Slide:
    """One done slide of the store (an item of `histo.batch.run_batch`)."""

    id: str
    path: str


def _open_source(store: Any, slide_id: str) -> Any:
    """The slide a store record came from, opened with the scale the store used."""
    from pathology.slide import open_slide, recorded_reader

    rec = store.record(slide_id)
    if not Path(rec.source_path).exists():
        raise InputFileError(
            rec.source_path, f"slide file of {slide_id!r} in {store.path} has moved or is missing"
        )
    return open_slide(rec.source_path, mpp_override=rec.mpp, reader=recorded_reader(rec.reader))


def tile_coords(store: Any, slide_id: str, which: str) -> np.ndarray:
    """Level-0 corners of a slide's selected tiles or of its whole mosaic."""
    coords = store.coords(slide_id)
    return coords[store.selected(slide_id)] if which == "selected" else coords


def _export_coords(item: _Slide, store: Any, out: Path, fmt: str, which: str) -> Outcome:
    rec = store.record(item.id)
    coords = tile_coords(store, item.id, which)
    path = coords_file(out, item.id, fmt)
    save_path = str(path.parent)
    if fmt == "clam":
        with _open_source(store, item.id) as slide:
            attrs = clam_attrs(slide, rec.tile_size_level0, rec.tile_px, save_path)
    else:
        attrs = trident_attrs(rec, TileGeometry.recorded(store.params, str(store.path)).mpp, save_path)
    write_coords(path, coords, attrs, rec.mpp)
    return Outcome.done(item.id, item.path, file=str(path), n_tiles=len(coords))


def _export_qupath(item: _Slide, store: Any, out: Path) -> Outcome:
    from pathology.interop.geojson import store_slide_features, write_geojson

    with _open_source(store, item.id) as slide:
        features = store_slide_features(store, item.id, slide)
    path = write_geojson(out / f"{item.id}.geojson", features)
    return Outcome.done(item.id, item.path, file=str(path), n_features=len(features))


def export_store(
    store: Any,
    out: str | os.PathLike,
    fmt: str,
    which: str = "selected",
    shard: tuple[int, int] = (0, 1),
    progress: bool = True,
) -> BatchSummary:
    """Write every done slide of `store` (a TileStore or its path) in `fmt` under `out`.

    clam/trident: `out/patches/<id>.h5` / `out/patches/<id>_patches.h5` with the tiles `which` says
    (selected, or the whole mosaic); qupath: `out/<id>.geojson` with the tissue outline, the mosaic and
    the selected tiles (`which` does not apply).
    """
    from pathology.store import TileStore

    if fmt not in EXPORT_FORMATS:
        raise HistoError(f"unknown export format {fmt!r} (choose from {', '.join(EXPORT_FORMATS)})")
    if which not in WHICH:
        raise HistoError(f"--which must be one of {', '.join(WHICH)}, got {which!r}")
    store = store if isinstance(store, TileStore) else TileStore.open(store)
    slide_ids = store.slide_ids()
    if not slide_ids:
        raise HistoError(f"{store.path}: no tiled slide (status done) to export")
    out = Path(out)
    if fmt == "qupath":
        process = partial(_export_qupath, store=store, out=out)
    else:
        process = partial(_export_coords, store=store, out=out, fmt=fmt, which=which)
    items = [_Slide(sid, store.record(sid).source_path) for sid in slide_ids]
    outcomes = run_batch(items, process, shard=shard, desc=f"export {fmt}", unit="slide", progress=progress)
    return BatchSummary(tuple(outcomes), out=str(out), shard=shard)
