"""Slide-to-slide distance ("bunch of barcodes"): median over query tiles of the minimum tile distance.

For every tile of the query slide take the minimum distance to any tile of the candidate slide; the slide
distance is the median of these minima (REFERENCE.md §3). It is asymmetric. Tiles are packed MinMax
barcodes (uint8, Hamming distance) or float features (float, Euclidean distance).
"""

from __future__ import annotations

import numpy as np

from search.barcodes import hamming_matrix

BLOCK_ELEMENTS = 1 << 24  # bound on query-tiles x candidate-tiles distances held at once


def tile_distances(query: np.ndarray, candidate: np.ndarray) -> np.ndarray:
    """Distance matrix (Nq, Nc): Hamming for uint8 codes, Euclidean for float features."""
    if query.dtype == np.uint8 and candidate.dtype == np.uint8:
        return hamming_matrix(query, candidate)
    if query.dtype == np.uint8 or candidate.dtype == np.uint8:
        raise TypeError("cannot mix packed barcodes (uint8) and float features")
    # float64: the |q|^2 + |c|^2 - 2 q.c form cancels badly in float32 for near-identical tiles
    q = np.asarray(query, dtype=np.float64)
    c = np.asarray(candidate, dtype=np.float64)
    d2 = np.einsum("ij,ij->i", q, q)[:, None] + np.einsum("ij,ij->i", c, c)[None, :] - 2.0 * (q @ c.T)
    return np.sqrt(np.maximum(d2, 0.0))


def slide_distance(query_codes: np.ndarray, candidate_codes: np.ndarray) -> float:
    """Median over query tiles of the min distance to the candidate slide's tiles (asymmetric)."""
    if len(query_codes) == 0 or len(candidate_codes) == 0:
        raise ValueError("slide distance needs at least one tile on each side")
    return float(np.median(tile_distances(query_codes, candidate_codes).min(axis=1)))


def slide_distances(
    query: np.ndarray, base: np.ndarray, offsets: np.ndarray, slides: np.ndarray | None = None
) -> np.ndarray:
    """Slide distances (float64, one per slide) from `query` to slides whose tiles are base[offsets[s]:offsets[s+1]].
    `slides=None` means every slide."""
    offsets = np.asarray(offsets, dtype=np.int64)
    slides = np.arange(len(offsets) - 1) if slides is None else np.asarray(slides, dtype=np.int64)
    return np.median(segment_minima(query, base, offsets, slides), axis=0)


def segment_minima(
    query: np.ndarray, base: np.ndarray, offsets: np.ndarray, slides: np.ndarray
) -> np.ndarray:
    """(query tiles, slides): each query tile's minimum distance to each slide's tiles.

    Vectorised: slides are processed in blocks of about BLOCK_ELEMENTS tile pairs, with one distance
    matrix and a segmented minimum (np.minimum.reduceat) per block.
    """
    sizes = offsets[slides + 1] - offsets[slides]
    if len(query) == 0 or (sizes <= 0).any():
        raise ValueError("slide distance needs at least one tile on each side")
    out = np.empty((len(query), len(slides)), dtype=np.float64)
    budget = max(1, BLOCK_ELEMENTS // len(query))
    start = 0
    while start < len(slides):
        stop, rows = start + 1, sizes[start]
        while stop < len(slides) and rows + sizes[stop] <= budget:
            rows += sizes[stop]
            stop += 1
        tiles, seg_starts = gathered(base, offsets, slides[start:stop])
        out[:, start:stop] = np.minimum.reduceat(tile_distances(query, tiles), seg_starts, axis=1)
        start = stop
    return out


def gathered(base: np.ndarray, offsets: np.ndarray, slides: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The tiles of `slides`, slide after slide, and where each slide's tiles start."""
    sizes = offsets[slides + 1] - offsets[slides]
    seg_starts = _starts(sizes)
    if (np.diff(slides) == 1).all():  # consecutive slides: one contiguous slice, no gather
        return base[offsets[slides[0]] : offsets[slides[-1] + 1]], seg_starts
    # every row's base row at once (a Python range per slide cost 0.4 ms at 470 slides)
    return base[np.arange(int(sizes.sum())) + np.repeat(offsets[slides] - seg_starts, sizes)], seg_starts


PRUNE_CHUNK = 32  # slides measured per step of `nearest_slides` (the k-th distance is updated between steps)


def nearest_slides(
    query: np.ndarray, base: np.ndarray, offsets: np.ndarray, slides: np.ndarray, k: int, tie_rank: np.ndarray
) -> tuple[np.ndarray, np.ndarray, int]:
    """The k of `slides` nearest the query by slide distance (nearest first, ties to the lower `tie_rank`),
    their distances, and how many slides were measured on every query tile: the top k of `slide_distances`
    over all of them for less work (branch and bound on the median). Exact for barcodes; for float features
    up to float64 rounding, as before: a matrix product's rounding depends on the candidates it holds
    together, so the distances of near-duplicate tiles (about 1e-5 at norms of 800) and the order of slides
    that close to each other already varied with the candidate set.

    Slides are measured in the order given (likely near ones first), in chunks of at most PRUNE_CHUNK
    slides and BLOCK_ELEMENTS tile pairs; once k are measured, each chunk first goes through `_pruned`
    against the current k-th distance.
    """
    offsets = np.asarray(offsets, dtype=np.int64)
    slides = np.asarray(slides, dtype=np.int64)
    sizes = offsets[slides + 1] - offsets[slides]
    if len(query) == 0 or (sizes <= 0).any():
        raise ValueError("slide distance needs at least one tile on each side")
    if k <= 0:
        return slides[:0], np.empty(0), 0
    kept, dist = [slides[:k]], [slide_distances(query, base, offsets, slides[:k])]
    float_tiles = query.dtype != np.uint8
    largest = (
        _largest_square(query),
        _largest_square(gathered(base, offsets, slides[:k])[0]) if float_tiles else 0.0,
    )
    budget = max(1, BLOCK_ELEMENTS // len(query))
    start = k
    while start < len(slides):
        stop = start + 1
        while stop < min(len(slides), start + PRUNE_CHUNK) and sizes[start : stop + 1].sum() <= budget:
            stop += 1
        bound = np.partition(np.concatenate(dist), k - 1)[k - 1]
        chunk, tiles, chunk_sizes, largest = _pruned(
            query, base, offsets, slides[start:stop], sizes[start:stop], bound, largest
        )
        if len(chunk):
            minima = np.minimum.reduceat(tile_distances(query, tiles), _starts(chunk_sizes), axis=1)
            kept.append(chunk)
            dist.append(np.median(minima, axis=0))
        start = stop
    kept_all, dist_all = np.concatenate(kept), np.concatenate(dist)
    best = np.lexsort((tie_rank[kept_all], dist_all))[:k]
    return kept_all[best], dist_all[best], len(kept_all)


def _largest_square(tiles: np.ndarray) -> float:
    """The largest squared norm of float tiles (0 for packed barcodes)."""
    if tiles.dtype == np.uint8 or not len(tiles):
        return 0.0
    x = np.asarray(tiles, dtype=np.float64)
    return float(np.einsum("ij,ij->i", x, x).max())


def _rounding(dim: int, query_square: float, tile_square: float) -> float:
    """A bound on how far one float tile distance can come out between two matrix products (0 for Hamming):
    |q|^2 + |c|^2 - 2 q.c in float64 errs by at most about D * eps * (|q|^2 + |c|^2), and a square root
    moves by at most the square root of that (near-duplicate tiles: about 1e-5 at norms of 800)."""
    return float(np.sqrt(4 * dim * np.finfo(np.float64).eps * (query_square + tile_square)))


def _pruned(
    query: np.ndarray,
    base: np.ndarray,
    offsets: np.ndarray,
    chunk: np.ndarray,
    sizes: np.ndarray,
    bound: float,
    largest: tuple[float, float],
) -> tuple[np.ndarray, np.ndarray, np.ndarray, tuple[float, float]]:
    """The slides of `chunk` (of `sizes` tiles) whose median may not exceed `bound`, their tiles and tile
    counts, and the
    largest squared norms (query, tiles seen) updated with the chunk's (for the float rounding slack).

    Query-tile minima are computed on growing subsets of the query tiles (51 %, 60 %, 75 %; for float
    features 60 % only, their tiles cost a memory pass per subset); a slide more than half of all of whose
    query tiles are farther than `bound` has a median farther than it, and is dropped.
    """
    n = len(query)
    need = n // 2 + 1
    if query.dtype == np.uint8:
        phases = sorted({need, need + (n - need) // 5, need + (n - need) // 2})
    else:
        phases = [need + (n - need) // 5]
    order = np.random.default_rng(0).permutation(n)  # spread subsets (query tiles come in scan order)
    tiles, _ = gathered(base, offsets, chunk)  # once: float rows are 4 KB each
    if tiles.dtype != np.uint8:
        tiles = tiles.astype(np.float64)  # converted once, not once per subset of query tiles
        largest = (largest[0], max(largest[1], _largest_square(tiles)))
        # a bound and a minimum computed in different matrices differ by up to twice the rounding
        bound += 4 * _rounding(query.shape[1], *largest)
    farther = np.zeros(len(chunk), dtype=np.int64)
    done = 0
    for end in phases if n > need else ():
        minima = np.minimum.reduceat(tile_distances(query[order[done:end]], tiles), _starts(sizes), axis=1)
        farther += (minima > bound).sum(axis=0)
        keep, done = farther < need, end
        if not keep.all():
            tiles, chunk, farther, sizes = (
                tiles[np.repeat(keep, sizes)],
                chunk[keep],
                farther[keep],
                sizes[keep],
            )
        if not len(chunk):
            break
    return chunk, tiles, sizes, largest


def _starts(sizes: np.ndarray) -> np.ndarray:
    """Where each segment of `sizes` rows starts."""
    return np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)


def best_matches(query: np.ndarray, candidate: np.ndarray, n: int) -> list[tuple[int, int, float]]:
    """The n closest (query tile, candidate tile, distance) pairs: each query tile with its nearest tile."""
    dist = tile_distances(query, candidate)
    nearest = dist.argmin(axis=1)
    minima = dist[np.arange(len(query)), nearest]
    order = np.lexsort((np.arange(len(query)), minima))[:n]
    return [(int(i), int(nearest[i]), float(minima[i])) for i in order]
