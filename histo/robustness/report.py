"""A study's output folder from its tidy rows: results.csv, per-metric plots, CE tables, summary.json."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from histo.io import atomic_write_json, atomic_write_text
from histo.robustness.metrics import corruption_errors, mean_over_severities
from histo.robustness.plots import plot_heatmap, plot_severity_curves
from histo.robustness.results import rows_to_csv, write_rows


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
