"""Index kinds as data: one row per FAISS float index kind and per barcode (Hamming) index kind.

A row gives the FAISS factory string (its `{placeholders}` are parameters resolved at build time, see
`search.index.resolve_build_params`), the search parameter FAISS's ParameterSpace sets at query time and
the build calibrates, whether faiss-gpu can hold the index, whether its candidates are re-ranked by exact
distance on the stored float features, whether it is trained, the barcode index it pairs with, and how it
takes an update (search/growth.py): new rows as a new part of the trained index, or the whole index
rewritten with them; removed rows deleted, or left in and filtered out of every search.
`search/index.py` and `search/barcodes.py` build every kind from its row through `faiss.index_factory`
(`index_binary_factory`), so adding a kind is one `register(IndexKind(...))` call; the config's `type`
and `params.barcode_index` accept the registered names.

This module is plain data (no faiss, no numpy), so `histo index --help` can list the kinds cheaply.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from histo.errors import HistoError


@dataclass(frozen=True)
class SearchParameter:
    """A search-time FAISS parameter: its ParameterSpace name, its config key, the values calibration tries
    (smallest first; the first reaching the recall target is kept) given the resolved parameters, the
    FAISS SearchParameters class that carries it with an id filter, and its largest useful value (a
    filtered search scales the calibrated value by 1 / the allowed fraction, up to that)."""

    faiss_name: str
    key: str
    sweep: Callable[[Mapping[str, Any]], list[int]]
    params_class: str
    limit: Callable[[Mapping[str, Any]], int]


def _nprobe_sweep(params: Mapping[str, Any]) -> list[int]:
    nlist = int(params["nlist"])
    return sorted({2**i for i in range(int(math.log2(nlist)) + 1)} | {nlist})


NPROBE = SearchParameter(
    "nprobe", "nprobe", _nprobe_sweep, "SearchParametersIVF", lambda params: int(params["nlist"])
)
EF_SEARCH = SearchParameter(
    "efSearch", "ef_search", lambda params: [2**i for i in range(4, 12)], "SearchParametersHNSW",
    lambda params: 1 << 14,
)  # fmt: skip
GROWS = ("part", "rewrite")


@dataclass(frozen=True)
class IndexKind:
    """One index kind. `exact`: an exhaustive search over the raw vectors it stores (the flat index; on
    CPU its search is a blocked GEMM and its storage doubles as the feature matrix). `rerank`: candidates
    (`params.rerank` x k) are re-ranked by exact distance on the stored float features. `trainable`: the
    index is trained (k-means / codebooks) on a seeded sample of `params.train_points_per_list` x nlist.
    `barcodes`: the barcode index kind used with this float kind when `params.barcode_index` is null.
    `grows`: how added rows join the index: "part" (a new file of the trained, empty index holding only them,
    merged with the others when the index is opened; FAISS merges IVF lists and flat arrays) or "rewrite"
    (the stored index is read, the rows added and the whole file written again: FAISS cannot merge HNSW
    graphs). `removes`: FAISS deletes a removed row's id; False (HNSW: a graph node cannot be deleted) leaves
    it in the index as a tombstone that every search filters out, until `--retrain` rebuilds."""

    name: str
    factory: str
    description: str
    tunes: SearchParameter | None = None
    gpu: bool = True
    rerank: bool = False
    trainable: bool = False
    exact: bool = False
    barcodes: str = "ivf"
    binary: bool = False
    grows: str = "part"
    removes: bool = True

    def __post_init__(self) -> None:
        if self.grows not in GROWS:
            raise ValueError(f"index kind {self.name!r}: grows must be one of {', '.join(GROWS)}")


FLOAT_KINDS: dict[str, IndexKind] = {}
BARCODE_KINDS: dict[str, IndexKind] = {}


def register(kind: IndexKind) -> IndexKind:
    """Add a kind to its table (float or barcode); a name already taken is an error."""
    table = BARCODE_KINDS if kind.binary else FLOAT_KINDS
    if kind.name in table:
        raise ValueError(f"index kind {kind.name!r} is already registered")
    table[kind.name] = kind
    return kind


def unregister(name: str, binary: bool = False) -> None:
    """Remove a kind (tests that register a throwaway one clean up with this)."""
    (BARCODE_KINDS if binary else FLOAT_KINDS).pop(name)


def float_kind(name: str | IndexKind) -> IndexKind:
    """The row of a float index kind; an unknown name is a one-line HistoError listing the known ones."""
    return _lookup(name, FLOAT_KINDS, "index type")


def barcode_kind(name: str | IndexKind) -> IndexKind:
    """The row of a barcode (binary) index kind."""
    return _lookup(name, BARCODE_KINDS, "barcode index kind")


def _lookup(name: str | IndexKind, table: Mapping[str, IndexKind], what: str) -> IndexKind:
    if isinstance(name, IndexKind):
        return name
    if name not in table:
        raise HistoError(f"unknown {what} {name!r} (choose from {', '.join(table)})")
    return table[name]


def kind_names(binary: bool = False) -> list[str]:
    """Registered kind names in registration order (the config's and `histo index --type`'s choices)."""
    return list(BARCODE_KINDS if binary else FLOAT_KINDS)


def check_name(name: str, binary: bool = False) -> str:
    """`name` if registered, else ValueError worded as pydantic words a Literal (for the typed config)."""
    names = kind_names(binary)
    if name not in names:
        quoted = [repr(n) for n in names]
        listed = f"{', '.join(quoted[:-1])} or {quoted[-1]}" if len(quoted) > 1 else quoted[0]
        raise ValueError(f"input should be {listed}, got {name!r}")
    return name


register(IndexKind("flat", "Flat", "exact (flat L2)", exact=True, barcodes="flat"))
register(IndexKind("ivf", "IVF{nlist},Flat", "IVF-Flat", tunes=NPROBE, trainable=True))
register(
    IndexKind(
        "ivfpq",
        "IVF{nlist},PQ{pq_m}x{pq_nbits}np",  # np: no polysemous training (codes as IndexIVFPQ makes them)
        "IVF-PQ with exact re-ranking",
        tunes=NPROBE,
        rerank=True,
        trainable=True,
    )
)
register(
    IndexKind(
        "hnsw",
        "IDMap,HNSW{hnsw_m},Flat",
        "HNSW-Flat",
        tunes=EF_SEARCH,
        gpu=False,
        grows="rewrite",  # FAISS has no merge of HNSW graphs: the graph takes the new rows in place
        removes=False,  # nor a deletion of a graph node: removed rows become filtered tombstones
    )
)
# The FAISS guideline's index for 1e6-1e7 vectors: IVF whose coarse quantizer is an HNSW graph over the
# centroids, so nlist can grow to 2**16 and beyond without a flat scan of the centroids per query.
register(
    IndexKind(
        "ivf_hnsw",
        "IVF{nlist}_HNSW{hnsw_m},Flat",
        "IVF-Flat with an HNSW coarse quantizer",
        tunes=NPROBE,
        gpu=False,  # its quantizer is a CPU HNSW graph; not measured with faiss-gpu here
        trainable=True,
    )
)
register(IndexKind("flat", "BFlat", "exact Hamming", binary=True))
register(IndexKind("ivf", "BIVF{nlist}", "binary IVF", tunes=NPROBE, trainable=True, binary=True))
