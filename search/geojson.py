"""Search results as QuPath GeoJSON (`histo search --geojson DIR`): where the matched tiles lie on each slide.

For each query, `DIR/<query id>/` holds
    query/<query id>.geojson   the query slide's matched tiles (slide queries), one detection per tile pair,
                               class "Query match", named "#<rank> <hit id> tile <t>"
    hits/<hit id>.geojson      each hit slide's matched tiles, class "Hit match", named "#<rank> query tile <q>"
with measurements rank (of the hit slide), slide_distance, distance (of the tile pair), tile (the hit's
indexed tile) and query_tile (the query's selected tile). Coordinates are level-0 pixels of each slide, as
`histo export --format qupath` writes them: open a slide in QuPath and import its file (File > Import
objects). The index records each slide's tile side for this (its catalog, `tile_size_level0`). A re-run
replaces a query's folder as a whole, so no file of an earlier result is left beside the new ones.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

from histo.errors import HistoError
from pathology.interop.geojson import feature, square, write_geojson
from search.engine import Catalog, SearchResult, SlideHit

QUERY_MATCH = ("Query match", [230, 150, 0])
HIT_MATCH = ("Hit match", [0, 140, 230])
QUERY_DIR, HITS_DIR = "query", "hits"


def missing_tile_sides(catalog: Catalog) -> list[str]:
    """Indexed slides whose tile side is not recorded (an index built before it was, or feature files
    whose attributes do not give it): their tiles cannot be drawn."""
    return [sid for sid, side in zip(catalog.slide_ids, catalog.tile_sides, strict=True) if side is None]


def _side(hit: SlideHit) -> float:
    if hit.tile_size_level0 is None:
        raise HistoError(
            f"{hit.slide_id}: the index does not record its tile size; rebuild the index with histo index"
        )
    return hit.tile_size_level0


def _tile(xy: list[int], side: float, cls: tuple[str, list[int]], measurements: dict, name: str) -> dict:
    return feature(square(xy[0], xy[1], side), "detection", cls, measurements, name)


def result_features(result: SearchResult) -> tuple[list[dict], dict[str, list[dict]]]:
    """(the query slide's features, hit slide ID -> its features) of one result's tile matches."""
    query: list[dict] = []
    hits: dict[str, list[dict]] = {}
    query_side = result.query_tile_size_level0
    for rank, hit in enumerate(result.results, 1):
        side = _side(hit)
        for m in hit.matches:
            measurements = {
                "rank": rank, "slide_distance": hit.distance, "distance": m.distance, "tile": m.tile,
                "query_tile": m.query_tile,
            }  # fmt: skip
            name = f"#{rank} query tile {m.query_tile}"
            hits.setdefault(hit.slide_id, []).append(_tile(m.xy, side, HIT_MATCH, measurements, name))
            if m.query_xy is not None and query_side is not None:
                name = f"#{rank} {hit.slide_id} tile {m.tile}"
                query.append(_tile(m.query_xy, query_side, QUERY_MATCH, measurements, name))
    return query, hits


def write_result_geojson(
    result: SearchResult, out_dir: str | os.PathLike, query_id: str | None = None
) -> Path:
    """Write one result's files under `out_dir/<query id>/` (replacing an earlier folder) and return it.
    `query_id`: the folder's name, by default the query slide's ID (needed for a patch query)."""
    query_id = query_id or result.query_slide_id
    if query_id is None:
        raise HistoError(f"{result.query}: a patch query needs a query_id to name its GeoJSON folder")
    query, hits = result_features(result)
    final = Path(out_dir) / query_id
    tmp = final.parent / f".{query_id}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        if query:
            write_geojson(tmp / QUERY_DIR / f"{result.query_slide_id or query_id}.geojson", query)
        for slide_id, features in hits.items():
            write_geojson(tmp / HITS_DIR / f"{slide_id}.geojson", features)
        tmp.mkdir(parents=True, exist_ok=True)  # a result without hits is an empty folder
        old = final.parent / f".{query_id}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        if final.exists():
            os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final
