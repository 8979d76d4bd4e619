"""Filtered search: which indexed slides a query may return (`--where key=v1,v2`), and the row filter that
the first stage hands to FAISS.

A filter is a mapping key -> allowed values over the catalog's `label`, `site`, `project` and `patient`:
a slide passes when, for every key, its value is one of the allowed ones (AND across keys, OR within one).
A slide without a value for a key never passes a filter on that key. On the command line each
`--where key=v1,v2` is one clause; a key given twice keeps the values both clauses allow.

The first stage of the two-stage search then runs its tile kNN over the allowed slides' rows only (FAISS id
selectors, or the exact kernel restricted to them; search/index.py, search/barcodes.py), so the search stays
exact within the filter instead of post-filtering a kNN that the excluded slides may fill.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
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
