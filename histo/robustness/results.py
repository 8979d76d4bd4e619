"""The tidy results CSV of a study: one row per (model, corruption, severity, metric), read back to resume."""

from __future__ import annotations

import csv
import io
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from histo.io import atomic_write_text

FIELDS = ("model", "corruption", "severity", "metric", "value", "alpha_bn", "status", "reason")
LEGACY_STATUS = {"ok": "done"}  # results.csv of earlier releases called a cell's valid row "ok"


def usable(row: Mapping[str, Any], metric: str) -> bool:
    """A row holding a value of `metric` (a failed cell's row holds none)."""
    return row.get("status", "done") == "done" and row["metric"] == metric


def rows_to_csv(rows: Sequence[Mapping[str, Any]], fields: Sequence[str] | None = None) -> str:
    """CSV text of dict rows (columns: `fields`, else the first row's keys)."""
    fields = list(fields) if fields is not None else (list(rows[0]) if rows else list(FIELDS))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fields, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def read_rows(path: str | os.PathLike) -> list[dict]:
    """Rows of a results CSV written by `write_rows` (for resuming); [] if it does not exist."""
    path = Path(path)
    if not path.exists():
        return []
    rows = list(csv.DictReader(path.open()))
    for r in rows:
        r["status"] = LEGACY_STATUS.get(r["status"], r["status"])
        r["severity"] = int(r["severity"])
        r["value"] = float(r["value"]) if r["value"] not in ("", "nan") else math.nan
        r["alpha_bn"] = float(r["alpha_bn"]) if r.get("alpha_bn") not in (None, "", "None") else None
    return rows


def write_rows(path: str | os.PathLike, rows: Sequence[Mapping[str, Any]]) -> None:
    """Atomically (re)write the tidy results CSV."""
    atomic_write_text(path, rows_to_csv(rows, FIELDS))
