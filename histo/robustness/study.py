"""The robustness study every domain shares: the models to run, their grids into one resumable folder, the report.

A domain (pathology.robustness, segmentation.robustness) builds a `Study`: its name, metrics, selected
corruptions, what it records, and `load(checkpoint) -> Model` (its model loader and evaluator per run).
`run_study` does the rest: the model, its α-BN variant and the reference (`plan_runs`), each loaded once;
the settings that identify the run (a different run in the same folder is refused, the same one resumes);
every model's grid with results.csv saved after each cell; the report; summary.json.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from histo.batch import BatchSummary, Outcome
from histo.io import atomic_write_json, check_run_settings
from histo.robustness.grid import CorruptionFn, Evaluate, cell_rows, run_cells
from histo.robustness.report import report
from histo.robustness.results import read_rows, write_rows

if TYPE_CHECKING:
    from histo.robustness_config import RobustnessConfig


@dataclass(frozen=True)
class Model:
    """A checkpoint loaded once for every run of it: the module α-BN calibrates, its hash (recorded), and
    `evaluator(alpha_bn)` -> the evaluate(corrupt) of one run (its grid runs it under that α-BN)."""

    module: Any
    sha256: str
    evaluator: Callable[[float | None], Evaluate]


@dataclass(frozen=True)
class Study:
    """A domain's part of a study; `settings` are recorded in settings.json, `extra` added to the summary,
    `left_out` (the data items it could not evaluate: failed or skipped, with the reason) head its outcomes."""

    task: str
    metrics: Mapping[str, bool]  # metric -> higher is better
    corruptions: Mapping[str, CorruptionFn]  # the selected ones, ready to run
    load: Callable[[str | os.PathLike], Model]
    settings: Mapping[str, Any]
    extra: Mapping[str, Any]
    left_out: Sequence[Outcome] = ()


@dataclass(frozen=True)
class ModelRun:
    """One model to put through the grid: its label, evaluate(corrupt), and optional α-BN."""

    label: str
    evaluate: Evaluate
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
    study: Study,
    model: str | os.PathLike,
    reference: str | os.PathLike | None,
    out: str | os.PathLike,
    config: RobustnessConfig,
    progress: bool = True,
) -> BatchSummary:
    """Run `study` for `model` (its α-BN variant when `config.alpha_bn`, and `reference`) into `out`.

    Writes results.csv (after each cell; a re-run resumes), CE tables, plots and summary.json; returns
    the BatchSummary of every cell, the report, the models' hashes and `study.extra` as its extras.
    """
    plan, ref_label = plan_runs(model, reference, config.alpha_bn)
    loaded = {str(path): study.load(path) for _, path, _ in plan}
    runs = [
        ModelRun(label, loaded[str(path)].evaluator(alpha), alpha, loaded[str(path)].module)
        for label, path, alpha in plan
    ]
    hashes = {label: loaded[str(path)].sha256 for label, path, _ in plan}
    settings = {
        "task": study.task,
        "models": hashes,
        "corruptions": list(study.corruptions),
        "severities": list(config.severities),
        "seed": config.seed,
        "alpha_bn": config.alpha_bn,
        **study.settings,
    }
    rows, outcomes = run_models(
        runs, study.corruptions, config.severities, out, settings, config.seed, progress
    )
    extra = report(rows, out, study.metrics, reference=ref_label)
    summary = BatchSummary((*study.left_out, *outcomes), out=str(out), extra=extra)
    summary = summary.with_extra(task=study.task, models=hashes, **study.extra)
    atomic_write_json(Path(out) / "summary.json", summary.to_dict())
    return summary


def run_models(
    runs: Sequence[ModelRun],
    corruptions: Mapping[str, CorruptionFn],
    severities: Sequence[int],
    out: str | os.PathLike,
    settings: Mapping[str, Any],
    seed: int = 0,
    progress: bool = True,
) -> tuple[list[dict], list[Outcome]]:
    """`run_cells` for every model, resuming an earlier run of the same `settings` in `out`: the rows of
    every model (results.csv rewritten after each cell) and the outcomes of every cell."""
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
    return rows, outcomes
