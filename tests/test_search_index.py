"""FAISS float-index wrappers: exact flat search, calibrated IVF/IVF-PQ/HNSW recall, save/load, devices."""

from __future__ import annotations

import math

import numpy as np
import pytest

from histo.errors import HistoError, InputFileError
from search.index import (
    build_float_index,
    default_nlist,
    exact_knn,
    load_float_index,
    recall_at_k,
    resolve_faiss_device,
)


def clustered(n: int, d: int = 64, centres: int = 20, seed: int = 0) -> np.ndarray:
    """Vectors around random centres (structure as in slide features), float32."""
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((centres, d)) * 3
    return (c[rng.integers(0, centres, n)] + rng.standard_normal((n, d))).astype(np.float32)


def brute_force(q: np.ndarray, x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """float64 all-pairs Euclidean distances, sorted by (distance, id)."""
    d = np.sqrt(((q[:, None, :].astype(np.float64) - x[None, :, :]) ** 2).sum(-1))
    ids = np.array([np.lexsort((np.arange(len(x)), row))[:k] for row in d])
    return np.take_along_axis(d, ids, 1), ids


def test_exact_knn_and_flat_equal_brute_force() -> None:
    x = clustered(500, seed=1)
    q = clustered(7, seed=2)
    want_d, want_i = brute_force(q, x, 10)
    d, i = exact_knn(q, x, 10)
    np.testing.assert_array_equal(i, want_i)
    np.testing.assert_allclose(d, want_d, rtol=1e-4)
    flat = build_float_index(x, "flat")
    d, i = flat.search(q, 10)
    np.testing.assert_array_equal(i, want_i)
    np.testing.assert_allclose(d, want_d, rtol=1e-4)
    assert flat.device == "cpu" and flat.device_info() == {"device": "cpu"}


def test_exact_knn_blocks_merge_correctly(monkeypatch: pytest.MonkeyPatch) -> None:
    import search.index as index_module

    x = clustered(300, seed=3)
    q = clustered(4, seed=4)
    want_d, want_i = brute_force(q, x, 6)
    monkeypatch.setattr(index_module, "KNN_BLOCK_ELEMENTS", 4 * 25)  # 25 base rows per block
    d, i = exact_knn(q, x, 6)
    np.testing.assert_array_equal(i, want_i)
    np.testing.assert_allclose(d, want_d, rtol=1e-4)


def test_default_nlist_follows_guideline() -> None:
    n = 1_000_000
    assert 4 * math.sqrt(n) <= default_nlist(n) <= 16 * math.sqrt(n)
    assert default_nlist(100) == 2  # capped: >= 39 training points per list
    assert default_nlist(10) == 1


@pytest.mark.parametrize("kind", ["ivf", "ivfpq", "hnsw"])
def test_approximate_indexes_reach_recall_target(kind: str) -> None:
    both = clustered(4050, seed=5)
    x, q = both[:4000], both[4000:]  # q: unseen queries from the same distribution
    index = build_float_index(x, kind, {"calibration_queries": 100, "pq_m": 16})
    p = index.params
    assert p["calibration_reached_target"] and p["calibrated_recall_at_10"] >= 0.95
    _, truth = brute_force(q, x, 10)
    d, found = index.search(q, 10)
    assert recall_at_k(found, truth) >= 0.9
    if kind != "hnsw":
        assert p["nlist"] == default_nlist(len(x)) and p["nprobe"] >= 1
    if kind == "ivfpq":  # re-ranked distances are exact distances to the returned ids
        exact = np.sqrt(((x[found[0]].astype(np.float64) - q[0]) ** 2).sum(1))
        np.testing.assert_allclose(d[0], exact, rtol=1e-4)


def test_ivf_with_too_small_nprobe_records_missed_target() -> None:
    x = clustered(4000, seed=7, centres=200)
    index = build_float_index(x, "ivf", {"nprobe": 1, "calibration_queries": 100, "recall_target": 0.999})
    assert index.params["nprobe"] == 1
    assert not index.params["calibration_reached_target"]


def test_save_load_roundtrip_and_corrupt_file(tmp_path) -> None:
    x = clustered(1000, seed=8)
    q = clustered(5, seed=9)
    for kind in ("flat", "ivf"):
        index = build_float_index(x, kind, {"calibration_queries": 50})
        index.save(tmp_path / f"{kind}.faiss")
        again = load_float_index(tmp_path / f"{kind}.faiss", kind, index.params)
        np.testing.assert_array_equal(again.search(q, 5)[1], index.search(q, 5)[1])
    bad = tmp_path / "bad.faiss"
    bad.write_bytes((tmp_path / "flat.faiss").read_bytes()[:100])
    with pytest.raises(InputFileError, match=r"bad\.faiss: not a readable FAISS index"):
        load_float_index(bad, "flat", {})


def test_device_resolution_never_silent() -> None:
    import faiss

    assert resolve_faiss_device("cpu", "flat") == "cpu"
    if faiss.get_num_gpus() == 0:
        assert resolve_faiss_device("auto", "flat") == "cpu"
        with pytest.raises(HistoError, match="no GPU"):
            resolve_faiss_device("cuda", "flat")
    with pytest.raises(HistoError, match="unknown index type"):
        build_float_index(clustered(10), "lsh")


def test_ivf_training_sample_follows_train_points_per_list(monkeypatch) -> None:
    import search.index as index_module
    from search.barcodes import build_binary_index, minmax_barcode

    x = clustered(4000, seed=9)
    asked = []
    real = index_module.sample_rows
    monkeypatch.setattr(index_module, "sample_rows", lambda v, n, seed: asked.append(n) or real(v, n, seed))
    params = {"train_points_per_list": 40, "calibration_queries": 50}
    built = build_float_index(x, "ivf", params)
    _, binary_params = build_binary_index(minmax_barcode(x), "ivf", params)
    assert asked == [built.params["nlist"] * 40, binary_params["nlist"] * 40]
    with pytest.raises(
        HistoError, match=r"params\.train_points_per_list: .* greater than or equal to 39, got 20"
    ):
        build_float_index(x, "ivf", {"train_points_per_list": 20})
