"""Array-level two-stage slide search: per-tile kNN -> candidate slides -> exact slide distance.

`SearchEngine` holds the slide table (rows of every slide contiguous, in slide order), the packed barcodes,
the FAISS indexes and the float features; it knows nothing about files, so the benchmark and the tests
use it directly and `SlideIndex` wraps it with storage, tiling and the feature extractor.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, get_args

import numpy as np

from histo.classification import vote
from search.config import IndexSearch, Mode
from search.distance import best_matches, nearest_slides
from search.filters import CACHED_FILTERS, Where, slide_mask

MODES = get_args(Mode)


@dataclass
class TileMatch:
    """A query tile and its nearest tile in a result slide (level-0 coordinates)."""

    query_tile: int
    query_xy: list[int] | None
    tile: int
    xy: list[int]
    distance: float


@dataclass
class SlideHit:
    """One ranked slide: id, label, slide distance and its best-matching tile pairs."""

    slide_id: str
    label: str | None
    distance: float
    matches: list[TileMatch] = field(default_factory=list)
    tile_size_level0: float | None = None  # side of its tiles in level-0 px (to draw them; not in to_dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "slide_id": self.slide_id,
            "label": self.label,
            "distance": self.distance,
            "matches": [asdict(m) for m in self.matches],
        }


@dataclass
class SearchResult:
    """Ranked results of one query with the majority-vote prediction; `info` says how it was searched.
    A slide query also carries its slide ID and tile side in level-0 px (to draw its tiles; not in to_dict)."""

    query: str
    prediction: str | None
    results: list[SlideHit]
    info: dict[str, Any] = field(default_factory=dict)
    query_slide_id: str | None = None
    query_tile_size_level0: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "query": self.query,
            "prediction": self.prediction,
            "results": [r.to_dict() for r in self.results],
            "search": dict(self.info),
        }


def vote_of(hits: Sequence[SlideHit]) -> str | None:
    """The majority label of ranked hits (histo.classification.vote: a tie goes to the nearest hit's label)."""
    return vote([h.label for h in hits], [h.distance for h in hits])


@dataclass
class Catalog:
    """The slide table: per-slide metadata and the row range [offsets[s], offsets[s+1]) of its tiles."""

    slide_ids: list[str]
    labels: list[str | None]
    patients: list[str | None]
    sites: list[str | None]
    offsets: np.ndarray  # (S + 1,) int64
    coords: np.ndarray  # (N, 2) int64 level-0 x, y of every row
    projects: list[str | None] | None = None  # None: no project recorded for any slide
    tile_sides: list[float | None] | None = None  # per slide: tile side in level-0 px (None: not recorded)

    def __post_init__(self) -> None:
        self.offsets = np.asarray(self.offsets, dtype=np.int64)
        self.tile_sides = list(self.tile_sides or [None] * len(self.slide_ids))
        self.row_slide = np.repeat(np.arange(len(self.slide_ids)), np.diff(self.offsets))
        self.position = {sid: i for i, sid in enumerate(self.slide_ids)}
        if self.projects is None:
            self.projects = [None] * len(self.slide_ids)
        # Ties in slide distance go to the smaller slide ID, so a ranking never depends on row order.
        self.id_rank = np.argsort(np.argsort(np.array(self.slide_ids, dtype=object), kind="stable"))
        self._row_masks: dict[bytes, tuple[np.ndarray, int]] = {}

    def __len__(self) -> int:
        return len(self.slide_ids)

    def rows(self, slide: int) -> slice:
        return slice(int(self.offsets[slide]), int(self.offsets[slide + 1]))

    def locate(self, row: int) -> tuple[int, int]:
        """(slide, tile number within the slide) of a row."""
        slide = int(self.row_slide[row])
        return slide, int(row - self.offsets[slide])

    def allowed_rows(self, allowed: np.ndarray) -> tuple[np.ndarray, int]:
        """The read-only row mask of a slide mask and its count of rows, cached per mask (CACHED_FILTERS): at
        1M rows the gather and the count were 0.8 ms of every filtered first stage."""
        key = np.packbits(allowed).tobytes()
        if key not in self._row_masks:
            if len(self._row_masks) >= CACHED_FILTERS:
                self._row_masks.pop(next(iter(self._row_masks)))
            rows = allowed[self.row_slide]
            rows.flags.writeable = False
            self._row_masks[key] = rows, int(np.count_nonzero(rows))
        return self._row_masks[key]

    def allowed(self, exclude_patient: str | None = None, where: Where | None = None) -> np.ndarray | None:
        """Boolean mask of searchable slides (None: all): those passing the filter `where`
        (search/filters.py), without the patient `exclude_patient`."""
        if exclude_patient is None and not where:
            return None
        mask = slide_mask(self, where) if where else np.ones(len(self), dtype=bool)
        if exclude_patient is not None:
            mask &= np.array([p != exclude_patient for p in self.patients], dtype=bool)
        return mask


@dataclass
class SearchEngine:
    """Two-stage search over a catalog; `knn[mode](queries, k, rows) -> (distances, rows)` where `rows` is
    None or a boolean mask of the rows the kNN may return; `tiles[mode]` arrays.

    `settings` (the index's `search` config, see search/config.py) set the first stage and the matches;
    a query may bring its own (`settings=` of `rank` and `search`).
    First stage: `stage1_tiles` evenly spread query tiles each fetch their `tile_k` nearest tiles among the
    allowed slides' rows, and every slide hit becomes a candidate (tile_k grows 4x while fewer than k
    slides are hit). Second stage: the exact slide distance, over all query tiles, on the candidates (the top
    k of it: search/distance.py `nearest_slides` drops a candidate once it is proven farther than the k-th).
    tile_k must exceed the tiles of a slide that nearly duplicates the query (another slide of the
    patient), or that slide alone fills every list. Ties in slide distance go to the smaller slide ID.
    """

    catalog: Catalog
    knn: dict[str, Callable[[np.ndarray, int, np.ndarray | None], tuple[np.ndarray, np.ndarray]]]
    tiles: dict[str, Callable[[], np.ndarray]]  # mode -> all rows' codes (uint8) or features (float32)
    settings: IndexSearch

    def rank(
        self,
        query: np.ndarray,
        mode: str,
        k: int,
        allowed: np.ndarray | None = None,
        exhaustive: bool = False,
        settings: IndexSearch | None = None,
    ) -> tuple[list[tuple[int, float]], dict[str, Any]]:
        """Top-k (slide, distance) for a query slide's codes/features, by exact slide distance on candidates."""
        settings = settings or self.settings
        if mode not in MODES:
            raise ValueError(f"unknown search mode {mode!r} (barcode, float)")
        cat = self.catalog
        everything = np.arange(len(cat)) if allowed is None else np.flatnonzero(allowed)
        info: dict[str, Any] = {"mode": mode, "strategy": "exhaustive", "tile_k": 0, "stage1_tiles": 0}
        candidates = everything
        if not exhaustive and len(everything) > k:
            hit, info["tile_k"] = self._first_stage(query, mode, allowed, k, settings)
            info["stage1_tiles"] = min(len(query), settings.stage1_tiles)
            if len(hit) >= k:
                candidates, info["strategy"] = hit, "two-stage"
            else:  # fewer distinct slides than asked for even with every row: search all allowed ones
                info["strategy"] = "exhaustive (fewer than k candidates)"
        top, distances, info["measured"] = nearest_slides(
            query, self.tiles[mode](), cat.offsets, candidates, k, cat.id_rank
        )
        info["candidates"] = len(candidates)
        return [(int(s), float(d)) for s, d in zip(top, distances, strict=True)], info

    def _first_stage(
        self,
        query: np.ndarray,
        mode: str,
        allowed: np.ndarray | None,
        wanted: int,
        settings: IndexSearch,
    ) -> tuple[np.ndarray, int]:
        """Allowed slides hit by the kNN of the stage-1 query tiles (over the allowed rows only), most
        neighbour rows first (the second stage measures them in this order), widening tile_k until `wanted`
        are hit."""
        cat = self.catalog
        rows_allowed, n_rows = (None, len(cat.row_slide)) if allowed is None else cat.allowed_rows(allowed)
        picked = np.unique(np.linspace(0, len(query) - 1, min(len(query), settings.stage1_tiles)).round())
        tiles = query[picked.astype(np.int64)]
        tile_k = settings.tile_k or default_tile_k(cat)
        while True:
            _, rows = self.knn[mode](tiles, min(n_rows, tile_k), rows_allowed)
            slides, hits = np.unique(cat.row_slide[rows[rows >= 0]], return_counts=True)
            if allowed is not None:
                slides, hits = slides[allowed[slides]], hits[allowed[slides]]  # only a guard: a kNN filters
            if len(slides) >= wanted or tile_k >= n_rows:
                return slides[np.argsort(-hits, kind="stable")], tile_k
            tile_k *= 4

    def hits(
        self,
        query: np.ndarray,
        ranked: list[tuple[int, float]],
        mode: str,
        query_xy: np.ndarray | None,
        n_matches: int,
    ) -> list[SlideHit]:
        """Ranked (slide, distance) pairs as SlideHits with their `n_matches` best-matching tile pairs."""
        base = self.tiles[mode]()
        cat = self.catalog
        out = []
        for slide, distance in ranked:
            rows = cat.rows(slide)
            matches = [
                TileMatch(
                    query_tile=qi,
                    query_xy=None if query_xy is None else [int(v) for v in query_xy[qi]],
                    tile=ti,
                    xy=[int(v) for v in cat.coords[rows][ti]],
                    distance=d,
                )
                for qi, ti, d in best_matches(query, base[rows], n_matches)
            ]
            hit = SlideHit(cat.slide_ids[slide], cat.labels[slide], distance, matches, cat.tile_sides[slide])
            out.append(hit)
        return out

    def search(
        self,
        name: str,
        query: np.ndarray,
        mode: str,
        k: int,
        allowed: np.ndarray | None = None,
        query_xy: np.ndarray | None = None,
        exhaustive: bool = False,
        settings: IndexSearch | None = None,
    ) -> SearchResult:
        """Full slide query: ranking, tile matches and the majority-vote label of the top k."""
        settings = settings or self.settings
        ranked, info = self.rank(query, mode, k, allowed, exhaustive, settings)
        hits = self.hits(query, ranked, mode, query_xy, settings.n_matches)
        return SearchResult(name, vote_of(hits), hits, info)

    def nearest_tiles(
        self, name: str, tile: np.ndarray, mode: str, k: int, allowed: np.ndarray | None = None
    ) -> SearchResult:
        """The k indexed tiles nearest one query tile's code/features (1, D), among the `allowed` slides'
        (None: all): one hit per tile, in order."""
        if mode not in MODES:
            raise ValueError(f"unknown search mode {mode!r} (barcode, float)")
        cat = self.catalog
        rows_allowed = None if allowed is None else cat.allowed_rows(allowed)[0]
        dist, rows = self.knn[mode](tile, k, rows_allowed)
        hits = []
        for d, row in zip(dist[0], rows[0], strict=True):
            if row < 0:
                continue
            slide, number = cat.locate(row)
            match = TileMatch(0, None, number, [int(v) for v in cat.coords[row]], float(d))
            hits.append(
                SlideHit(cat.slide_ids[slide], cat.labels[slide], float(d), [match], cat.tile_sides[slide])
            )
        return SearchResult(name, vote_of(hits), hits, {"mode": mode})


def default_tile_k(catalog: Catalog) -> int:
    """First-stage neighbours per query tile: 1.5x the mean tiles per slide (at least 10).

    A query's near-duplicate slide (another slide of the patient) can fill as many neighbours as it has
    tiles; asking for more lets the next-closest slides into the candidates.
    """
    return max(10, int(np.ceil(1.5 * len(catalog.row_slide) / max(1, len(catalog)))))
