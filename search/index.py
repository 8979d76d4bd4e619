"""FAISS float-feature indexes (flat, ivf, ivfpq, hnsw), their parameter choice, calibration and devices.

Metric: Euclidean (L2) distance between float features. FAISS works with squared L2 internally; every
distance returned here is its square root (a monotonic map, so rankings are unchanged).

- `flat`: exact. On CPU the search is a blocked GEMM over the index's own vectors with cached norms
  (measured faster here than FAISS's bundled BLAS; scripts/bench_search.py); on GPU, FAISS GpuIndexFlatL2.
- `ivf`: IVF-Flat; nlist from the FAISS guideline 4*sqrt(N) (range 4..16 sqrt(N)), capped so that every
  list gets >= 39 training points; nprobe calibrated at build time: the smallest power of two whose
  recall@10 against exact search reaches `recall_target`, measured with the tiles of seeded held-out
  slides as queries (withheld from the index while calibrating, as a query slide is never indexed;
  held-out single tiles of indexed slides overstate recall because their own slide's tiles sit in the
  same lists).
- `ivfpq`: IVF-PQ (m = D/16 sub-quantizers of `nbits` = 8, fewer for tiny N) returning `rerank * k` candidates that are re-ranked
  by exact distance on the stored float features; nprobe calibrated like `ivf`.
- `hnsw`: HNSW-Flat (CPU only: FAISS has no GPU HNSW); efSearch calibrated like nprobe.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args

import numpy as np

from histo.errors import HistoError, InputFileError
from search.config import MIN_POINTS_PER_LIST, IndexParams, IndexType, index_params

logger = logging.getLogger(__name__)

INDEX_TYPES = get_args(IndexType)
KNN_BLOCK_ELEMENTS = 1 << 25  # exact search: query x base distances held at once (128 MB of float32)


def default_nlist(n: int) -> int:
    """IVF list count from the FAISS guideline 4*sqrt(N), capped so each list has >= 39 training points."""
    return max(1, min(round(4 * math.sqrt(n)), n // MIN_POINTS_PER_LIST))


def resolve_faiss_device(device: str, kind: str) -> str:
    """'cpu' or 'gpu' for a FAISS index of `kind`; 'cuda' without GPUs (or for hnsw) is an error."""
    import faiss

    n_gpus = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    if device not in ("auto", "cpu", "cuda"):
        raise HistoError(f"unknown device {device!r} (auto, cpu, cuda)")
    if device == "cuda" and n_gpus == 0:
        raise HistoError("device cuda: FAISS sees no GPU (is faiss-gpu installed and a GPU visible?)")
    if device == "cuda" and kind == "hnsw":
        raise HistoError("device cuda: FAISS has no GPU HNSW index; use --device cpu or another --type")
    return "gpu" if device != "cpu" and n_gpus > 0 and kind != "hnsw" else "cpu"


def exact_knn(
    queries: np.ndarray, base: np.ndarray, k: int, base_sqnorms: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Exact k nearest rows of `base` by L2 (blocked GEMM); returns (Euclidean distances, row ids)."""
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    k = min(k, len(base))
    if base_sqnorms is None:
        base_sqnorms = np.einsum("ij,ij->i", base, base)
    neg2q = -2.0 * queries
    best_d = np.full((len(queries), 0), np.inf, dtype=np.float32)
    best_i = np.zeros((len(queries), 0), dtype=np.int64)
    step = max(k, KNN_BLOCK_ELEMENTS // max(1, len(queries)))
    for start in range(0, len(base), step):
        block = base[start : start + step]
        d2 = neg2q @ block.T  # |x|^2 - 2 q.x: the -2 folded into the queries, the norms added in place
        d2 += base_sqnorms[start : start + step][None, :]
        take = min(k, d2.shape[1])
        part = np.argpartition(d2, take - 1, axis=1)[:, :take]
        best_d = np.concatenate([best_d, np.take_along_axis(d2, part, 1)], axis=1)
        best_i = np.concatenate([best_i, part + start], axis=1)
        if best_d.shape[1] > k:
            keep = np.argpartition(best_d, k - 1, axis=1)[:, :k]
            best_d, best_i = np.take_along_axis(best_d, keep, 1), np.take_along_axis(best_i, keep, 1)
    # Recompute the k winners' distances from differences (no cancellation of large norms), then sort.
    diff = base[best_i] - queries[:, None, :]
    best_d = np.sqrt(np.einsum("qkd,qkd->qk", diff, diff)).astype(np.float32)
    order = np.lexsort((best_i, best_d), axis=1) if best_d.size else np.zeros_like(best_i)
    return np.take_along_axis(best_d, order, 1), np.take_along_axis(best_i, order, 1)


@dataclass
class FloatIndex:
    """A FAISS float index plus what its search needs: parameters, device, and the stored vectors."""

    kind: str
    index: Any  # the CPU faiss index (what is saved)
    params: dict[str, Any]
    device: str = "cpu"  # "cpu" or "gpu"; set by to_device
    vectors: Callable[[np.ndarray], np.ndarray] | None = None  # rows -> float32 features (ivfpq re-ranking)
    _search_index: Any = field(default=None, repr=False)
    _flat_cache: tuple[np.ndarray, np.ndarray] | None = field(default=None, repr=False)

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    def to_device(self, device: str = "auto") -> FloatIndex:
        """Move the search copy to all GPUs (replicas, or shards if params['gpu_shard']) or keep it on CPU."""
        import faiss

        self.device = resolve_faiss_device(device, self.kind)
        self._search_index = self.index
        if self.device == "gpu":
            options = faiss.GpuMultipleClonerOptions()
            options.shard = bool(self.params.get("gpu_shard", False))
            self._search_index = faiss.index_cpu_to_all_gpus(self.index, co=options)
        self._apply_search_params(self._search_index)
        return self

    def device_info(self) -> dict[str, Any]:
        """Which device the search runs on, recorded in the manifest and in results."""
        import faiss

        info: dict[str, Any] = {"device": self.device}
        if self.device == "gpu":
            info["gpus"] = faiss.get_num_gpus()
            info["multi_gpu"] = "shards" if self.params.get("gpu_shard") else "replicas"
        return info

    def _apply_search_params(self, index: Any) -> None:
        import faiss

        space = faiss.GpuParameterSpace() if self.device == "gpu" else faiss.ParameterSpace()
        if self.kind in ("ivf", "ivfpq") and self.params.get("nprobe"):
            space.set_index_parameter(index, "nprobe", int(self.params["nprobe"]))
        if self.kind == "hnsw" and self.params.get("ef_search"):
            space.set_index_parameter(index, "efSearch", int(self.params["ef_search"]))

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """k nearest indexed vectors of each query: (Euclidean distances (Q, k), ids (Q, k), -1 = none)."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        k = min(k, self.ntotal)
        if self._search_index is None:
            self.to_device("cpu")
        if self.kind == "flat" and self.device == "cpu":
            base, norms = self._flat_arrays()
            return exact_knn(queries, base, k, norms)
        if self.kind == "ivfpq":
            return self._search_reranked(queries, k)
        d2, ids = self._search_index.search(queries, k)
        return np.sqrt(np.maximum(d2, 0.0)), ids

    def stored_vectors(self) -> np.ndarray:
        """The vectors held by a flat index (a zero-copy view of FAISS's storage), row order = ids."""
        if self.kind != "flat":
            raise HistoError(f"a {self.kind} index does not hold its float vectors")
        return self._flat_arrays()[0]

    def _flat_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        import faiss

        if self._flat_cache is None:
            n, d = self.ntotal, self.index.d
            base = faiss.rev_swig_ptr(self.index.get_xb(), n * d).reshape(n, d) if n else np.zeros((0, d))
            self._flat_cache = (base, np.einsum("ij,ij->i", base, base))
        return self._flat_cache

    def _search_reranked(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        if self.vectors is None:
            raise HistoError("ivfpq search needs the stored float features for exact re-ranking")
        shortlist = min(self.ntotal, int(self.params["rerank"]) * k)
        _, cand = self._search_index.search(queries, shortlist)
        dists = np.full(cand.shape, np.inf, dtype=np.float32)
        for qi in range(len(queries)):
            valid = cand[qi] >= 0
            diff = self.vectors(cand[qi][valid]) - queries[qi]
            dists[qi, valid] = np.sqrt(np.einsum("ij,ij->i", diff, diff))
        order = np.lexsort((cand, dists), axis=1)[:, :k]
        ids = np.take_along_axis(cand, order, 1)
        return np.take_along_axis(dists, order, 1), np.where(
            np.isfinite(np.take_along_axis(dists, order, 1)), ids, -1
        )

    def save(self, path: str | Path) -> None:
        """Write the CPU index atomically with faiss.write_index."""
        import faiss

        from histo.io import atomic_path

        with atomic_path(path) as tmp:
            faiss.write_index(self.index, str(tmp))


def load_float_index(path: str | Path, kind: str, params: dict[str, Any]) -> FloatIndex:
    """Read a saved FAISS float index; an unreadable file is a one-line InputFileError."""
    import faiss

    try:
        index = faiss.read_index(str(path))
    except RuntimeError as e:
        raise InputFileError(path, f"not a readable FAISS index ({str(e).splitlines()[0][:120]})") from None
    return FloatIndex(kind=kind, index=index, params=dict(params))


def build_float_index(
    vectors: np.ndarray,
    kind: str,
    params: IndexParams | Mapping[str, Any] | None = None,
    groups: np.ndarray | None = None,
) -> FloatIndex:
    """Build (train + add) a CPU index of `kind` over float32 (N, D) vectors; calibrates nprobe/efSearch.

    `params`: IndexParams, None (the defaults) or a mapping over the defaults. The effective parameters
    (chosen and calibrated values included) are the returned index's `params` dict.

    Approximate indexes get their vectors in two steps: all but some held-out rows, then (after
    calibrating with the held-out rows as unseen queries) the held-out rows. With `groups` (the slide of
    each row) whole slides are held out, as a query slide is never in the index; FAISS ids = row numbers.
    """
    import faiss

    if kind not in INDEX_TYPES:
        raise HistoError(f"unknown index type {kind!r} (choose from {', '.join(INDEX_TYPES)})")
    params = index_params(params).model_dump()
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    n, d = vectors.shape
    if n == 0:
        raise HistoError("cannot build an index over zero vectors")
    if kind == "flat":
        index = faiss.IndexFlatL2(d)
        index.add(vectors)
        return FloatIndex(kind=kind, index=index, params=params, vectors=lambda rows: vectors[rows])
    if kind in ("ivf", "ivfpq"):
        params["nlist"] = int(params["nlist"] or default_nlist(n))
        quantizer = faiss.IndexFlatL2(d)
        if kind == "ivf":
            index = faiss.IndexIVFFlat(quantizer, d, params["nlist"], faiss.METRIC_L2)
        else:
            params["pq_m"] = int(params["pq_m"] or max(1, d // 16))
            if d % params["pq_m"]:
                raise HistoError(f"pq_m={params['pq_m']} must divide the feature dimension {d}")
            # 2**nbits centroids per sub-quantizer need >= 39 training points each.
            params["pq_nbits"] = int(min(params["pq_nbits"], max(1, int(math.log2(n / MIN_POINTS_PER_LIST)))))
            index = faiss.IndexIVFPQ(quantizer, d, params["nlist"], params["pq_m"], params["pq_nbits"])
        index.cp.seed = int(params["seed"])
        index.train(
            sample_rows(vectors, params["nlist"] * params["train_points_per_list"], int(params["seed"]))
        )
    else:
        hnsw = faiss.IndexHNSWFlat(d, int(params["hnsw_m"]))
        hnsw.hnsw.efConstruction = int(params["ef_construction"])
        index = faiss.IndexIDMap(hnsw)
    built = FloatIndex(kind=kind, index=index, params=params, vectors=lambda rows: vectors[rows])
    held_out = held_out_rows(n, groups, min(int(params["calibration_queries"]), n // 10), int(params["seed"]))
    rest = np.flatnonzero(~held_out)
    index.add_with_ids(vectors[rest], rest.astype(np.int64))
    calibrate(built, vectors, np.flatnonzero(held_out), rest)
    index.add_with_ids(vectors[held_out], np.flatnonzero(held_out).astype(np.int64))
    built.to_device("cpu")
    return built


def held_out_rows(n: int, groups: np.ndarray | None, n_rows: int, seed: int) -> np.ndarray:
    """Boolean mask of about `n_rows` rows: random rows, or whole random groups (at most half of them)."""
    rng = np.random.default_rng(seed)
    mask = np.zeros(n, dtype=bool)
    if groups is None:
        mask[rng.choice(n, n_rows, replace=False)] = True
        return mask
    ids, sizes = np.unique(groups, return_counts=True)
    order = rng.permutation(len(ids))
    taken = np.cumsum(sizes[order])
    count = min(len(ids) // 2, int(np.searchsorted(taken, n_rows)) + 1)
    mask[np.isin(groups, ids[order[:count]])] = True
    return mask


def sample_rows(x: np.ndarray, n: int, seed: int) -> np.ndarray:
    """A seeded subsample of n rows (all rows when n >= len(x)), in row order."""
    if n >= len(x):
        return x
    rows = np.sort(np.random.default_rng(seed).choice(len(x), n, replace=False))
    return np.ascontiguousarray(x[rows])


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean over queries of |found ∩ truth| / |truth| (rows of ids; -1 never counts)."""
    hits = [
        len(set(f[f >= 0]) & set(t[t >= 0])) / max(1, (t >= 0).sum())
        for f, t in zip(found, truth, strict=True)
    ]
    return float(np.mean(hits)) if hits else 1.0


def calibrate(index: FloatIndex, vectors: np.ndarray, queries: np.ndarray, indexed: np.ndarray) -> None:
    """Set nprobe (ivf, ivfpq) or efSearch (hnsw) to the smallest power of two reaching recall_target.

    `queries` are held-out rows not yet in the index (so they behave as unseen tiles); the truth is
    exact search over the `indexed` rows. The chosen value and its measured recall go into params.
    """
    p = index.params
    name = "ef_search" if index.kind == "hnsw" else "nprobe"
    if p.get(name):  # given by the user: keep it, but still measure its recall
        values = [int(p[name])]
    elif index.kind == "hnsw":
        values = [2**i for i in range(4, 12)]
    else:
        values = sorted({2**i for i in range(int(math.log2(p["nlist"])) + 1)} | {p["nlist"]})
    k = int(p["calibration_k"])
    recall = float("nan")
    if len(queries):
        truth = indexed[exact_knn(vectors[queries], vectors[indexed], k)[1]]
    for value in values:
        p[name] = value
        if not len(queries):
            continue  # too few vectors to calibrate: the last (most exhaustive) value stays
        index.to_device("cpu")
        recall = recall_at_k(index.search(vectors[queries], k)[1], truth)
        logger.debug(
            "%s %s %d: recall@%d %.4f on %d held-out tiles", index.kind, name, value, k, recall, len(queries)
        )
        if recall >= p["recall_target"]:
            break
    p[f"calibrated_recall_at_{k}"] = None if np.isnan(recall) else round(recall, 4)
    p["calibration_reached_target"] = bool(recall >= p["recall_target"])
    if len(queries) and not p["calibration_reached_target"]:
        logger.warning(
            "%s index: recall@%d %.3f at %s %d is below recall_target %s",
            index.kind,
            k,
            recall,
            name,
            p[name],
            p["recall_target"],
        )
