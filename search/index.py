"""FAISS float-feature indexes built from the kinds table (search/kinds.py), their calibration and devices.

Metric: Euclidean (L2) distance between float features. FAISS works with squared L2 internally; every
distance returned here is its square root (a monotonic map, so rankings are unchanged).

Every kind is made by `faiss.index_factory` from its row's factory string, the string's parameters
resolved first (`resolve_build_params`): nlist from the FAISS guideline 4*sqrt(N) (range 4..16 sqrt(N)),
capped so that every list gets >= 39 training points; pq_m = D/16 sub-quantizers of `pq_nbits` = 8 bits
(fewer for tiny N). The search parameter a row tunes (nprobe, efSearch) is set through FAISS's
ParameterSpace and calibrated at build time: the smallest value of its sweep whose recall@10 against exact
search reaches `recall_target`, measured with the tiles of seeded held-out slides as queries (withheld
from the index while calibrating, as a query slide is never indexed; held-out single tiles of indexed
slides overstate recall because their own slide's tiles sit in the same lists).

- `flat`: exact. On CPU the search is a blocked GEMM over the index's own vectors with cached norms
  (measured faster here than FAISS's bundled BLAS; scripts/bench_search.py); on GPU, FAISS GpuIndexFlatL2.
- `ivf`: IVF-Flat. `ivf_hnsw`: IVF-Flat whose coarse quantizer is an HNSW graph (FAISS's choice for 1e6-1e7
  vectors). `ivfpq`: IVF-PQ returning `rerank * k` candidates that are re-ranked by exact distance on the
  stored float features. `hnsw`: HNSW-Flat (CPU only: FAISS has no GPU HNSW).

The parameters travel as one `IndexParameters` object: what the config requested and what the build
resolved (chosen from N, calibrated); `FloatIndex.params` is their merged, read-only view.
"""

from __future__ import annotations

import logging
import math
import string
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from functools import cached_property, partial
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np

from histo.errors import HistoError, InputFileError
from search.config import MIN_POINTS_PER_LIST, IndexParams, index_params
from search.filters import widened
from search.kinds import IndexKind, SearchParameter, float_kind

logger = logging.getLogger(__name__)

KNN_BLOCK_ELEMENTS = 1 << 25  # exact search: query x base distances held at once (128 MB of float32)


def default_nlist(n: int) -> int:
    """IVF list count from the FAISS guideline 4*sqrt(N), capped so each list has >= 39 training points."""
    return max(1, min(round(4 * math.sqrt(n)), n // MIN_POINTS_PER_LIST))


def _pq_m(p: Mapping[str, Any], n: int, d: int) -> int:
    m = int(p["pq_m"] or max(1, d // 16))
    if d % m:
        raise HistoError(f"pq_m={m} must divide the feature dimension {d}")
    return m


def _pq_nbits(p: Mapping[str, Any], n: int, d: int) -> int:
    # 2**nbits centroids per sub-quantizer need >= 39 training points each.
    return int(min(p["pq_nbits"], max(1, int(math.log2(n / MIN_POINTS_PER_LIST)))))


# FloatIndex.exact_is_cheaper's factor: the exact scan of the allowed rows costs about as much as a
# filtered IVF search through its lists at f^2 = EXACT_SCAN_ADVANTAGE * nprobe / nlist. Fitted at 1M
# 1024-d tiles (nprobe 128, nlist 4,000; scripts/bench_grow.py): the exact scan won at 10 % of the rows
# (two-stage 208 ms against 277 ms unfiltered) and lost at 25 % (402 ms against 256 ms).
EXACT_SCAN_ADVANTAGE = 0.7

# How a factory-string parameter left null is chosen from N vectors of dimension D (others: as given).
CHOOSERS: dict[str, Callable[[Mapping[str, Any], int, int], int]] = {
    "nlist": lambda p, n, d: int(p["nlist"] or default_nlist(n)),
    "pq_m": _pq_m,
    "pq_nbits": _pq_nbits,
}


def resolve_build_params(kind: IndexKind, params: Mapping[str, Any], n: int, d: int) -> dict[str, int]:
    """The values of the parameters named in the kind's factory string, for N vectors of dimension D."""
    names = [name for _, name, _, _ in string.Formatter().parse(kind.factory) if name]
    unknown = [name for name in names if name not in params]
    if unknown:
        raise HistoError(
            f"index kind {kind.name!r}: factory parameter {unknown[0]!r} is not an index parameter"
        )
    return {name: CHOOSERS.get(name, lambda p, n, d, key=name: int(p[key]))(params, n, d) for name in names}


def new_faiss_index(kind: IndexKind, params: Mapping[str, Any], d: int) -> Any:
    """An empty FAISS index of `kind` from its factory string (d: dimension, or bits of a binary code),
    its IVF k-means seeded and its HNSW graphs given their build beam."""
    import faiss

    description = kind.factory.format(**params)
    if kind.binary:
        index = faiss.index_binary_factory(d, description)
    else:
        index = faiss.index_factory(d, description, faiss.METRIC_L2)
    for part in index_parts(index):
        if isinstance(part, (faiss.IndexIVF, faiss.IndexBinaryIVF)):
            part.cp.seed = int(params["seed"])
        if isinstance(part, faiss.IndexHNSW):
            part.hnsw.efConstruction = int(params["ef_construction"])
    return index


def index_parts(index: Any) -> Iterator[Any]:
    """A FAISS index and the indexes inside it (an IDMap's index, an IVF's coarse quantizer), downcast."""
    import faiss

    if not isinstance(index, faiss.IndexBinary):
        index = faiss.downcast_index(index)
    yield index
    if isinstance(index, faiss.IndexIDMap):
        yield from index_parts(index.index)
    if isinstance(index, faiss.IndexIVF):
        yield from index_parts(index.quantizer)


def set_search_parameter(index: Any, tuned: SearchParameter, value: int, gpu: bool = False) -> None:
    """Set a search-time parameter through FAISS's ParameterSpace (binary indexes, which it does not
    cover, take it as the attribute of that name)."""
    import faiss

    if isinstance(index, faiss.IndexBinary):
        setattr(index, tuned.faiss_name, int(value))
        return
    space = faiss.GpuParameterSpace() if gpu else faiss.ParameterSpace()
    space.set_index_parameter(index, tuned.faiss_name, int(value))


@dataclass(frozen=True)
class IndexParameters:
    """An index's parameters: `requested` (the config's IndexParams; null = choose) and `resolved` (the
    values the build chose from N, the calibrated search value and its measured recall)."""

    requested: IndexParams
    resolved: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, value: IndexParameters | IndexParams | Mapping[str, Any] | None) -> IndexParameters:
        """From itself, an IndexParams (nothing resolved yet), None (the defaults) or a mapping of
        effective values over the defaults (what `FloatIndex.params` shows, e.g. read back from a manifest)."""
        if isinstance(value, IndexParameters):
            return value
        if value is None or isinstance(value, IndexParams):
            return cls(index_params(value))
        return cls(index_params(None), dict(value))

    @classmethod
    def recorded(cls, index: Mapping[str, Any], source: str) -> IndexParameters:
        """From a manifest's `index` section: `params_requested` and the effective `params`."""
        return cls(index_params(index["params_requested"], source), dict(index["params"]))

    def with_resolved(self, values: Mapping[str, Any]) -> IndexParameters:
        """A copy with more resolved values (the object itself is never edited)."""
        return replace(self, resolved={**self.resolved, **values})

    @cached_property
    def effective(self) -> Mapping[str, Any]:
        """Every parameter with the value the index uses, and the calibration results (read-only)."""
        return MappingProxyType({**self.requested.model_dump(), **self.resolved})


def resolve_faiss_device(device: str, kind: str | IndexKind) -> str:
    """'cpu' or 'gpu' for a FAISS index of `kind`; 'cuda' without GPUs (or for a CPU-only kind) is an error."""
    import faiss

    kind = float_kind(kind)
    n_gpus = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    if device not in ("auto", "cpu", "cuda"):
        raise HistoError(f"unknown device {device!r} (auto, cpu, cuda)")
    if device == "cuda" and n_gpus == 0:
        raise HistoError("device cuda: FAISS sees no GPU (is faiss-gpu installed and a GPU visible?)")
    if device == "cuda" and not kind.gpu:
        raise HistoError(
            f"device cuda: FAISS has no GPU {kind.description} index; use --device cpu or another --type"
        )
    return "gpu" if device != "cpu" and n_gpus > 0 and kind.gpu else "cpu"


def exact_knn(
    queries: np.ndarray,
    base: np.ndarray,
    k: int,
    base_sqnorms: np.ndarray | None = None,
    allowed: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact k nearest rows of `base` by L2 (blocked GEMM), among the `allowed` rows (a boolean mask; None:
    all); returns (Euclidean distances, row ids), -1 where fewer than k rows are allowed."""
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    n_allowed = len(base) if allowed is None else int(np.count_nonzero(allowed))
    k_all, k = k, min(k, n_allowed)
    if base_sqnorms is None:
        base_sqnorms = np.einsum("ij,ij->i", base, base)
    neg2q = -2.0 * queries
    best_d = np.full((len(queries), 0), np.inf, dtype=np.float32)
    best_i = np.zeros((len(queries), 0), dtype=np.int64)
    step = max(k, KNN_BLOCK_ELEMENTS // max(1, len(queries)))
    for start in range(0, len(base) if k else 0, step):
        rows, block = _allowed_block(base, start, step, allowed)
        if len(rows) == 0:
            continue
        d2 = neg2q @ block.T  # |x|^2 - 2 q.x: the -2 folded into the queries, the norms added in place
        d2 += base_sqnorms[rows][None, :]
        if allowed is not None and len(rows) == len(block) and not allowed[rows].all():
            d2[:, ~allowed[rows]] = np.inf  # a mostly allowed block is searched whole, the rest masked
        take = min(k, d2.shape[1])
        part = np.argpartition(d2, take - 1, axis=1)[:, :take]
        best_d = np.concatenate([best_d, np.take_along_axis(d2, part, 1)], axis=1)
        best_i = np.concatenate([best_i, rows[part]], axis=1)
        if best_d.shape[1] > k:
            keep = np.argpartition(best_d, k - 1, axis=1)[:, :k]
            best_d, best_i = np.take_along_axis(best_d, keep, 1), np.take_along_axis(best_i, keep, 1)
    # Recompute the k winners' distances from differences (no cancellation of large norms), then sort.
    diff = base[best_i] - queries[:, None, :]
    best_d = np.sqrt(np.einsum("qkd,qkd->qk", diff, diff)).astype(np.float32)
    order = np.lexsort((best_i, best_d), axis=1) if best_d.size else np.zeros_like(best_i)
    dist, ids = np.take_along_axis(best_d, order, 1), np.take_along_axis(best_i, order, 1)
    if k < k_all:  # fewer allowed rows than asked for: pad as FAISS does
        pad = ((0, 0), (0, min(k_all, len(base)) - k))
        dist, ids = np.pad(dist, pad, constant_values=np.inf), np.pad(ids, pad, constant_values=-1)
    return dist, ids


def _allowed_block(
    base: np.ndarray, start: int, step: int, allowed: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    """(row ids, rows) of one block of `base`: all of it when at least half is allowed (the excluded rows
    are masked after the product), else only its allowed rows, gathered."""
    rows = np.arange(start, min(start + step, len(base)))
    if allowed is None or np.count_nonzero(allowed[rows]) * 2 >= len(rows):
        return rows, base[start : start + step]
    rows = rows[allowed[rows]]
    return rows, base[rows]


@dataclass
class FloatIndex:
    """A FAISS float index plus what its search needs: its kind, parameters, device and the stored vectors.

    `tombstones`: rows of a kind that cannot delete (search/kinds.py `removes`) left in the index with id
    -1; every search filters them out. `trained`: the trained, empty index a build started from (new rows
    join as a part made from it; None for untrained kinds). `held_out`: the rows a build calibrated with.
    """

    kind: IndexKind
    index: Any  # the CPU faiss index (what is saved)
    parameters: IndexParameters
    device: str = "cpu"  # "cpu" or "gpu"; set by to_device
    vectors: Callable[[np.ndarray], np.ndarray] | None = None  # rows -> float32 features (re-ranking)
    base: Callable[[], np.ndarray] | None = None  # every row's float32 features (exact filtered search)
    tombstones: int = 0
    trained: Any = field(default=None, repr=False)
    held_out: np.ndarray | None = field(default=None, repr=False)
    _search_index: Any = field(default=None, repr=False)
    _lists: Any = field(default=None, repr=False)  # search/filters.py ListPlan of an IVF, read once
    _flat_cache: tuple[np.ndarray, np.ndarray] | None = field(default=None, repr=False)
    _base_norms: np.ndarray | None = field(default=None, repr=False)

    @property
    def ntotal(self) -> int:
        """The rows a search can return (tombstones excluded)."""
        return int(self.index.ntotal) - self.tombstones

    @property
    def params(self) -> Mapping[str, Any]:
        """The effective parameters (requested, chosen and calibrated values), read-only."""
        return self.parameters.effective

    def to_device(self, device: str = "auto") -> FloatIndex:
        """Move the search copy to all GPUs (replicas, or shards if params['gpu_shard']) or keep it on CPU."""
        import faiss

        self.device = resolve_faiss_device(device, self.kind)
        self._search_index = self.index
        if self.device == "gpu":
            options = faiss.GpuMultipleClonerOptions()
            options.shard = bool(self.params["gpu_shard"])
            self._search_index = faiss.index_cpu_to_all_gpus(self.index, co=options)
        tuned = self.kind.tunes
        if tuned is not None and self.params.get(tuned.key):
            set_search_parameter(self._search_index, tuned, self.params[tuned.key], self.device == "gpu")
        return self

    def device_info(self) -> dict[str, Any]:
        """Which device the search runs on, recorded in the manifest and in results."""
        import faiss

        info: dict[str, Any] = {"device": self.device}
        if self.device == "gpu":
            info["gpus"] = faiss.get_num_gpus()
            info["multi_gpu"] = "shards" if self.params["gpu_shard"] else "replicas"
        return info

    def search(
        self, queries: np.ndarray, k: int, rows: np.ndarray | None = None, own: bool = False
    ) -> tuple[np.ndarray, np.ndarray]:
        """k nearest indexed vectors of each query among the `rows` allowed (a boolean mask over the rows;
        None: all): (Euclidean distances (Q, k), ids (Q, k), -1 = none). `own`: through the index's own
        structure even where an exact scan is cheaper (the drift check measures the index itself).

        A filtered search is exact within the filter for the flat kind, and for an IVF whose filter
        allows so few rows that scanning them all costs less than the lists a filtered IVF search would
        scan (`exact_is_cheaper`; it needs `base`); other filtered searches get the filter as a FAISS id
        selector and visit about as many allowed vectors as an unfiltered search visits (see
        `_filtered_search`). Filtered searches run on the CPU (FAISS GPU indexes take no selector)."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        k = min(k, self.ntotal)
        if self._search_index is None:
            self.to_device("cpu")
        if self.kind.exact and self.device == "cpu":
            base, norms = self._flat_arrays()
            return exact_knn(queries, base, k, norms, rows)
        if rows is not None and not own and self.exact_is_cheaper(rows):
            base = self.base()
            if self._base_norms is None:
                self._base_norms = np.einsum("ij,ij->i", base, base)
            return exact_knn(queries, base, k, self._base_norms, rows)
        if rows is not None and not self.tombstones:
            found = widened(lambda q, n: self.search(q, n), queries, k, rows)
            if found is not None:
                return found
        if rows is None and not self.tombstones:
            search = self._search_index.search
        else:
            search = partial(self._filtered_search, rows=rows)
        if self.kind.rerank:
            return self._search_reranked(queries, k, search)
        d2, ids = search(queries, k)
        return np.sqrt(np.maximum(d2, 0.0)), ids

    def exact_is_cheaper(self, rows: np.ndarray) -> bool:
        """Whether scanning every allowed row exactly costs less than a filtered IVF search. That search
        scans about nprobe / (nlist * f) of the rows per query to meet as many allowed vectors as an
        unfiltered one (f: the allowed fraction), the exact scan f of them in one matrix product for all
        queries: so f^2 <= EXACT_SCAN_ADVANTAGE * nprobe / nlist (f <= 0.15 for nprobe 128 of 4,000
        lists)."""
        nlist, nprobe = self.params.get("nlist"), self.params.get("nprobe")
        if self.base is None or not nlist or not nprobe or self.tombstones:
            return False
        fraction = np.count_nonzero(rows) / max(1, self.ntotal)
        return fraction**2 <= EXACT_SCAN_ADVANTAGE * nprobe / nlist

    def _filtered_search(
        self, queries: np.ndarray, k: int, rows: np.ndarray | None
    ) -> tuple[np.ndarray, np.ndarray]:
        """FAISS search of the CPU index through an id selector of the allowed rows (tombstones never pass):
        an IVF scans each query's lists as search/filters.py's `ListPlan` says; a graph gets its calibrated
        efSearch divided by the allowed fraction."""
        import faiss

        from search.filters import ListPlan, digest, row_selector, scaled

        allowed = np.ones(self.ntotal, dtype=bool) if rows is None else rows
        selector, bits = row_selector(allowed)
        tuned = self.kind.tunes
        params = getattr(faiss, tuned.params_class)() if tuned is not None else faiss.SearchParameters()
        params.sel = selector
        ivf = next((p for p in index_parts(self.index) if isinstance(p, faiss.IndexIVF)), None)
        if ivf is not None:
            if self._lists is None:
                self._lists = ListPlan.of(ivf.invlists)
            plan, nprobe = self._lists, int(ivf.nprobe)
            coarse, nearest = ivf.quantizer.search(queries, plan.width(allowed, nprobe))
            lists = plan.probes(nearest, plan.allowed_sizes(allowed, digest(allowed)), nprobe)
            params.nprobe = lists.shape[1]
            d2 = np.empty((len(queries), k), dtype=np.float32)
            ids = np.empty((len(queries), k), dtype=np.int64)
            ptr = faiss.swig_ptr
            ivf.search_preassigned_c(
                len(queries), ptr(queries), k, ptr(lists), ptr(coarse), ptr(d2), ptr(ids), False, params
            )
        else:
            if tuned is not None and self.params.get(tuned.key):
                fraction = np.count_nonzero(allowed) / max(1, int(self.index.ntotal))
                value = scaled(int(self.params[tuned.key]), fraction, tuned.limit(self.params))
                setattr(params, tuned.faiss_name, value)
            d2, ids = self.index.search(queries, k, params=params)
        del bits  # the selector reads it until here
        return d2, ids

    def stored_vectors(self) -> np.ndarray:
        """The vectors held by an exact (flat) index (a zero-copy view of FAISS's storage), row order = ids."""
        if not self.kind.exact:
            raise HistoError(f"a {self.kind.name} index does not hold its float vectors")
        return self._flat_arrays()[0]

    def row_vectors(self) -> np.ndarray | None:
        """Every row's float vector read back from the index, in row order, when the index stores them
        unchanged (flat, IVF-Flat, HNSW-Flat); None for kinds that store lossy codes (PQ, SQ)."""
        import faiss

        if self.kind.exact:
            return self.stored_vectors()
        parts = list(index_parts(self.index))
        ivf = next((p for p in parts if isinstance(p, faiss.IndexIVF)), None)
        if isinstance(ivf, faiss.IndexIVFFlat):
            ivf.make_direct_map()
            return ivf.reconstruct_n(0, ivf.ntotal)
        hnsw = next((p for p in parts if isinstance(p, faiss.IndexHNSW)), None)
        storage = None if hnsw is None else faiss.downcast_index(hnsw.storage)
        if not isinstance(parts[0], faiss.IndexIDMap) or not isinstance(storage, faiss.IndexFlat):
            return None
        stored = faiss.rev_swig_ptr(storage.get_xb(), storage.ntotal * storage.d).reshape(-1, storage.d)
        ids = faiss.vector_to_array(parts[0].id_map)
        out = np.empty((self.ntotal, storage.d), dtype=np.float32)
        out[ids[ids >= 0]] = stored[ids >= 0]
        return out

    def _flat_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        import faiss

        if self._flat_cache is None:
            n, d = self.ntotal, self.index.d
            base = faiss.rev_swig_ptr(self.index.get_xb(), n * d).reshape(n, d) if n else np.zeros((0, d))
            self._flat_cache = (base, np.einsum("ij,ij->i", base, base))
        return self._flat_cache

    def _search_reranked(
        self, queries: np.ndarray, k: int, search: Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]]
    ) -> tuple[np.ndarray, np.ndarray]:
        if self.vectors is None:
            raise HistoError(f"{self.kind.name} search needs the stored float features for exact re-ranking")
        shortlist = min(self.ntotal, int(self.params["rerank"]) * k)
        _, cand = search(queries, shortlist)
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


def load_float_index(
    path: str | Path, kind: str | IndexKind, params: IndexParameters | Mapping[str, Any] | None
) -> FloatIndex:
    """Read a saved FAISS float index of `kind` with its parameters (`IndexParameters.of`); an unreadable
    file is a one-line InputFileError."""
    import faiss

    kind = float_kind(kind)
    try:
        index = faiss.read_index(str(path))
    except RuntimeError as e:
        raise InputFileError(path, f"not a readable FAISS index ({str(e).splitlines()[0][:120]})") from None
    return FloatIndex(kind=kind, index=index, parameters=IndexParameters.of(params))


def build_float_index(
    vectors: np.ndarray,
    kind: str | IndexKind,
    params: IndexParams | Mapping[str, Any] | None = None,
    groups: np.ndarray | None = None,
) -> FloatIndex:
    """Build (train + add) a CPU index of `kind` over float32 (N, D) vectors; calibrates its search value.

    `params`: IndexParams, None (the defaults) or a mapping over the defaults. The returned index's
    `parameters` hold them as requested and as resolved (chosen and calibrated values).

    Calibrated kinds get their vectors in two steps: all but some held-out rows, then (after calibrating
    with the held-out rows as unseen queries) the held-out rows. With `groups` (the slide of each row)
    whole slides are held out, as a query slide is never in the index; FAISS ids = row numbers. The
    returned index keeps the trained, empty index (`trained`) and the held-out rows (`held_out`).
    """
    import faiss

    kind = float_kind(kind)
    requested = index_params(params)
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    n, d = vectors.shape
    if n == 0:
        raise HistoError("cannot build an index over zero vectors")
    p = requested.model_dump()
    chosen = resolve_build_params(kind, p, n, d)
    p |= chosen
    index = new_faiss_index(kind, p, d)
    built = FloatIndex(kind, index, IndexParameters(requested, chosen), vectors=lambda rows: vectors[rows])
    if kind.trainable:
        index.train(training_sample(vectors, p))
        built.trained = faiss.clone_index(index)  # still empty: the start of every part added later
    if kind.tunes is None:
        index.add(vectors)
        return built
    held_out = calibration_rows(n, groups, p)
    built.held_out = np.flatnonzero(held_out)
    rest = np.flatnonzero(~held_out)
    add_rows(index, vectors, rest)
    calibration = calibrate(built, vectors, np.flatnonzero(held_out), rest)
    built.parameters = built.parameters.with_resolved(calibration.record())
    add_rows(index, vectors, np.flatnonzero(held_out))
    built.to_device("cpu")
    return built


def add_rows(index: Any, x: np.ndarray, rows: np.ndarray, block: int = 1 << 16) -> None:
    """`index.add_with_ids(x[rows], rows)`, `block` rows at a time (never a copy of most of `x`)."""
    for start in range(0, len(rows), block):
        ids = np.ascontiguousarray(rows[start : start + block], dtype=np.int64)
        index.add_with_ids(x[ids], ids)


def training_sample(x: np.ndarray, params: Mapping[str, Any]) -> np.ndarray:
    """The seeded training rows of a trainable index: `train_points_per_list` per list (all rows if fewer)."""
    n_lists = int(params.get("nlist") or 1)
    return sample_rows(x, n_lists * int(params["train_points_per_list"]), int(params["seed"]))


def calibration_rows(n: int, groups: np.ndarray | None, params: Mapping[str, Any]) -> np.ndarray:
    """The rows a build holds out to calibrate on (whole slides with `groups`): about
    `calibration_queries` rows, at most a tenth of the index; the float and barcode builds hold out the same."""
    n_rows = min(int(params["calibration_queries"]), n // 10)
    return held_out_rows(n, groups, n_rows, int(params["seed"]))


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


@dataclass(frozen=True)
class Calibration:
    """The search value a build chose and its recall@k on held-out rows (None: too few rows to measure)."""

    key: str
    value: int
    k: int
    recall: float | None
    reached: bool

    def record(self) -> dict[str, Any]:
        """The resolved parameters it adds: the value, `calibrated_recall_at_{k}`, whether it reached the target."""
        return {
            self.key: self.value,
            f"calibrated_recall_at_{self.k}": self.recall,
            "calibration_reached_target": self.reached,
        }


def tune(
    tuned: SearchParameter,
    params: Mapping[str, Any],
    recall_of: Callable[[int], float] | None,
    label: str,
) -> Calibration:
    """The smallest value of the sweep (or the user's value, only measured) reaching `recall_target`.

    `recall_of(value)` measures recall@calibration_k on held-out queries (None: no held-out rows, the
    last, most exhaustive value stays unmeasured). A miss of the target is logged as a warning.
    """
    values = [int(params[tuned.key])] if params.get(tuned.key) else tuned.sweep(params)
    k, target = int(params["calibration_k"]), params["recall_target"]
    recall = float("nan")
    for value in values:
        if recall_of is None:
            continue
        recall = recall_of(value)
        logger.debug("%s %s %d: recall@%d %.4f", label, tuned.key, value, k, recall)
        if recall >= target:
            break
    result = Calibration(
        tuned.key, value, k, None if np.isnan(recall) else round(recall, 4), recall >= target
    )
    if recall_of is not None and not result.reached:
        logger.warning(
            "%s index: recall@%d %.3f at %s %d is below recall_target %s",
            label,
            k,
            recall,
            tuned.key,
            value,
            target,
        )
    return result


def calibrate(
    index: FloatIndex, vectors: np.ndarray, queries: np.ndarray, indexed: np.ndarray
) -> Calibration:
    """Calibrate the kind's search value (nprobe, efSearch) on `queries`, held-out rows not yet in the
    index (so they behave as unseen tiles); the truth is exact search over the `indexed` rows."""
    tuned = index.kind.tunes
    base = index.parameters
    k = int(base.effective["calibration_k"])

    def recall_of(value: int) -> float:
        index.parameters = base.with_resolved({tuned.key: value})
        index.to_device("cpu")
        return recall_at_k(index.search(vectors[queries], k)[1], truth)

    indexed_rows = np.zeros(len(vectors), dtype=bool)
    indexed_rows[indexed] = True  # a mask, not a copy of the indexed vectors
    truth = exact_knn(vectors[queries], vectors, k, allowed=indexed_rows)[1] if len(queries) else None
    calibration = tune(tuned, base.effective, recall_of if len(queries) else None, index.kind.name)
    index.parameters = base
    return calibration
