"""MinMax barcodes of deep features and their FAISS binary (Hamming) index.

Bit i of a barcode is 1 when f[i+1] < f[i] (REFERENCE.md §3), so a D-d feature gives D-1 bits; a zero bit
pads them to D (FAISS binary indexes need a multiple of 8 bits). The padding bit is 0 in every code and
never changes a Hamming distance. Bits are packed little-endian within each byte (bit i -> byte i // 8,
value 1 << (i % 8)).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from search.config import IndexParams, index_params
from search.filters import CACHED_FILTERS, LastFilter, ListGroups, ListPlan, row_selector, widened
from search.index import (
    Calibration,
    add_rows,
    calibration_rows,
    new_faiss_index,
    resolve_build_params,
    set_search_parameter,
    training_sample,
    tune,
)
from search.kinds import IndexKind, barcode_kind

BITORDER = "little"


def minmax_bits(features: np.ndarray) -> np.ndarray:
    """Unpacked MinMax bits (N, D-1) bool of float features (N, D): bit i = f[i+1] < f[i]."""
    features = np.asarray(features)
    if features.ndim != 2 or features.shape[1] < 2:
        raise ValueError(f"expected features of shape (N, D >= 2), got {features.shape}")
    return features[:, 1:] < features[:, :-1]


def code_bits(feature_dim: int) -> int:
    """Bits of a padded barcode for `feature_dim`-d features: D-1 rounded up to a multiple of 8."""
    return -(-(feature_dim - 1) // 8) * 8


def minmax_barcode(features: np.ndarray, block: int = 1 << 16) -> np.ndarray:
    """Packed MinMax barcodes uint8 (N, code_bits(D) / 8); 1024-d features give 128 bytes per tile.
    Computed `block` rows at a time, so the unpacked bits never take more than block x D bytes."""
    features = np.asarray(features)
    d = features.shape[1] if features.ndim == 2 else 0
    out = np.empty((len(features), code_bits(d) // 8), dtype=np.uint8)
    for start in range(0, len(features), block):
        bits = minmax_bits(features[start : start + block])
        padded = np.zeros((bits.shape[0], code_bits(d)), dtype=bool)
        padded[:, : bits.shape[1]] = bits
        out[start : start + block] = np.packbits(padded, axis=1, bitorder=BITORDER)
    if len(features) == 0:
        minmax_bits(features)  # the shape check
    return out


def hamming_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Hamming distances int32 (Na, Nb) between packed codes a (Na, B) and b (Nb, B) (FAISS popcounts)."""
    import faiss

    a, b = np.ascontiguousarray(a, dtype=np.uint8), np.ascontiguousarray(b, dtype=np.uint8)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"codes must be (N, B) with equal B, got {a.shape} and {b.shape}")
    out = np.empty((a.shape[0], b.shape[0]), dtype=np.int32)
    if out.size:
        faiss.hammings(
            faiss.swig_ptr(a), faiss.swig_ptr(b), a.shape[0], b.shape[0], a.shape[1], faiss.swig_ptr(out)
        )
    return out


def build_binary_index(
    codes: np.ndarray,
    kind: str | IndexKind,
    params: IndexParams | Mapping[str, Any] | None = None,
    groups: np.ndarray | None = None,
) -> tuple[Any, dict[str, Any]]:
    """A FAISS binary (Hamming) index of a barcode kind (search/kinds.py) and its effective parameters.

    `flat`: IndexBinaryFlat (exact). `ivf`: IndexBinaryIVF with nlist = 4*sqrt(N) (as the float IVF), a
    direct map so codes can be read back for the exact stage, and nprobe calibrated on held-out slides
    (`groups`) to reach `recall_target` (tie-aware Hamming recall@k, see `hamming_recall`). `params`:
    IndexParams, None (the defaults) or a mapping over the defaults (as `build_float_index`).
    """
    import faiss

    row = barcode_kind(kind)
    codes = np.ascontiguousarray(codes, dtype=np.uint8)
    bits = codes.shape[1] * 8
    p = index_params(params).model_dump()
    chosen = resolve_build_params(row, p, len(codes), bits)
    p |= chosen
    index = new_faiss_index(row, p, bits)
    if row.trainable:
        index.train(training_sample(codes, p))
    if row.tunes is None:
        index.add(codes)
        return index, {"kind": row.name, **chosen}
    held = calibration_rows(len(codes), groups, p)
    rest = np.flatnonzero(~held)
    add_rows(index, codes, rest)
    calibration = _calibrate(index, row, codes, np.flatnonzero(held), rest, p)
    add_rows(index, codes, np.flatnonzero(held))
    if isinstance(index, faiss.IndexBinaryIVF):
        index.make_direct_map()
    return index, {"kind": row.name, **chosen, **calibration.record()}


def _calibrate(
    index: Any, row: IndexKind, codes: np.ndarray, queries: np.ndarray, rest: np.ndarray, p: dict
) -> Calibration:
    """The row's search value (smallest reaching the target, search.index.tune) set on `index`."""
    import faiss

    k = int(p["calibration_k"])
    truth_d = None
    if len(queries):
        exact = faiss.IndexBinaryFlat(codes.shape[1] * 8)
        exact.add(codes[rest])
        truth_d = exact.search(codes[queries], k)[0]

    def recall_of(value: int) -> float:
        set_search_parameter(index, row.tunes, value)
        return hamming_recall(index.search(codes[queries], k)[0], truth_d)

    calibration = tune(row.tunes, p, recall_of if len(queries) else None, f"barcode {row.name}")
    set_search_parameter(index, row.tunes, calibration.value)
    return calibration


def hamming_recall(found_d: np.ndarray, truth_d: np.ndarray) -> float:
    """Tie-aware recall@k: share of returned neighbours at most as far as the true k-th neighbour."""
    kth = truth_d[:, -1:]
    return float(((found_d <= kth) & (found_d >= 0)).sum() / truth_d.size)


def stored_codes(index: Any) -> np.ndarray:
    """The packed codes held by a binary index, in id order (IVF: through its direct map)."""
    import faiss

    if isinstance(index, faiss.IndexBinaryFlat):
        return faiss.vector_to_array(index.xb).reshape(-1, index.code_size)
    if index.direct_map.type == 0:
        index.make_direct_map()
    return index.reconstruct_n(0, index.ntotal)


def empty_copy(index: Any) -> Any:
    """The trained, empty copy of a binary index (its quantizer without any code): new rows join as a part
    made from it."""
    import faiss

    empty = faiss.clone_binary_index(index)
    empty.reset()
    if isinstance(empty, faiss.IndexBinaryIVF):
        empty.set_direct_map_type(faiss.DirectMap.NoMap)
    return empty


@dataclass
class BarcodeIndex:
    """A FAISS binary index with the codes of its rows (row order), searched with an optional row filter.

    Filtered search (search/filters.py): IndexBinaryFlat takes the filter as a FAISS id selector (exact
    within it); FAISS's IndexBinaryIVF takes none, so a filtered IVF search widens when few rows are
    excluded, and otherwise searches a view of the index holding only the allowed rows.
    """

    kind: IndexKind
    index: Any
    codes: np.ndarray
    _lists: ListPlan | None = field(default=None, repr=False)
    _centroid_codes: np.ndarray | None = field(default=None, repr=False)
    _views: dict[bytes, tuple[Any, ListGroups]] = field(default_factory=dict, repr=False)
    _last: LastFilter = field(default_factory=LastFilter, repr=False)

    def search(
        self, queries: np.ndarray, k: int, rows: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """k nearest rows by Hamming distance among the allowed `rows` (boolean mask; None: all):
        (distances int32 (Q, k), ids (Q, k), -1 = none)."""
        import faiss

        queries = np.ascontiguousarray(queries, dtype=np.uint8)
        k = min(k, len(self.codes))
        if rows is None:
            return self.index.search(queries, k)
        if isinstance(self.index, faiss.IndexBinaryIVF):
            found = widened(lambda q, n: self.index.search(q, n), queries, k, rows)
            return found if found is not None else self._filtered_ivf(queries, k, rows)
        selector, bits = row_selector(rows)
        params = faiss.SearchParameters()
        params.sel = selector
        found = self.index.search(queries, k, params=params)
        del bits  # the selector reads it until here
        return found

    def _filtered_ivf(self, queries: np.ndarray, k: int, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The IVF search within the allowed rows: FAISS's IndexBinaryIVF takes no id selector, so it runs on
        a view of the index holding only the allowed rows in groups of its lists (made once per filter,
        search/filters.py's `ListGroups`), each query's groups chosen as `ListPlan.probes_among` says from
        its distances to every centroid."""
        import faiss

        ivf = self.index
        if self._lists is None:
            self._lists = ListPlan.of(ivf.invlists)
        key = self._last.digest(rows)
        sizes = self._lists.allowed_sizes(rows, key)
        view, groups = self._view(rows, key, sizes)
        distances = hamming_matrix(queries, self._centroids())
        if ivf.d < 1 << 16:  # numpy's stable sort orders 16-bit integers by radix, 10x faster than int32
            distances = distances.astype(np.uint16)
        lists = self._lists.probes_among(distances, sizes, int(ivf.nprobe), groups)
        coarse = np.zeros(lists.shape, dtype=np.int32)  # unused by a binary IVF scan
        dist = np.empty((len(queries), k), dtype=np.int32)
        ids = np.empty((len(queries), k), dtype=np.int64)
        ptr = faiss.swig_ptr
        view.nprobe = lists.shape[1]
        view.search_preassigned_c(
            len(queries), ptr(queries), k, ptr(lists), ptr(coarse), ptr(dist), ptr(ids), False
        )
        return dist, ids

    def _centroids(self) -> np.ndarray:
        import faiss

        if self._centroid_codes is None:
            quantizer = faiss.downcast_IndexBinary(self.index.quantizer)
            self._centroid_codes = faiss.vector_to_array(quantizer.xb).reshape(-1, self.index.code_size)
        return self._centroid_codes

    def _view(self, rows: np.ndarray, key: bytes, allowed_sizes: np.ndarray) -> tuple[Any, ListGroups]:
        """An IndexBinaryIVF with one list per group of the index's lists (`ListGroups`) holding only their
        allowed rows, and the groups (cached per filter)."""
        import faiss

        if key in self._views:
            return self._views[key]
        ivf = self.index
        groups = ListGroups.of(self._centroids(), allowed_sizes, ivf.ntotal / ivf.nlist)
        view = faiss.IndexBinaryIVF(faiss.IndexBinaryFlat(ivf.d), ivf.d, len(groups.sizes))
        view.is_trained = True
        size = ivf.code_size
        for i in np.flatnonzero(groups.group_of >= 0):
            n = int(self._lists.sizes[i])
            ids = faiss.rev_swig_ptr(ivf.invlists.get_ids(int(i)), n)
            codes = faiss.rev_swig_ptr(ivf.invlists.get_codes(int(i)), n * size).reshape(n, size)
            keep = rows[ids]
            kept_ids = np.ascontiguousarray(ids[keep])
            kept = np.ascontiguousarray(codes[keep])
            view.invlists.add_entries(
                int(groups.group_of[i]), len(kept_ids), faiss.swig_ptr(kept_ids), faiss.swig_ptr(kept)
            )
        view.ntotal = int(np.count_nonzero(rows))
        if len(self._views) >= CACHED_FILTERS // 2:
            self._views.pop(next(iter(self._views)))
        self._views[key] = view, groups
        return view, groups
