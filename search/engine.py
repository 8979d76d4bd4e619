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
            "search": dict(self.info),
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
    """Two-stage search over a catalog; `knn[mode](queries, k) -> (distances, rows)`, `tiles[mode]` arrays.

    The first stage asks every query tile for its `tile_k` nearest tiles. That table bounds every slide's
    distance from below: a tile not returned to query tile i is at least as far as i's last neighbour r_i,
    so a slide never hit is at distance >= median(r), and a hit slide at >= the median of its per-tile
    minima with r_i standing in for misses. Exact slide distances are then computed best bound first until
    no bound is below the k-th best distance. When the bound of the slides never hit is above it too, the
    top k is *certified* equal to the exhaustive one (exactly so for an exact kNN; for IVF, up to the
    index's recall); otherwise tile_k grows 4x (up to `widen` times) and the search falls back to
    exhaustive when the bound is still not met.
    """

    catalog: Catalog
    knn: dict[str, Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]]]
    tiles: dict[str, Callable[[], np.ndarray]]  # mode -> all rows' codes (uint8) or features (float32)
    tile_k: int | None = None  # neighbours per query tile; None: default_tile_k(catalog)
    n_matches: int = 5
    widen: int = 2  # times tile_k may grow 4x before falling back to exhaustive search

    def rank(
        self,
        query: np.ndarray,
        mode: str = "barcode",
        k: int = 5,
        allowed: np.ndarray | None = None,
        exhaustive: bool = False,
    ) -> tuple[list[tuple[int, float]], dict[str, Any]]:
        """Top-k (slide, distance) for a query slide's codes/features, equal to the exhaustive ranking."""
        if mode not in MODES:
            raise ValueError(f"unknown search mode {mode!r} (barcode, float)")
        base = self.tiles[mode]()
        cat = self.catalog
        everything = np.arange(len(cat)) if allowed is None else np.flatnonzero(allowed)
        excluded_rows = 0 if allowed is None else int(np.diff(cat.offsets)[~allowed].sum())
        info: dict[str, Any] = {"mode": mode, "tile_k": 0, "strategy": "exhaustive"}
        if not exhaustive and excluded_rows * 2 < len(cat.row_slide) and len(everything) > k:
            found = self._two_stage(query, mode, k, allowed, excluded_rows)
            info.update(found[1])
            if found[0] is not None:
                return found[0], info
            info["strategy"] = "exhaustive (bound not met)"
        distances = slide_distances(query, base, cat.offsets, everything)
        info["exact"] = len(everything)
        return _top(everything, distances, k), info

    def _two_stage(
        self, query: np.ndarray, mode: str, k: int, allowed: np.ndarray | None, excluded_rows: int
    ) -> tuple[list[tuple[int, float]] | None, dict[str, Any]]:
        """Certified top-k from the per-tile kNN bounds, or None when `widen` rounds do not certify it."""
        n_rows = len(self.catalog.row_slide)
        tile_k = self.tile_k or default_tile_k(self.catalog)
        known: dict[int, float] = {}  # exact slide distances computed so far (kept across widening)
        for _ in range(self.widen + 1):
            asked = min(n_rows, tile_k + excluded_rows)
            dist, rows = self.knn[mode](query, asked)
            slides, bounds, rest = slide_bounds(dist, rows, self.catalog.row_slide, allowed)
            if mode == "float":  # FAISS float32 distances vs float64 exact ones: loosen the bounds a little
                bounds, rest = bounds - 1e-4 * (1 + bounds), rest - 1e-4 * (1 + rest)
            kth = self._exact_by_bound(query, mode, k, slides, bounds, known)
            info = {"strategy": "two-stage", "tile_k": tile_k, "hit_slides": len(slides), "exact": len(known)}
            if len(known) >= k and (rest > kth or asked == n_rows):
                ids = np.fromiter(known, dtype=np.int64, count=len(known))
                return _top(ids, np.array([known[int(s)] for s in ids]), k), info
            tile_k *= 4
        return None, info

    def _exact_by_bound(
        self, query: np.ndarray, mode: str, k: int, slides: np.ndarray, bounds: np.ndarray, known: dict
    ) -> float:
        """Exact distances of hit slides in order of their bounds until no bound is below the k-th best."""
        base, offsets = self.tiles[mode](), self.catalog.offsets
        order = np.argsort(bounds, kind="stable")
        kth, start = np.inf, 0
        while start < len(order) and bounds[order[start]] <= kth:
            batch = [int(s) for s in slides[order[start : start + max(k, 16)]] if int(s) not in known]
            if batch:
                known.update(
                    zip(batch, slide_distances(query, base, offsets, np.array(batch)).tolist(), strict=True)
                )
            start += max(k, 16)
            kth = (
                np.partition(np.fromiter(known.values(), float), k - 1)[k - 1] if len(known) >= k else np.inf
            )
        return float(kth)

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


def default_tile_k(catalog: Catalog) -> int:
    """First-stage neighbours per query tile: 1.5x the mean tiles per slide (at least 10).

    A query's own near-duplicate slide (another slide of the patient) can fill as many neighbours as it has
    tiles; asking for more lets the next slides in, which is what makes the lower bound certify a top k.
    """
    return max(10, int(np.ceil(1.5 * len(catalog.row_slide) / max(1, len(catalog)))))


def slide_bounds(
    dist: np.ndarray, rows: np.ndarray, row_slide: np.ndarray, allowed: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray, float]:
    """Hit slides, a lower bound of each one's slide distance, and the bound of every slide not hit.

    r_i (the distance of query tile i's last returned neighbour) bounds every tile not returned to i; a
    hit slide's per-tile minimum is its closest returned tile or r_i, and the median of lower bounds is a
    lower bound of the median.
    """
    valid = rows >= 0
    r = np.where(valid.any(axis=1), np.max(np.where(valid, dist, -np.inf), axis=1), 0.0).astype(np.float64)
    slide_of = row_slide[np.where(valid, rows, 0)]
    keep = valid if allowed is None else valid & allowed[slide_of]
    slides, column = np.unique(slide_of[keep], return_inverse=True)
    per_tile = np.repeat(r[:, None], len(slides), axis=1)
    np.minimum.at(per_tile, (np.nonzero(keep)[0], column), dist[keep].astype(np.float64))
    return slides, np.median(per_tile, axis=0), float(np.median(r))


def _top(slides: np.ndarray, distances: np.ndarray, k: int) -> list[tuple[int, float]]:
    """The k closest (slide, distance) pairs; ties go to the lower slide number."""
    order = np.lexsort((slides, distances))[:k]
    return [(int(slides[i]), float(distances[i])) for i in order]
