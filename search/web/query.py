"""The search page's one door into the search API: open the index, read its records, run a query.

Every call `histo serve` makes into `search.slide_index` is in this module, and each is one call of
`SlideIndex` (`open`, `tile_query`, `search`), so the page searches exactly as `histo search` does.
Results are returned in the `histo search --json` shape (`SearchResult.to_dict()`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from pathology.geometry import TileGeometry
from search.config import SearchConfig
from search.features import FEATURES_DIR, SLIDES
from search.manifest import MANIFEST
from search.slide_index import SlideIndex


def open_index(index_dir: Path, search_cfg: SearchConfig) -> SlideIndex:
    """Open (and verify, as `run.verify` says) an index with the `histo search` settings (its first-stage
    `tile_k` / `stage1_tiles` included), and load its model now: a wrong or missing model is an error at
    start, not at the first query."""
    index = SlideIndex.open(index_dir, search_cfg)
    index.extractor  # noqa: B018 (loads and checks the model)
    return index


def catalog_rows(index: SlideIndex) -> list[dict[str, Any]]:
    """The catalog in row order: slide_id, label, patient, site, n_tiles, and `store` (the tile store the
    slide's features were extracted from, from the index's own per-slide record; None if unrecorded)."""
    cat = index.catalog
    root = index.path / FEATURES_DIR / SLIDES
    rows = []
    for s, sid in enumerate(cat.slide_ids):
        rows.append(
            {
                "slide_id": sid,
                "label": cat.labels[s],
                "patient": cat.patients[s],
                "site": cat.sites[s],
                "n_tiles": int(cat.offsets[s + 1] - cat.offsets[s]),
                "store": _feature_record(root, sid).get("store"),
            }
        )
    return rows


def _feature_record(root: Path, slide_id: str) -> dict[str, Any]:
    """The record written beside a slide's features (read-only: its zarr.json attributes)."""
    try:
        return json.loads((root / slide_id / "zarr.json").read_text())["attributes"]["record"]
    except (OSError, ValueError, KeyError):
        return {}


def indexed_coords(index: SlideIndex, slide_id: str) -> np.ndarray:
    """(n, 2) level-0 x, y of a slide's indexed (high-cellularity) tiles, in the index's tile order."""
    cat = index.catalog
    return cat.coords[cat.rows(cat.position[slide_id])]


def tile_geometry(index: SlideIndex) -> TileGeometry:
    """The tile the index was built from (a patch query should show this much tissue)."""
    return TileGeometry.recorded(index.manifest["tiling"], str(index.path / MANIFEST))


def tile_query_slide(index: SlideIndex, path: Path, mpp: float | None = None) -> Any:
    """A query slide's TileSet, tiled with the index's tiling config (as `histo search` does); `mpp` is
    used only when the file has no scale of its own."""
    return index.tile_query(path, mpp)


def search_tiles(
    index: SlideIndex, tileset: Any, k: int, mode: str, exclude_same_patient: bool, exhaustive: bool
) -> dict[str, Any]:
    """Rank indexed slides for a tiled query slide; `query` is the slide's ID."""
    exclude = exclude_same_patient or None
    return index.search(tileset, k, mode=mode, exclude_patient=exclude, exhaustive=exhaustive).to_dict()


def search_rgb(index: SlideIndex, rgb: np.ndarray, name: str, k: int, mode: str) -> dict[str, Any]:
    """Top-k indexed tiles for one RGB patch; `query` is `name` (the upload's file name)."""
    return index.search(rgb, k, mode=mode, name=name).to_dict()
