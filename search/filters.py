"""Filtered search: which indexed slides a query may return (`--where key=v1,v2`), and the row filter that
the first stage hands to FAISS.

A filter is a mapping key -> allowed values over the catalog's `label`, `site`, `project` and `patient`:
a slide passes when, for every key, its value is one of the allowed ones (AND across keys, OR within one).
A slide without a value for a key never passes a filter on that key. On the command line each
`--where key=v1,v2` is one clause; a key given twice keeps the values both clauses allow.

The first stage of the two-stage search then runs its tile kNN over the allowed slides' rows only (FAISS id
selectors, or the exact kernel restricted to them; search/index.py, search/barcodes.py), so the search stays
exact within the filter instead of post-filtering a kNN that the excluded slides may fill.

An IVF index probes, per query, its lists nearest first until it has met as many allowed vectors as an
unfiltered search meets in its `nprobe` nearest lists (`ListPlan`): a filter that excludes the query's own
neighbourhood (a label the query does not have) sends it on to farther lists instead of returning fewer,
worse neighbours, and excluded vectors cost an id check, not a distance.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
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


@dataclass(frozen=True)
class ListPlan:
    """The membership of an IVF index's lists (read once) and which lists a filtered search scans."""

    starts: np.ndarray  # (nlist + 1,) list i holds members[starts[i]:starts[i + 1]]
    members: np.ndarray  # the ids of every list, list after list
    list_of: np.ndarray  # the list of each entry of `members`

    @classmethod
    def of(cls, invlists: Any) -> ListPlan:
        import faiss

        sizes = np.array([invlists.list_size(i) for i in range(invlists.nlist)], dtype=np.int64)
        starts = np.concatenate([[0], np.cumsum(sizes)])
        members = np.empty(int(starts[-1]), dtype=np.int64)
        for i in np.flatnonzero(sizes):
            members[starts[i] : starts[i + 1]] = faiss.rev_swig_ptr(invlists.get_ids(int(i)), int(sizes[i]))
        return cls(starts, members, np.repeat(np.arange(len(sizes), dtype=np.int32), sizes))

    def probes(
        self, quantizer: Any, queries: np.ndarray, allowed: np.ndarray, nprobe: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """(lists (Q, L), their coarse distances) each query scans within the `allowed` rows: its nearest
        lists until they hold as many allowed vectors as its `nprobe` nearest hold vectors (at least
        `nprobe` lists); -1 marks a list not scanned."""
        sizes = np.diff(self.starts)
        allowed_sizes = np.bincount(self.list_of, weights=allowed[self.members], minlength=len(sizes))
        fraction = max(np.count_nonzero(allowed) / max(1, len(allowed)), 1e-9)
        width = int(min(len(sizes), max(4 * nprobe, math.ceil(4 * nprobe / fraction))))
        distances, lists = quantizer.search(queries, width)
        safe = np.maximum(lists, 0)
        met = np.where(lists >= 0, allowed_sizes[safe], 0).cumsum(axis=1)
        target = np.where(lists[:, :nprobe] >= 0, sizes[safe[:, :nprobe]], 0).sum(axis=1)
        needed = np.maximum(nprobe, (met < target[:, None]).sum(axis=1) + 1)
        scanned = np.where(np.arange(width)[None, :] < needed[:, None], lists, -1)
        return np.ascontiguousarray(scanned), np.ascontiguousarray(distances)

    def rows(self, lists: np.ndarray) -> np.ndarray:
        """The ids held by `lists` (-1 entries skipped), list after list."""
        lists = lists[lists >= 0]
        lens = np.diff(self.starts)[lists]
        within = np.arange(lens.sum()) - np.repeat(np.cumsum(lens) - lens, lens)
        return self.members[np.repeat(self.starts[lists], lens) + within]
