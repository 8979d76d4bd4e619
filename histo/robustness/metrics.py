"""ImageNet-C metrics of tidy robustness rows (Hendrycks & Dietterich, ICLR 2019).

With E the error (1 - score for a score metric):
    CE_c  = sum_s E(s, c) / sum_s E_ref(s, c)
    rCE_c = sum_s (E(s, c) - E_clean) / sum_s (E_ref(s, c) - E_ref,clean)
    mCE = mean_c CE_c,  relative mCE = mean_c rCE_c
against a fixed reference model (for us the plain-BN model of the same task).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from histo.errors import HistoError
from histo.robustness.grid import CLEAN
from histo.robustness.results import usable


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


def error_table(rows: Sequence[Mapping[str, Any]], metric: str, higher_is_better: bool = True) -> dict:
    """{(model, corruption, severity): error} from tidy rows; error = 1 - value for a score metric."""
    table = {}
    for r in rows:
        if usable(r, metric):
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
        if usable(r, metric):
            acc.setdefault((r["model"], r["corruption"]), []).append(float(r["value"]))
    out: dict[str, dict[str, float]] = {}
    for (model, c), values in acc.items():
        out.setdefault(model, {})[c] = float(np.mean(values))
    return out
