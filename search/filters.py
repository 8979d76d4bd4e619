"""Filtered search: which indexed slides a query may return (`--where key=v1,v2`), and the row filter that
the first stage hands to FAISS.

A filter is a mapping key -> allowed values over the catalog's `label`, `site`, `project` and `patient`:
a slide passes when, for every key, its value is one of the allowed ones (AND across keys, OR within one).
A slide without a value for a key never passes a filter on that key. On the command line each
`--where key=v1,v2` is one clause; a key given twice keeps the values both clauses allow.

The first stage of the two-stage search then runs its tile kNN over the allowed slides' rows only (FAISS id
selectors, or the exact kernel restricted to them; search/index.py, search/barcodes.py), so the search stays
exact within the filter instead of post-filtering a kNN that the excluded slides may fill.

How each index kind takes a filter: a filter that excludes few rows (a patient's slides) widens the kNN
by the excluded rows and drops them (`widened`). Otherwise the flat kinds search the allowed rows exactly
(FAISS id selectors, the exact kernel restricted to them); an IVF index scans, per query, its lists nearest
first until it has met as many allowed vectors as an unfiltered search meets in its `nprobe` nearest lists
(`ListPlan`; a binary IVF ranks and visits only the lists holding an allowed vector, merged into groups of
about the unfiltered list size, `ListGroups`), so a filter that excludes the query's own neighbourhood (a
label the query does not have) sends it on to farther lists instead of returning fewer, worse neighbours;
an HNSW graph gets efSearch divided by the allowed fraction.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from histo.errors import HistoError

# filter key -> the Catalog attribute holding that value per slide
FILTER_KEYS = {"label": "labels", "site": "sites", "project": "projects", "patient": "patients"}
Where = dict[str, frozenset[str]]


def parse_where(clauses: Sequence[str]) -> Where:
    """`["site=A,B", "label=X"]` -> {"site": {"A", "B"}, "label": {"X"}}; a bad clause is a one-line error."""
    where: Where = {}
    for clause in clauses:
        key, sep, values = clause.partition("=")
        allowed = frozenset(v.strip() for v in values.split(",") if v.strip())
        if not sep or not allowed:
            raise HistoError(f"--where {clause!r}: expected key=value[,value...], e.g. site=A,B")
        key = key.strip()
        _check_key(key, f"--where {clause!r}")
        where[key] = where.get(key, allowed) & allowed
        if not where[key]:
            raise HistoError(f"--where {clause!r}: no {key} value is allowed by every clause on {key}")
    return where


def where_of(value: Mapping[str, Any] | Sequence[str] | None) -> Where:
    """The filter of an API argument: None, clauses as on the command line, or {key: value or values}."""
    if value is None:
        return {}
    if isinstance(value, (list, tuple)):
        return parse_where(list(value))
    if not isinstance(value, Mapping):
        raise HistoError(f"where: expected a mapping of key -> values, got {type(value).__name__}")
    where: Where = {}
    for key, values in value.items():
        _check_key(key, "where")
        where[key] = frozenset([values] if isinstance(values, str) else (str(v) for v in values))
    return where


def _check_key(key: str, source: str) -> None:
    if key not in FILTER_KEYS:
        raise HistoError(f"{source}: unknown key {key!r} (filter on {', '.join(FILTER_KEYS)})")


def slide_mask(catalog: Any, where: Where) -> np.ndarray:
    """Boolean mask of the catalog's slides that pass `where`; no passing slide is a one-line error that
    names the values the index has for the first key that matches nothing."""
    mask = np.ones(len(catalog), dtype=bool)
    for key, allowed in where.items():
        values = getattr(catalog, FILTER_KEYS[key])
        passes = np.array([v in allowed for v in values], dtype=bool)
        if not passes.any():
            known = sorted({v for v in values if v is not None})
            raise HistoError(
                f"no indexed slide has {key}={','.join(sorted(allowed))} "
                f"(the index has {key}: {', '.join(known) if known else 'none recorded'})"
            )
        mask &= passes
    if not mask.any():
        clauses = " and ".join(f"{k}={','.join(sorted(v))}" for k, v in where.items())
        raise HistoError(f"no indexed slide has {clauses}")
    return mask


def recorded_where(where: Where) -> dict[str, list[str]]:
    """A filter as JSON (recorded in a result's `search` info)."""
    return {key: sorted(values) for key, values in where.items()}


def row_selector(rows: np.ndarray) -> tuple[Any, np.ndarray]:
    """A FAISS IDSelectorBitmap of the True rows (ids = row numbers) and the bitmap it reads, which the
    caller keeps alive for the duration of the search. Ids outside the bitmap (-1: a tombstone) fail it."""
    import faiss

    bits = np.packbits(np.asarray(rows, dtype=bool), bitorder="little")
    return faiss.IDSelectorBitmap(len(rows), faiss.swig_ptr(bits)), bits


def scaled(value: int, allowed_fraction: float, limit: int) -> int:
    """A calibrated search breadth (nprobe, efSearch) for a filtered search: divided by the allowed fraction
    so as many allowed vectors are visited as without a filter, at most `limit`."""
    return int(min(limit, max(value, round(value / max(allowed_fraction, 1e-12)))))


FEW_EXCLUDED = 4  # a kNN with at most this many times k rows excluded widens instead (`widened`)
CACHED_FILTERS = 8  # filters whose per-list counts (and binary views) an index keeps


def widened(
    search: Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]],
    queries: np.ndarray,
    k: int,
    rows: np.ndarray,
) -> tuple[np.ndarray, np.ndarray] | None:
    """When few rows are excluded (a patient's slides), the unfiltered kNN of k + the excluded rows with the
    excluded ones dropped, which holds k allowed neighbours (exact for an exact search); else None."""
    excluded = len(rows) - int(np.count_nonzero(rows))
    if excluded > FEW_EXCLUDED * k:
        return None
    dist, ids = search(queries, min(len(rows), k + excluded))
    keep = (ids >= 0) & rows[np.maximum(ids, 0)]
    order = np.argsort(~keep, axis=1, kind="stable")[:, :k]  # the kept neighbours first, in their order
    dist, ids, keep = (np.take_along_axis(a, order, 1) for a in (dist, ids, keep))
    return np.where(keep, dist, np.inf if dist.dtype.kind == "f" else np.iinfo(dist.dtype).max), np.where(
        keep, ids, -1
    )


def digest(rows: np.ndarray) -> bytes:
    """A short key of a row filter (for the caches of filtered searches)."""
    import hashlib

    return hashlib.blake2b(np.packbits(rows).tobytes(), digest_size=16).digest()


@dataclass
class LastFilter:
    """The digest of the last row filter, reused while the same read-only mask comes again (the catalog
    caches one per filter): hashing a 1M-row mask cost 0.12-0.18 ms of every filtered first stage."""

    last: tuple[np.ndarray, bytes] | None = None  # one attribute: two threads never pair a mask and a key

    def digest(self, rows: np.ndarray) -> bytes:
        last = self.last
        if last is None or rows is not last[0] or rows.flags.writeable:
            last = self.last = rows, digest(rows)
        return last[1]


@dataclass
class ListPlan:
    """The membership of an IVF index's lists (read once) and which lists a filtered search scans: per
    query its nearest lists until they hold as many allowed vectors as its `nprobe` nearest lists hold
    vectors (at least `nprobe` lists)."""

    starts: np.ndarray  # (nlist + 1,) list i holds members[starts[i]:starts[i + 1]]
    members: np.ndarray  # the ids of every list, list after list
    list_of: np.ndarray  # the list of each entry of `members`
    _allowed: dict[bytes, np.ndarray] = field(default_factory=dict, repr=False)

    @classmethod
    def of(cls, invlists: Any) -> ListPlan:
        import faiss

        sizes = np.array([invlists.list_size(i) for i in range(invlists.nlist)], dtype=np.int64)
        starts = np.concatenate([[0], np.cumsum(sizes)])
        members = np.empty(int(starts[-1]), dtype=np.int64)
        for i in np.flatnonzero(sizes):
            members[starts[i] : starts[i + 1]] = faiss.rev_swig_ptr(invlists.get_ids(int(i)), int(sizes[i]))
        return cls(starts, members, np.repeat(np.arange(len(sizes), dtype=np.int32), sizes))

    @property
    def sizes(self) -> np.ndarray:
        return np.diff(self.starts)

    def allowed_sizes(self, rows: np.ndarray, key: bytes) -> np.ndarray:
        """Allowed vectors per list (cached per filter)."""
        if key not in self._allowed:
            if len(self._allowed) >= CACHED_FILTERS:
                self._allowed.pop(next(iter(self._allowed)))
            counts = np.bincount(self.list_of, weights=rows[self.members], minlength=len(self.sizes))
            self._allowed[key] = counts.astype(np.int64)
        return self._allowed[key]

    def width(self, rows: np.ndarray, nprobe: int) -> int:
        """How many nearest lists to rank per query: enough for the allowed fraction, at most all."""
        fraction = max(np.count_nonzero(rows) / max(1, len(rows)), 1e-9)
        return int(min(len(self.sizes), max(4 * nprobe, math.ceil(4 * nprobe / fraction))))

    def probes(self, lists: np.ndarray, allowed_sizes: np.ndarray, nprobe: int) -> np.ndarray:
        """The lists each query scans, from its `lists` nearest first (Q, width); -1 marks one not scanned."""
        safe = np.maximum(lists, 0)
        met = np.where(lists >= 0, allowed_sizes[safe], 0).cumsum(axis=1)
        target = np.where(lists[:, :nprobe] >= 0, self.sizes[safe[:, :nprobe]], 0).sum(axis=1)
        needed = np.maximum(nprobe, (met < target[:, None]).sum(axis=1) + 1)
        return np.ascontiguousarray(np.where(np.arange(lists.shape[1])[None, :] < needed[:, None], lists, -1))

    def nearest_lists(self, distances: np.ndarray, nprobe: int) -> tuple[np.ndarray, np.ndarray]:
        """Per query (rows of its distances to every centroid): the vectors its nprobe nearest lists hold
        (ties: the lower lists) and the distance of the nprobe-th. By a partition of the distances, not a
        sort (0.03 against 0.35 ms for 32 query tiles and 4,000 lists)."""
        nprobe = min(nprobe, distances.shape[1])
        reach = np.partition(distances, nprobe - 1, axis=1)[:, nprobe - 1]
        below = distances < reach[:, None]
        spare = nprobe - np.count_nonzero(
            below, axis=1
        )  # lists at the reach that still fit, lower ones first
        rows, cols = np.divmod(np.flatnonzero(distances == reach[:, None]), distances.shape[1])  # in order
        rank = np.arange(len(rows)) - np.searchsorted(rows, np.arange(len(distances)))[rows]
        fit = rank < spare[rows]
        sizes = self.sizes.astype(np.float64)  # exact: sums of list sizes are far below 2**53
        tied = np.bincount(rows[fit], weights=sizes[cols[fit]], minlength=len(distances))
        return (below.astype(np.float64) @ sizes + tied).astype(np.int64), reach

    def probes_among(
        self, distances: np.ndarray, allowed_sizes: np.ndarray, nprobe: int, groups: ListGroups | None = None
    ) -> np.ndarray:
        """`probes` for a query's distances to every centroid (Q, nlist), ranking only the lists that hold an
        allowed vector (Q, width; -1 marks one not scanned): nearest first (ties: the lower list), until they
        hold as many allowed vectors as its `nprobe` nearest lists hold vectors, and at least every one as
        near as its nprobe-th nearest list. Lists without an allowed vector are never ranked nor visited: in a
        10 % filter's view of 1M codes in 4,000 lists, 7 of 10 lists `probes` takes are empty.
        With `groups` the same rule ranks and returns groups of lists (a group as near as its nearest list)."""
        target, reach = self.nearest_lists(distances, nprobe)
        if groups is None:
            names = np.flatnonzero(allowed_sizes > 0)
            unit_distances, unit_sizes = distances[:, names], allowed_sizes[names]
        else:
            names, unit_distances, unit_sizes = (
                np.arange(len(groups.sizes)),
                groups.distances(distances),
                groups.sizes,
            )
        order = np.argsort(unit_distances, axis=1, kind="stable")
        met = unit_sizes[order].cumsum(axis=1)
        near = np.take_along_axis(unit_distances, order, 1) <= reach[:, None]
        needed = np.minimum(len(names), np.maximum((met < target[:, None]).sum(axis=1) + 1, near.sum(axis=1)))
        width = max(1, int(needed.max(initial=0)))
        lists = np.full((len(distances), width), -1, dtype=np.int64)
        lists[:, : order.shape[1]] = names[order[:, :width]]
        return np.ascontiguousarray(np.where(np.arange(width)[None, :] < needed[:, None], lists, -1))


@dataclass
class ListGroups:
    """A filter's IVF lists that hold an allowed vector, merged into groups of about the unfiltered mean list
    size (weighted k-means of their centroids' bits): a 10-25 % filter's view otherwise spreads its allowed
    codes over 4-7x more, smaller lists than an unfiltered search scans, and each list is a new place in
    memory (a third of the filtered scan's time at 1M codes)."""

    group_of: np.ndarray  # (nlist,) the group of each list; -1: it holds no allowed vector
    sizes: np.ndarray  # (groups,) allowed vectors per group
    _order: np.ndarray = field(repr=False)  # the holding lists, group after group
    _starts: np.ndarray = field(repr=False)  # group g's lists are _order[_starts[g]:_starts[g + 1]]

    @classmethod
    def of(cls, centroid_codes: np.ndarray, allowed_sizes: np.ndarray, mean_size: float) -> ListGroups:
        """Groups of the binary centroids (packed, one per list) of the lists holding an allowed vector; a
        list stays alone when the filter leaves no more lists than groups."""
        import faiss

        holding = np.flatnonzero(allowed_sizes > 0)
        n_groups = max(1, round(float(allowed_sizes.sum()) / max(mean_size, 1.0)))
        assigned = np.arange(len(holding))
        if n_groups < len(holding):
            bits = np.unpackbits(centroid_codes[holding], axis=1, bitorder="little").astype(np.float32)
            kmeans = faiss.Kmeans(
                bits.shape[1],
                n_groups,
                niter=10,
                seed=1,
                min_points_per_centroid=1,
                max_points_per_centroid=len(holding),
            )
            kmeans.train(bits, weights=allowed_sizes[holding].astype(np.float32))
            assigned = np.unique(kmeans.index.search(bits, 1)[1][:, 0], return_inverse=True)[1]
        group_of = np.full(len(allowed_sizes), -1, dtype=np.int64)
        group_of[holding] = assigned
        order = holding[np.argsort(assigned, kind="stable")]
        counts = np.bincount(assigned)
        sizes = np.bincount(assigned, weights=allowed_sizes[holding]).astype(np.int64)
        return cls(group_of, sizes, order, np.concatenate([[0], np.cumsum(counts)]))

    def distances(self, list_distances: np.ndarray) -> np.ndarray:
        """Each query's distance to every group (Q, groups): to its nearest list."""
        return np.minimum.reduceat(list_distances[:, self._order], self._starts[:-1], axis=1)
