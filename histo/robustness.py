"""Corruption-robustness harness: run an evaluation over corruption x severity, ImageNet-C metrics, plots.

Domain code (pathology, segmentation) supplies the corruption table and an `evaluate(corrupt)` callable;
this module never imports a domain package. Results are tidy rows, one per
(model, corruption, severity, metric): severity 0 is the clean evaluation (corruption "clean").
Each cell is an item of `histo.batch.run_batch` (its outcome: done, skipped when complete in an earlier
run, failed with a reason); a row's status is "done" (it holds a value) or "failed" (no metric).

ImageNet-C metrics (Hendrycks & Dietterich, ICLR 2019), with E the error (1 - score for a score metric):
    CE_c  = sum_s E(s, c) / sum_s E_ref(s, c)
    rCE_c = sum_s (E(s, c) - E_clean) / sum_s (E_ref(s, c) - E_ref,clean)
    mCE = mean_c CE_c,  relative mCE = mean_c rCE_c
against a fixed reference model (for us the plain-BN model of the same task).
"""

from __future__ import annotations

import contextlib
import csv
import io
import math
import os
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from histo.batch import BatchSummary, Outcome, run_batch
from histo.errors import HistoError
from histo.io import atomic_write_json, atomic_write_text, check_run_settings

CLEAN = "clean"
CorruptionFn = Callable[[Any, int, np.random.Generator], Any]
#: corrupt(x, key) -> corrupted x, deterministic for (grid seed, corruption, severity, key).
CorruptFn = Callable[[Any, int], Any]
FIELDS = ("model", "corruption", "severity", "metric", "value", "alpha_bn", "status", "reason")
LEGACY_STATUS = {"ok": "done"}  # results.csv of earlier releases called a cell's valid row "ok"


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
    evaluate: Callable[[CorruptFn], Mapping[str, float]],
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

    `evaluate(corrupt)` runs the whole evaluation with inputs passed through `corrupt(x, key)` and
    returns {metric: value}. With `alpha_bn`, every evaluation runs inside
    `histo.calibration.alpha_bn_mode(module, alpha_bn)`. `on_cell(rows so far)` lets the caller save
    progress. A done outcome's detail: model, corruption, severity, alpha_bn, metrics.
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
    evaluate: Callable[[CorruptFn], Mapping[str, float]],
    corruptions: Mapping[str, CorruptionFn],
    severities: Sequence[int],
    **options: Any,
) -> list[dict]:
    """`run_cells` as tidy rows (see `cell_rows`); `options` are those of `run_cells`."""
    return cell_rows(run_cells(evaluate, corruptions, severities, **options))


def _calibration(module: Any, alpha: float | None):
    if alpha is None:
        return contextlib.nullcontext()
    from histo.calibration import alpha_bn_mode

    return alpha_bn_mode(module, alpha)


# ---------------------------------------------------------------- ImageNet-C metrics


@dataclass
class CorruptionErrors:
    """CE, relative CE (per model and corruption), mCE and relative mCE (per model) for one metric."""

    metric: str
    reference: str
    ce: dict[str, dict[str, float]] = field(default_factory=dict)
    rce: dict[str, dict[str, float]] = field(default_factory=dict)
    mce: dict[str, float] = field(default_factory=dict)
    rmce: dict[str, float] = field(default_factory=dict)

    def to_rows(self) -> list[dict]:
        """One row per (model, corruption) plus a 'mean' row per model."""
        out = []
        for model, per in self.ce.items():
            for c, v in per.items():
                out.append(
                    {
                        "model": model,
                        "corruption": c,
                        "metric": self.metric,
                        "ce": v,
                        "rce": self.rce[model][c],
                    }
                )
            out.append(
                {
                    "model": model,
                    "corruption": "mean",
                    "metric": self.metric,
                    "ce": self.mce[model],
                    "rce": self.rmce[model],
                }
            )
        return out


def _usable(row: Mapping[str, Any], metric: str) -> bool:
    """A row holding a value of `metric` (a failed cell's row holds none)."""
    return row.get("status", "done") == "done" and row["metric"] == metric


def error_table(rows: Sequence[Mapping[str, Any]], metric: str, higher_is_better: bool = True) -> dict:
    """{(model, corruption, severity): error} from tidy rows; error = 1 - value for a score metric."""
    table = {}
    for r in rows:
        if _usable(r, metric):
            v = float(r["value"])
            table[(r["model"], r["corruption"], int(r["severity"]))] = 1.0 - v if higher_is_better else v
    return table


def _ratio(num: float, den: float) -> float:
    return num / den if den != 0 else math.nan


def _finite_mean(values: Iterable[float]) -> float:
    """Mean over the corruptions whose CE is defined (NaN when none is)."""
    finite = [v for v in values if math.isfinite(v)]
    return float(np.mean(finite)) if finite else math.nan


def corruption_errors(
    rows: Sequence[Mapping[str, Any]], reference: str, metric: str, higher_is_better: bool = True
) -> CorruptionErrors:
    """ImageNet-C CE / relative CE / mCE / relative mCE of every model in `rows` against `reference`.

    Sums run over the severities the reference has for each corruption; a model missing one of them,
    or a reference without a clean row, is an error (a CE over different severities is meaningless).
    A zero reference denominator gives NaN for that corruption, and mCE averages the defined CEs.
    """
    err = error_table(rows, metric, higher_is_better)
    models = sorted({m for m, _, _ in err})
    if reference not in models:
        raise HistoError(
            f"reference model {reference!r} has no {metric!r} results (models: {', '.join(models)})"
        )
    corruptions = sorted({c for m, c, _ in err if m == reference and c != CLEAN})
    result = CorruptionErrors(metric=metric, reference=reference)
    for model in models:
        ce, rce = {}, {}
        for c in corruptions:
            sev = sorted(s for m, cc, s in err if m == reference and cc == c)
            missing = [s for s in sev if (model, c, s) not in err]
            for who in {model, reference}:
                if (who, CLEAN, 0) not in err:
                    raise HistoError(f"model {who!r} has no clean {metric!r} result")
            if missing:
                raise HistoError(f"model {model!r} lacks {c} severities {missing} that the reference has")
            e = [err[(model, c, s)] for s in sev]
            e_ref = [err[(reference, c, s)] for s in sev]
            ce[c] = _ratio(sum(e), sum(e_ref))
            rce[c] = _ratio(
                sum(x - err[(model, CLEAN, 0)] for x in e), sum(x - err[(reference, CLEAN, 0)] for x in e_ref)
            )
        result.ce[model], result.rce[model] = ce, rce
        result.mce[model] = _finite_mean(ce.values())
        result.rmce[model] = _finite_mean(rce.values())
    return result


def mean_over_severities(rows: Sequence[Mapping[str, Any]], metric: str) -> dict[str, dict[str, float]]:
    """{model: {corruption: mean value over severities}} (clean included as its own column)."""
    acc: dict[tuple[str, str], list[float]] = {}
    for r in rows:
        if _usable(r, metric):
            acc.setdefault((r["model"], r["corruption"]), []).append(float(r["value"]))
    out: dict[str, dict[str, float]] = {}
    for (model, c), values in acc.items():
        out.setdefault(model, {})[c] = float(np.mean(values))
    return out


# ---------------------------------------------------------------- several models, resumable


@dataclass
class ModelRun:
    """One model to put through the grid: its label, evaluate(corrupt), and optional α-BN."""

    label: str
    evaluate: Callable[[CorruptFn], Mapping[str, float]]
    alpha_bn: float | None = None
    module: Any = None


def plan_runs(model: str | os.PathLike, reference: str | os.PathLike | None, alpha_bn: float | None):
    """[(label, checkpoint, alpha)] for the model, its α-BN variant and the reference, and the reference label.

    Without a reference, the uncalibrated model is the reference of its α-BN variant (when requested).
    """
    label = Path(model).name.split(".")[0]
    runs = [(label, model, None)]
    if alpha_bn is not None:
        runs.append((f"{label}+alphaBN{alpha_bn:g}", model, float(alpha_bn)))
    ref_label = label if alpha_bn is not None else None
    if reference is not None:
        ref_label = Path(reference).name.split(".")[0]
        ref_label = f"reference-{ref_label}" if ref_label == label else ref_label
        runs.append((ref_label, reference, None))
    return runs, ref_label


def resume_rows(out: str | os.PathLike, settings: Mapping[str, Any]) -> list[dict]:
    """Rows of an earlier run with the same settings in `out`; HistoError if `out` holds another run."""
    return read_rows(Path(out) / "results.csv") if check_run_settings(out, settings) else []


def run_study(
    runs: Sequence[ModelRun],
    corruptions: Mapping[str, CorruptionFn],
    severities: Sequence[int],
    out: str | os.PathLike,
    settings: Mapping[str, Any],
    metrics: Mapping[str, bool],
    reference: str | None = None,
    seed: int = 0,
    progress: bool = True,
) -> BatchSummary:
    """`run_cells` for every model into `out` (results.csv saved after each cell; a re-run resumes),
    then `report`. `settings` identify the run: a different run in the same `out` is refused.
    Returns the BatchSummary of every cell, the report's summary as its extras."""
    out = Path(out)
    rows = resume_rows(out, settings)
    outcomes: list[Outcome] = []
    for run in runs:
        others = [r for r in rows if r["model"] != run.label]
        pairs = run_cells(
            run.evaluate,
            corruptions,
            severities,
            model=run.label,
            seed=seed,
            alpha_bn=run.alpha_bn,
            module=run.module,
            done=[r for r in rows if r["model"] == run.label],
            on_cell=lambda new, others=others: write_rows(out / "results.csv", others + new),
            progress=progress,
        )
        rows = others + cell_rows(pairs)
        outcomes += [outcome for _, outcome in pairs]
    return BatchSummary(tuple(outcomes), out=str(out), extra=report(rows, out, metrics, reference=reference))


# ---------------------------------------------------------------- output


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


def plot_severity_curves(rows: Sequence[Mapping[str, Any]], metric: str, png_path: str | os.PathLike) -> Path:
    """One panel per corruption: `metric` against severity (0 = clean) with a line per model."""
    from histo.plots import plt, save_figure

    ok = [r for r in rows if _usable(r, metric)]
    corruptions = sorted({r["corruption"] for r in ok} - {CLEAN})
    models = sorted({r["model"] for r in ok})
    cols = min(4, max(1, len(corruptions)))
    nrows = max(1, math.ceil(len(corruptions) / cols))
    fig, axes = plt.subplots(nrows, cols, figsize=(3.6 * cols, 2.9 * nrows), squeeze=False, sharey=True)
    for ax, c in zip(axes.flat, corruptions, strict=False):
        for model in models:
            clean = [r["value"] for r in ok if r["model"] == model and r["corruption"] == CLEAN]
            pts = sorted(
                (r["severity"], r["value"]) for r in ok if r["model"] == model and r["corruption"] == c
            )
            pts = [(0, clean[0]), *pts] if clean else pts
            if pts:
                ax.plot(*zip(*pts, strict=False), marker="o", ms=3, label=model)
        ax.set_title(c, fontsize=9)
        ax.set_xlabel("severity")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(corruptions) :]:
        ax.axis("off")
    axes[0, 0].set_ylabel(metric)
    axes[0, 0].legend(fontsize=7)
    return save_figure(fig, png_path)


def plot_heatmap(values: Mapping[str, Mapping[str, float]], png_path: str | os.PathLike, title: str) -> Path:
    """Heat-map corruption (rows) x model (columns) of `values[model][corruption]`, annotated."""
    from histo.plots import plt, save_figure

    models = sorted(values)
    corruptions = sorted({c for per in values.values() for c in per})
    grid = np.array([[values[m].get(c, math.nan) for m in models] for c in corruptions], dtype=float)
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(models), 0.8 + 0.38 * len(corruptions)))
    image = ax.imshow(grid, aspect="auto", cmap="viridis")
    ax.set_xticks(range(len(models)), models, rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(len(corruptions)), corruptions, fontsize=8)
    for (i, j), v in np.ndenumerate(grid):
        text = f"{v:.3g}" if np.isfinite(v) else "n/a"
        ax.text(j, i, text, ha="center", va="center", fontsize=7, color="w" if np.isfinite(v) else "grey")
    fig.colorbar(image, ax=ax)
    ax.set_title(title, fontsize=10)
    return save_figure(fig, png_path)


def report(
    rows: Sequence[Mapping[str, Any]],
    out_dir: str | os.PathLike,
    metrics: Mapping[str, bool],
    reference: str | None = None,
) -> dict:
    """Write results.csv, per-metric curves and heat-maps, CE tables (when a reference is given) and
    summary.json; return the summary. `metrics` maps metric name -> higher_is_better."""
    out = Path(out_dir)
    write_rows(out / "results.csv", rows)
    summary: dict[str, Any] = {
        "reference": reference,
        "metrics": {},
        "files": ["results.csv"],
    }
    for metric, higher in metrics.items():
        if not any(r["metric"] == metric for r in rows):
            continue
        entry: dict[str, Any] = {"mean": mean_over_severities(rows, metric)}
        curves = plot_severity_curves(rows, metric, out / f"curves_{metric}.png")
        summary["files"].append(curves.name)
        heat_values = entry["mean"]
        title = f"mean {metric} over severities"
        if reference is not None:
            errors = corruption_errors(rows, reference, metric, higher)
            entry.update(ce=errors.ce, rce=errors.rce, mce=errors.mce, rmce=errors.rmce)
            atomic_write_text(out / f"ce_{metric}.csv", rows_to_csv(errors.to_rows()))
            summary["files"].append(f"ce_{metric}.csv")
            heat_values, title = errors.ce, f"CE of {metric} vs {reference}"
        heat = plot_heatmap(heat_values, out / f"heatmap_{metric}.png", title)
        summary["files"].append(heat.name)
        summary["metrics"][metric] = entry
    atomic_write_json(out / "summary.json", summary)
    return summary
