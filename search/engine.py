"""Array-level two-stage slide search: per-tile kNN -> candidate slides -> exact slide distance.

`SearchEngine` holds the slide table (rows of every slide contiguous, in slide order), the packed barcodes,
the FAISS indexes and the float features; it knows nothing about files, so the benchmark and the tests
use it directly and `SlideIndex` wraps it with storage, tiling and the feature extractor.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from search.distance import best_matches, slide_distances

MODES = ("barcode", "float")


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

    def to_dict(self) -> dict[str, Any]:
        return {
            "slide_id": self.slide_id,
            "label": self.label,
            "distance": self.distance,
            "matches": [asdict(m) for m in self.matches],
        }


@dataclass
class SearchResult:
    """Ranked results of one query with the majority-vote prediction; `info` says how it was searched."""

    query: str
    prediction: str | None
    results: list[SlideHit]
    info: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "query": self.query,
            "prediction": self.prediction,
            "results": [r.to_dict() for r in self.results],
        }


def majority_vote(labels: Sequence[str | None]) -> str | None:
    """Most frequent label; a tie goes to the tied label ranked first. None labels do not vote."""
    votes = [x for x in labels if x is not None]
    if not votes:
        return None
    counts = Counter(votes)
    best = max(counts.values())
    return next(x for x in votes if counts[x] == best)


@dataclass
class Catalog:
    """The slide table: per-slide metadata and the row range [offsets[s], offsets[s+1]) of its tiles."""

    slide_ids: list[str]
    labels: list[str | None]
    patients: list[str | None]
    sites: list[str | None]
    offsets: np.ndarray  # (S + 1,) int64
    coords: np.ndarray  # (N, 2) int64 level-0 x, y of every row

    def __post_init__(self) -> None:
        self.offsets = np.asarray(self.offsets, dtype=np.int64)
        self.row_slide = np.repeat(np.arange(len(self.slide_ids)), np.diff(self.offsets))
        self.position = {sid: i for i, sid in enumerate(self.slide_ids)}

    def __len__(self) -> int:
        return len(self.slide_ids)

    def rows(self, slide: int) -> slice:
        return slice(int(self.offsets[slide]), int(self.offsets[slide + 1]))

    def allowed(self, exclude_patient: str | None = None, site: str | None = None) -> np.ndarray | None:
        """Boolean mask of searchable slides (None: all), dropping a patient and/or keeping one site."""
        if exclude_patient is None and site is None:
            return None
        mask = np.ones(len(self), dtype=bool)
        if exclude_patient is not None:
            mask &= np.array([p != exclude_patient for p in self.patients], dtype=bool)
        if site is not None:
            mask &= np.array([s == site for s in self.sites], dtype=bool)
        return mask


@dataclass
class SearchEngine:
    """Two-stage search over a catalog; `knn[mode](queries, k) -> (distances, rows)`, `tiles[mode]` arrays."""

    catalog: Catalog
    knn: dict[str, Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]]]
    tiles: dict[str, Callable[[], np.ndarray]]  # mode -> all rows' codes (uint8) or features (float32)
    tile_k: int = 10  # neighbours per query tile in the first stage
    n_matches: int = 5
    min_candidates: int = 20  # widen the first stage (tile_k x 4 each time) until this many slides are hit
    max_candidates: int | None = None  # keep the slides with the most first-stage hits (None: all hit slides)

    def rank(
        self,
        query: np.ndarray,
        mode: str = "barcode",
        k: int = 5,
        allowed: np.ndarray | None = None,
        exhaustive: bool = False,
    ) -> tuple[list[tuple[int, float]], dict[str, Any]]:
        """Top-k (slide, distance) for a query slide's codes/features, by exact slide distance on candidates."""
        if mode not in MODES:
            raise ValueError(f"unknown search mode {mode!r} (barcode, float)")
        base = self.tiles[mode]()
        cat = self.catalog
        n_allowed = len(cat) if allowed is None else int(allowed.sum())
        excluded_rows = 0 if allowed is None else int(np.diff(cat.offsets)[~allowed].sum())
        tile_k = 0
        if exhaustive or excluded_rows * 2 >= len(cat.row_slide) or n_allowed <= k:
            strategy = "exhaustive"
            candidates = np.arange(len(cat)) if allowed is None else np.flatnonzero(allowed)
        else:
            strategy = "two-stage"
            candidates, tile_k = self._first_stage(
                query, mode, allowed, excluded_rows, max(k, self.min_candidates)
            )
            if len(candidates) < k:  # fewer distinct slides than asked for: search all allowed ones
                strategy = "exhaustive (fewer than k candidates)"
                candidates = np.arange(len(cat)) if allowed is None else np.flatnonzero(allowed)
        distances = slide_distances(query, base, cat.offsets, candidates)
        order = np.lexsort((candidates, distances))[:k]
        ranked = [(int(candidates[i]), float(distances[i])) for i in order]
        info = {"strategy": strategy, "candidates": len(candidates), "tile_k": tile_k, "mode": mode}
        return ranked, info

    def _first_stage(
        self, query: np.ndarray, mode: str, allowed: np.ndarray | None, excluded_rows: int, wanted: int
    ) -> tuple[np.ndarray, int]:
        """Candidate slides hit by the per-tile kNN, widening tile_k until `wanted` slides are hit."""
        cat = self.catalog
        n_rows = len(cat.row_slide)
        tile_k = self.tile_k
        while True:
            # Asking for tile_k + excluded rows neighbours guarantees tile_k allowed ones per query tile.
            _, rows = self.knn[mode](query, min(n_rows, tile_k + excluded_rows))
            slides, votes = np.unique(cat.row_slide[rows[rows >= 0]], return_counts=True)
            if allowed is not None:
                slides, votes = slides[allowed[slides]], votes[allowed[slides]]
            if len(slides) >= wanted or tile_k + excluded_rows >= n_rows:
                break
            tile_k *= 4
        if self.max_candidates and len(slides) > self.max_candidates:
            keep = np.lexsort((slides, -votes))[: self.max_candidates]  # most hits first, then slide order
            slides = np.sort(slides[keep])
        return slides, tile_k

    def hits(
        self, query: np.ndarray, ranked: list[tuple[int, float]], mode: str, query_xy: np.ndarray | None
    ) -> list[SlideHit]:
        """Ranked (slide, distance) pairs as SlideHits with their best-matching tile pairs."""
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
                for qi, ti, d in best_matches(query, base[rows], self.n_matches)
            ]
            out.append(SlideHit(cat.slide_ids[slide], cat.labels[slide], distance, matches))
        return out

    def search(
        self,
        name: str,
        query: np.ndarray,
        mode: str = "barcode",
        k: int = 5,
        allowed: np.ndarray | None = None,
        query_xy: np.ndarray | None = None,
    ) -> SearchResult:
        """Full slide query: ranking, tile matches and the majority-vote label of the top k."""
        ranked, info = self.rank(query, mode, k, allowed)
        hits = self.hits(query, ranked, mode, query_xy)
        return SearchResult(name, majority_vote([h.label for h in hits]), hits, info)
