"""MinMax barcodes of deep features and their FAISS binary (Hamming) index.

Bit i of a barcode is 1 when f[i+1] < f[i] (REFERENCE.md §3), so a D-d feature gives D-1 bits; a zero bit
pads them to D (FAISS binary indexes need a multiple of 8 bits). The padding bit is 0 in every code and
never changes a Hamming distance. Bits are packed little-endian within each byte (bit i -> byte i // 8,
value 1 << (i % 8)).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from search.config import IndexParams, index_params
from search.index import (
    Calibration,
    held_out_rows,
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


def minmax_barcode(features: np.ndarray) -> np.ndarray:
    """Packed MinMax barcodes uint8 (N, code_bits(D) / 8); 1024-d features give 128 bytes per tile."""
    bits = minmax_bits(features)
    padded = np.zeros((bits.shape[0], code_bits(bits.shape[1] + 1)), dtype=bool)
    padded[:, : bits.shape[1]] = bits
    return np.packbits(padded, axis=1, bitorder=BITORDER)


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
    held = held_out_rows(
        len(codes), groups, min(int(p["calibration_queries"]), len(codes) // 10), int(p["seed"])
    )
    rest = np.flatnonzero(~held)
    index.add_with_ids(codes[rest], rest.astype(np.int64))
    calibration = _calibrate(index, row, codes, np.flatnonzero(held), rest, p)
    index.add_with_ids(codes[held], np.flatnonzero(held).astype(np.int64))
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
