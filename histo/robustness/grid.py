"""The grid of one model: its clean evaluation and every corruption x severity, as cells and tidy rows.

Each cell is an item of `histo.batch.run_batch` (its outcome: done, skipped when complete in an earlier
run, failed with a reason). Results are tidy rows, one per (model, corruption, severity, metric):
severity 0 is the clean evaluation (corruption "clean"); a row's status is "done" (it holds a value) or
"failed" (no metric). A cell's random draws depend on (seed, corruption, severity, item key) only, so
the cells may run in any order and a resumed grid gives the same values.
"""

from __future__ import annotations

import contextlib
import math
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from histo.batch import Outcome, run_batch
from histo.errors import HistoError

CLEAN = "clean"
CorruptionFn = Callable[[Any, int, np.random.Generator], Any]
#: corrupt(x, key) -> corrupted x, deterministic for (grid seed, corruption, severity, key).
CorruptFn = Callable[[Any, int], Any]
#: evaluate(corrupt) -> {metric: value}: one whole evaluation with its inputs passed through `corrupt`.
Evaluate = Callable[[CorruptFn], Mapping[str, float]]


def parse_severities(text: str) -> list[int]:
    """'1-5' -> [1, 2, 3, 4, 5]; '1,3,5' -> [1, 3, 5]; each in 1..5."""
    values: list[int] = []
    try:
        for part in text.split(","):
            lo, _, hi = part.strip().partition("-")
            values.extend(range(int(lo), int(hi or lo) + 1))
    except ValueError:
        raise HistoError(f"expected e.g. 1-5 or 1,3,5, got {text!r}") from None
    if not values or any(not 1 <= v <= 5 for v in values):
        raise HistoError(f"every severity must be in 1..5, got {text!r}")
    return sorted(set(values))


def select_corruptions(text: str | None, known: Iterable[str]) -> list[str]:
    """A comma-separated list checked against the known names (None or 'all' -> all of them)."""
    known = list(known)
    if text is None or text.strip() in ("", "all"):
        return known
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise HistoError(f"unknown corruption(s) {', '.join(unknown)}; known: {', '.join(known)}")
    return names


def cell_seed(seed: int, corruption: str, severity: int, key: int) -> np.random.Generator:
    """The generator for one item of one grid cell: independent of the order the cells run in."""
    return np.random.default_rng([seed, zlib.crc32(corruption.encode()), severity, key])


def _corrupter(fn: CorruptionFn, name: str, severity: int, seed: int) -> CorruptFn:
    def corrupt(x: Any, key: int = 0) -> Any:
        return fn(x, severity, cell_seed(seed, name, severity, key))

    return corrupt


def _identity(x: Any, key: int = 0) -> Any:
    return x


@dataclass(frozen=True)
class Cell:
    """One (model, corruption, severity) evaluation of a grid: an item of `histo.batch.run_batch`."""

    model: str
    corruption: str
    severity: int
    alpha_bn: float | None = None

    @property
    def id(self) -> str:
        return f"{self.model}:{self.corruption}:{self.severity}"

    @property
    def path(self) -> None:
        return None

    def key(self) -> tuple[str, str, int]:
        return self.model, self.corruption, self.severity


def run_cells(
    evaluate: Evaluate,
    corruptions: Mapping[str, CorruptionFn],
    severities: Sequence[int],
    *,
    model: str = "model",
    seed: int = 0,
    alpha_bn: float | None = None,
    module: Any = None,
    done: Sequence[Mapping[str, Any]] = (),
    on_cell: Callable[[list[dict]], None] | None = None,
    progress: bool = True,
) -> list[tuple[Cell, Outcome]]:
    """Evaluate clean and every corruption x severity: (cell, outcome) pairs, the cells complete in
    `done` rows skipped. A cell's data fault fails it and the grid goes on (histo.batch's policy).

    With `alpha_bn`, every evaluation runs inside `histo.calibration.alpha_bn_mode(module, alpha_bn)`.
    `on_cell(rows so far)` lets the caller save progress. A done outcome's detail: model, corruption,
    severity, alpha_bn, metrics.
    """
    if alpha_bn is not None and module is None:
        raise HistoError("alpha_bn needs the module to calibrate")
    finished: dict[tuple[str, str, int], dict[str, float]] = {}
    for r in done:
        if r.get("status") == "done":
            key = (r["model"], r["corruption"], int(r["severity"]))
            finished.setdefault(key, {})[r["metric"]] = float(r["value"])
    cells = [Cell(model, CLEAN, 0, alpha_bn)]
    cells += [Cell(model, name, s, alpha_bn) for name in corruptions for s in severities]

    def run_cell(cell: Cell) -> Outcome:
        name, severity = cell.corruption, cell.severity
        corrupt = _identity if name == CLEAN else _corrupter(corruptions[name], name, severity, seed)
        with _calibration(module, alpha_bn):
            metrics = {k: float(v) for k, v in evaluate(corrupt).items()}
        return Outcome.done(cell.id, None, **_cell_detail(cell), metrics=metrics)

    def resumed(cell: Cell) -> dict | None:
        metrics = finished.get(cell.key())
        return None if metrics is None else {**_cell_detail(cell), "metrics": metrics}

    pairs: list[tuple[Cell, Outcome]] = []

    def saved(cell: Cell, outcome: Outcome) -> None:
        pairs.append((cell, outcome))
        if on_cell is not None:
            on_cell(cell_rows(pairs))

    outcomes = run_batch(
        cells, run_cell, is_done=resumed, on_outcome=saved, desc=f"robustness {model}", unit="cell",
        progress=progress,
    )  # fmt: skip
    return list(zip(cells, outcomes, strict=True))


def _cell_detail(cell: Cell) -> dict[str, Any]:
    return {
        "model": cell.model,
        "corruption": cell.corruption,
        "severity": cell.severity,
        "alpha_bn": cell.alpha_bn,
    }


def cell_rows(pairs: Sequence[tuple[Cell, Outcome]]) -> list[dict]:
    """Tidy rows of evaluated cells: one per metric of a cell done or skipped (status "done"), one
    without a metric for a failed cell (status "failed" and its reason)."""
    rows: list[dict] = []
    for cell, outcome in pairs:
        base = {"model": cell.model, "corruption": cell.corruption, "severity": cell.severity}
        if outcome.status == "failed":
            rows.append({**base, "metric": "", "value": math.nan, "alpha_bn": cell.alpha_bn,
                         "status": "failed", "reason": outcome.reason})  # fmt: skip
            continue
        rows += [
            {**base, "metric": k, "value": v, "alpha_bn": cell.alpha_bn, "status": "done", "reason": ""}
            for k, v in outcome.detail["metrics"].items()
        ]
    return rows


def run_grid(
    evaluate: Evaluate, corruptions: Mapping[str, CorruptionFn], severities: Sequence[int], **options: Any
) -> list[dict]:
    """`run_cells` as tidy rows (see `cell_rows`); `options` are those of `run_cells`."""
    return cell_rows(run_cells(evaluate, corruptions, severities, **options))


def _calibration(module: Any, alpha: float | None):
    if alpha is None:
        return contextlib.nullcontext()
    from histo.calibration import alpha_bn_mode

    return alpha_bn_mode(module, alpha)
