"""MinMax barcodes, Hamming distances and the slide distance against pure-Python / float64 references."""

from __future__ import annotations

import statistics

import numpy as np
import pytest

from search.barcodes import (
    build_binary_index,
    code_bits,
    hamming_matrix,
    hamming_recall,
    minmax_barcode,
    stored_codes,
)
from search.distance import best_matches, nearest_slides, slide_distance, slide_distances, tile_distances


def ref_barcode_bits(f: list[float]) -> list[int]:
    """Bit i = 1 if f[i+1] < f[i], padded with zeros to a multiple of 8 (the published definition)."""
    bits = [1 if f[i + 1] < f[i] else 0 for i in range(len(f) - 1)]
    return bits + [0] * (-len(bits) % 8)


def ref_unpack(code: np.ndarray) -> list[int]:
    """Little-endian bit order: bit i lives in byte i // 8 with value 1 << (i % 8)."""
    return [(int(code[i // 8]) >> (i % 8)) & 1 for i in range(8 * len(code))]


def ref_hamming(a: np.ndarray, b: np.ndarray) -> int:
    return sum(bin(int(x) ^ int(y)).count("1") for x, y in zip(a, b, strict=True))


def test_barcode_matches_definition_1024d() -> None:
    rng = np.random.default_rng(0)
    f = rng.standard_normal((5, 1024)).astype(np.float32)
    f[0, 10] = f[0, 11]  # equal neighbours give bit 0
    codes = minmax_barcode(f)
    assert codes.dtype == np.uint8 and codes.shape == (5, 128) and code_bits(1024) == 1024
    for row, code in zip(f, codes, strict=True):
        assert ref_unpack(code) == ref_barcode_bits(row.tolist())
    assert ref_unpack(codes[0])[10] == 0 and ref_unpack(codes[0])[1023] == 0


def test_barcode_odd_dimension_is_padded() -> None:
    f = np.random.default_rng(1).standard_normal((3, 21))
    codes = minmax_barcode(f)
    assert codes.shape == (3, 3)  # 20 bits -> 24
    assert ref_unpack(codes[1]) == ref_barcode_bits(f[1].tolist())


def test_hamming_matrix_against_python_popcount() -> None:
    rng = np.random.default_rng(2)
    a = rng.integers(0, 256, (7, 128), dtype=np.uint8)
    b = rng.integers(0, 256, (11, 128), dtype=np.uint8)
    got = hamming_matrix(a, b)
    want = np.array([[ref_hamming(x, y) for y in b] for x in a])
    np.testing.assert_array_equal(got, want)


def ref_slide_distance(q: np.ndarray, c: np.ndarray) -> float:
    """Pure-Python loops: median over query tiles of the min distance (Hamming or float64 Euclidean)."""
    minima = []
    for x in q:
        if q.dtype == np.uint8:
            minima.append(min(ref_hamming(x, y) for y in c))
        else:
            minima.append(min(float(np.sqrt(((x.astype(np.float64) - y) ** 2).sum())) for y in c))
    return statistics.median(minima)


@pytest.mark.parametrize("n_query", [6, 7])  # even and odd medians
def test_slide_distance_hamming_and_float(n_query: int) -> None:
    rng = np.random.default_rng(3)
    qf = rng.standard_normal((n_query, 64)).astype(np.float32)
    cf = rng.standard_normal((9, 64)).astype(np.float32)
    qc, cc = minmax_barcode(qf), minmax_barcode(cf)
    assert slide_distance(qc, cc) == ref_slide_distance(qc, cc)
    assert slide_distance(qf, cf) == pytest.approx(ref_slide_distance(qf, cf), rel=1e-5)
    assert slide_distance(qc, cc) != slide_distance(cc, qc[:5])  # asymmetric in general


def test_slide_distances_vectorised_equals_per_slide(monkeypatch: pytest.MonkeyPatch) -> None:
    import search.distance as distance

    monkeypatch.setattr(distance, "BLOCK_ELEMENTS", 50)  # force many blocks
    rng = np.random.default_rng(4)
    sizes = [3, 1, 5, 2, 4]
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    base_f = rng.standard_normal((offsets[-1], 32)).astype(np.float32)
    query_f = rng.standard_normal((4, 32)).astype(np.float32)
    for query, base in ((query_f, base_f), (minmax_barcode(query_f), minmax_barcode(base_f))):
        want = [ref_slide_distance(query, base[offsets[s] : offsets[s + 1]]) for s in range(len(sizes))]
        np.testing.assert_allclose(slide_distances(query, base, offsets), want, rtol=1e-5)
        for picked in (np.array([4, 0, 2]), np.array([1, 2, 4, 3, 3, 0])):  # gathers: gaps, runs, repeats
            np.testing.assert_allclose(
                slide_distances(query, base, offsets, picked), np.take(want, picked), rtol=1e-5
            )


def _clustered(rng: np.random.Generator, n_slides: int, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """Float tiles of slides around a few class centres (so some slides are far and get pruned)."""
    sizes = rng.integers(1, 9, n_slides)
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    centres = 3 * rng.standard_normal((4, dim))[rng.integers(0, 4, n_slides)]
    base = (np.repeat(centres, sizes, axis=0) + rng.standard_normal((offsets[-1], dim))).astype(np.float32)
    return base, offsets


@pytest.mark.parametrize("n_query", [1, 2, 5, 8])
def test_nearest_slides_is_the_top_k_of_every_slide_distance(monkeypatch, n_query: int) -> None:
    """The pruned ranking equals ranking the per-slide loop reference over every candidate (ties to the
    lower tie rank), in both modes, with candidates in any order, k above and below their number; and from
    3 query tiles on (a median of 1 or 2 needs every tile) it prunes: fewer slides measured on every tile."""
    import search.distance as distance

    monkeypatch.setattr(distance, "PRUNE_CHUNK", 3)
    rng = np.random.default_rng(n_query)
    base_f, offsets = _clustered(rng, 60, 16)
    query_f = (base_f[offsets[7] : offsets[8]].mean(0) + rng.standard_normal((n_query, 16))).astype(
        np.float32
    )
    measured = []
    for query, base in ((query_f, base_f), (minmax_barcode(query_f), minmax_barcode(base_f))):
        want = np.array([ref_slide_distance(query, base[offsets[s] : offsets[s + 1]]) for s in range(60)])
        tie_rank = rng.permutation(60)
        for candidates in (np.arange(60), rng.permutation(60)[:41]):
            for k in (1, 5, 70):
                ref = candidates[np.lexsort((tie_rank[candidates], want[candidates]))][:k]
                top, dist, n = nearest_slides(query, base, offsets, candidates, k, tie_rank)
                assert list(top) == list(ref)
                np.testing.assert_allclose(dist, want[ref], rtol=1e-6)
                measured.append(n / len(candidates))
    assert min(measured) == 1.0 if n_query <= 2 else min(measured) < 0.5


def test_nearest_slides_keeps_ties_at_the_kth_distance() -> None:
    """Slides exactly as far as the k-th are measured, not pruned: the tie goes to the lower tie rank."""
    rng = np.random.default_rng(3)
    query = rng.integers(0, 256, (4, 4), dtype=np.uint8)
    copies = np.concatenate([query[:1]] * 10)  # ten one-tile slides, all the same distance
    base = np.concatenate([copies ^ 1, rng.integers(0, 256, (5, 4), dtype=np.uint8)])
    offsets = np.arange(len(base) + 1)
    tie_rank = np.arange(len(base))[::-1].copy()  # the last copy wins every tie
    top, _, _ = nearest_slides(query, base, offsets, np.arange(len(base)), 2, tie_rank)
    assert list(top) == [9, 8]


@pytest.mark.parametrize("n_query", [4, 5, 6, 7])
def test_nearest_slides_keeps_a_slide_whose_median_is_below_the_kth(n_query: int) -> None:
    """A slide far from all but just over half of the query tiles is still the nearest: fewer than
    n // 2 + 1 tiles farther than the k-th distance never prune it, wherever those tiles are. Query tiles
    sit at (0, 0) or (60, 0); slide A at (0, 0), slide B (measured first) at (30, 20), 36.1 from both: A's
    median is 0 for odd n and 30 for even n (n / 2 tiles at 60), below B's."""
    from itertools import combinations

    far = n_query // 2  # query tiles 60 from A: one short of proving its median farther than B's 36.1
    base = np.array([[30.0, 20.0], [0.0, 0.0]], dtype=np.float32)
    for placed in combinations(range(n_query), far):
        query = np.zeros((n_query, 2), dtype=np.float32)
        query[list(placed), 0] = 60.0
        top, _, _ = nearest_slides(query, base, np.array([0, 1, 2]), np.array([0, 1]), 1, np.arange(2))
        assert list(top) == [1], placed


def test_nearest_slides_with_near_duplicate_float_tiles_agrees_up_to_rounding(monkeypatch) -> None:
    """Float features with copies of the query slide indexed (distances at the rounding level, about 1e-5):
    the returned slides are a top k of the reference ranking up to rounding (any swap is between slides
    within the rounding bound of the k-th), with their distances within that bound; k=0 returns nothing."""
    import search.distance as distance

    monkeypatch.setattr(distance, "PRUNE_CHUNK", 1)
    rng = np.random.default_rng(2)
    for _ in range(60):
        sizes = rng.integers(1, 30, int(rng.integers(8, 80)))
        offsets = np.concatenate([[0], np.cumsum(sizes)])
        base = (rng.normal(size=(offsets[-1], 64)) * 30 + 100).astype(np.float32)
        query = base[: offsets[1]].copy()
        for s in rng.integers(0, len(sizes), 5):  # copies of the query's tiles in other slides
            m = min(len(query), sizes[s])
            base[offsets[s] : offsets[s] + m] = query[:m]
        candidates, tie_rank, k = (
            rng.permutation(len(sizes)),
            rng.permutation(len(sizes)),
            int(rng.integers(1, 8)),
        )
        want = dict(zip(candidates, slide_distances(query, base, offsets, candidates), strict=True))
        kth = sorted(want.values())[min(k, len(want)) - 1]
        top, dist, _ = nearest_slides(query, base, offsets, candidates, k, tie_rank)
        tol = distance._rounding(64, *(distance._largest_square(x) for x in (query, base)))
        assert len(top) == min(k, len(candidates)) and len(set(top)) == len(top)
        assert all(abs(d - want[s]) <= tol and want[s] <= kth + tol for s, d in zip(top, dist, strict=True))
        assert {s for s, d in want.items() if d < kth - tol} <= set(top)
    assert len(nearest_slides(query, base, offsets, candidates, 0, tie_rank)[0]) == 0


def test_nearest_slides_holds_at_most_block_elements_distances(monkeypatch) -> None:
    """Like slide_distances, the pruned ranking never builds a distance matrix above BLOCK_ELEMENTS pairs
    (but one slide's): chunks of slides are cut to that budget."""
    import search.distance as distance

    shapes: list[tuple[int, int]] = []
    measure = distance.tile_distances

    def recorded(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        shapes.append((len(a), len(b)))
        return measure(a, b)

    monkeypatch.setattr(distance, "tile_distances", recorded)
    monkeypatch.setattr(distance, "BLOCK_ELEMENTS", 40 * 20)
    rng = np.random.default_rng(6)
    sizes = rng.integers(1, 12, 50)
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    base = minmax_barcode(rng.standard_normal((offsets[-1], 32)).astype(np.float32))
    query = minmax_barcode(rng.standard_normal((40, 32)).astype(np.float32))
    nearest_slides(query, base, offsets, np.arange(50), 3, np.arange(50))
    assert shapes and max(a * b for a, b in shapes) <= 40 * max(20, int(sizes.max()))


def test_best_matches_pairs_each_query_tile_with_its_nearest() -> None:
    rng = np.random.default_rng(5)
    q, c = rng.standard_normal((5, 8)), rng.standard_normal((6, 8))
    d = tile_distances(q, c)
    pairs = best_matches(q, c, 3)
    assert [p[2] for p in pairs] == sorted(d.min(1))[:3]
    assert all(d[i, j] == pytest.approx(dist) and j == d[i].argmin() for i, j, dist in pairs)


def test_binary_flat_index_is_exact_knn() -> None:
    rng = np.random.default_rng(6)
    codes = minmax_barcode(rng.standard_normal((300, 1024)).astype(np.float32))
    index, params = build_binary_index(codes, "flat")
    assert params == {"kind": "flat"}
    np.testing.assert_array_equal(stored_codes(index), codes)
    dist, ids = index.search(codes[:5], 4)
    full = np.array([[ref_hamming(x, y) for y in codes] for x in codes[:5]])
    np.testing.assert_array_equal(dist, np.sort(full, axis=1)[:, :4])
    assert (ids[:, 0] == np.arange(5)).all()


def test_barcode_storage_is_128_bytes_per_tile() -> None:
    codes = minmax_barcode(np.zeros((100, 1024), dtype=np.float32))
    assert codes.nbytes == 100 * 128 <= 16 * 1024


def test_binary_ivf_calibrated_on_held_out_slides() -> None:
    rng = np.random.default_rng(7)
    centres = rng.standard_normal((40, 256))
    slide = np.repeat(np.arange(40), 50)  # 40 slides x 50 tiles
    feats = centres[slide] + 0.7 * rng.standard_normal((2000, 256))
    codes = minmax_barcode(feats)
    index, params = build_binary_index(codes, "ivf", {"calibration_queries": 200}, groups=slide)
    assert params["kind"] == "ivf" and params["calibration_reached_target"]
    assert params["calibrated_recall_at_10"] >= 0.95 and 1 <= params["nprobe"] <= params["nlist"]
    np.testing.assert_array_equal(stored_codes(index), codes)  # ids are row numbers
    fresh = minmax_barcode(centres[:5] + 0.7 * rng.standard_normal((5, 256)))
    exact, _ = build_binary_index(codes, "flat")
    assert hamming_recall(index.search(fresh, 10)[0], exact.search(fresh, 10)[0]) >= 0.8


def test_hamming_recall_counts_ties() -> None:
    truth = np.array([[1, 2, 2]])
    assert hamming_recall(np.array([[1, 2, 2]]), truth) == 1.0
    assert hamming_recall(np.array([[2, 2, 3]]), truth) == pytest.approx(2 / 3)
