"""Leave-one-patient-out evaluation of a slide index (REFERENCE.md §3).

Every labelled slide is a query (its stored tile codes/features); all slides of its patient are excluded
from the search (a slide without a patient ID is its own patient). The prediction at k is the majority
label of the top k slides (`histo.classification.vote`: a tie goes to the label of the nearest slide).
Reported per k (`histo.classification.classification_report`): accuracy, macro-F1 (mean F1 over the classes
in the truth or the predictions; a query with no labelled neighbour abstains, "(none)", which is wrong and a
miss of its class but not a class) and per-class precision/recall/F1/support; confusion matrices as PNG.
Scopes: horizontal (all slides) and, when every slide has a site, vertical (only slides of the query's
site: the filtered search of `--where site=...`, search/filters.py, whose first stage searches only that
site's rows, so vertical two-stage rankings are exact within the site like horizontal ones). A query with no other patient in its scope is listed as unanswerable and left out of the metrics.

Ranking (`strategy`, recorded in the result): `exhaustive` (the default) computes the slide distance to
every allowed slide, as the published protocol ranks; `two-stage` uses the search's approximation (per-tile
kNN candidates, then the exact distance on them; `SearchEngine.rank`). An exhaustive evaluation also ranks
every query the two-stage way and reports how often the two differ (`StrategyAgreement`) - the price of
the approximation on this archive; `compare` asks for that comparison with either strategy.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from histo.classification import ABSTAIN, DEFINITIONS, ClassificationReport, classification_report, vote
from histo.errors import HistoError
from search.engine import Catalog, SearchEngine
from search.filters import slide_mask

STRATEGIES = ("exhaustive", "two-stage")


@dataclass
class StrategyAgreement:
    """How the other ranking strategy's results differ on the same queries.

    rankings_differ: queries whose top max(k) slides (in order) differ; predictions_differ: k -> queries
    whose majority vote of the top k differs; fallbacks: queries the two-stage ranking searched
    exhaustively anyway (fewer than k candidates, or most rows excluded).
    """

    other: str
    n_queries: int = 0
    rankings_differ: int = 0
    predictions_differ: dict[int, int] = field(default_factory=dict)
    fallbacks: int = 0


@dataclass
class ScopeResult:
    scope: str  # "horizontal" or "vertical"
    n_queries: int
    unanswerable: list[str]
    scores: dict[int, ClassificationReport]  # k -> scores of the majority vote of the top k
    predictions: dict[str, dict[int, str]] = field(default_factory=dict)  # slide_id -> k -> label
    agreement: StrategyAgreement | None = None  # the other strategy on the same queries, when compared


@dataclass
class EvaluationResult:
    mode: str
    ks: list[int]
    scopes: dict[str, ScopeResult]
    strategy: str = "exhaustive"
    pngs: list[str] = field(default_factory=list)
    definitions: dict[str, str] = field(default_factory=lambda: dict(DEFINITIONS))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def agreements(self) -> dict[str, dict[str, Any]]:
        """Scope -> the other strategy's differences (`StrategyAgreement` as a dict), where compared."""
        return {name: asdict(s.agreement) for name, s in self.scopes.items() if s.agreement is not None}

    def strategy_lines(self) -> list[str]:
        """How the queries were ranked and, per scope, how often the other strategy differs (for a table)."""
        lines = [f"ranking: {self.strategy}"]
        for name, s in self.scopes.items():
            a = s.agreement
            if a is None:
                continue
            votes = ", ".join(f"top-{k} vote {n}" for k, n in a.predictions_differ.items())
            lines.append(
                f"{name}: {a.other} differs on {a.rankings_differ}/{a.n_queries} rankings ({votes}; "
                f"{a.fallbacks} searched exhaustively anyway)"
            )
        return lines

    def summary_rows(self) -> list[dict[str, Any]]:
        """One row per scope and k: accuracy and macro-F1 (for a table)."""
        return [
            {"scope": name, "k": k, "n": s.n_queries, "accuracy": ks.accuracy, "macro_f1": ks.macro_f1}
            for name, s in self.scopes.items()
            for k, ks in s.scores.items()
        ]


def evaluate_engine(
    engine: SearchEngine,
    ks: tuple[int, ...],
    mode: str,
    out_dir: str | os.PathLike | None = None,
    progress: bool = True,
    strategy: str = "exhaustive",
    compare: bool | None = None,
) -> EvaluationResult:
    """Leave-one-patient-out search over the engine's own slides; confusion PNGs + JSON in `out_dir`.

    `strategy` ranks the queries (see the module docstring); `compare` also ranks them the other way and
    counts the differences (None: only when `strategy` is exhaustive, next to which the two-stage is cheap).
    """
    from tqdm import tqdm

    if strategy not in STRATEGIES:
        raise HistoError(f"evaluate.strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}")
    compare = strategy == "exhaustive" if compare is None else compare
    other = STRATEGIES[1 - STRATEGIES.index(strategy)]
    cat = engine.catalog
    base = engine.tiles[mode]()
    patients = np.array(
        [p if p is not None else f"slide:{s}" for p, s in zip(cat.patients, cat.slide_ids, strict=True)]
    )
    sites = cat.sites
    scope_names = ["horizontal"] + (["vertical"] if sites and all(s is not None for s in sites) else [])
    result = EvaluationResult(mode, list(ks), {}, strategy)
    for scope in scope_names:
        truth: list[str] = []
        preds: dict[int, list[str]] = {k: [] for k in ks}
        sr = ScopeResult(scope, 0, [], {}, agreement=StrategyAgreement(other) if compare else None)
        for s in tqdm(range(len(cat)), desc=f"evaluate {scope}", unit="slide", disable=not progress):
            if cat.labels[s] is None:
                continue
            allowed = patients != patients[s]
            if scope == "vertical":  # the filtered search of `--where site=<the query's site>`
                allowed &= slide_mask(cat, {"site": frozenset([sites[s]])})
            if not allowed.any():
                sr.unanswerable.append(cat.slide_ids[s])
                continue
            query = base[cat.rows(s)]
            ranked, info = engine.rank(query, mode, max(ks), allowed, exhaustive=strategy == "exhaustive")
            truth.append(cat.labels[s])
            sr.predictions[cat.slide_ids[s]] = {}
            for k in ks:
                p = _vote(cat, ranked, k)
                preds[k].append(p)
                sr.predictions[cat.slide_ids[s]][k] = p
            if sr.agreement is not None:
                alt, alt_info = engine.rank(query, mode, max(ks), allowed, exhaustive=other == "exhaustive")
                two_stage = info if strategy == "two-stage" else alt_info
                _count(sr.agreement, cat, ranked, alt, ks, two_stage["strategy"] != "two-stage")
        sr.n_queries = len(truth)
        sr.scores = {k: classification_report(truth, preds[k]) for k in ks}
        result.scopes[scope] = sr
    if out_dir is not None:
        _write(result, Path(out_dir))
    return result


def _vote(cat: Catalog, ranked: list[tuple[int, float]], k: int) -> str:
    """The majority label of the top k ranked slides, ABSTAIN when none is labelled."""
    return vote([cat.labels[i] for i, _ in ranked[:k]], [d for _, d in ranked[:k]]) or ABSTAIN


def _count(
    agreement: StrategyAgreement,
    cat: Catalog,
    ranked: list[tuple[int, float]],
    alt: list[tuple[int, float]],
    ks: tuple[int, ...],
    fallback: bool,
) -> None:
    """Add one query's two rankings to the agreement counts."""
    agreement.n_queries += 1
    agreement.rankings_differ += [i for i, _ in ranked] != [i for i, _ in alt]
    for k in ks:
        differs = _vote(cat, ranked, k) != _vote(cat, alt, k)
        agreement.predictions_differ[k] = agreement.predictions_differ.get(k, 0) + differs
    agreement.fallbacks += fallback


def _write(result: EvaluationResult, out: Path) -> None:
    from histo.io import atomic_write_json

    out.mkdir(parents=True, exist_ok=True)
    for name, sr in result.scopes.items():
        png = out / f"confusion_{name}_{result.mode}.png"
        plot_confusions(sr, png)
        result.pngs.append(str(png))
    atomic_write_json(out / f"evaluation_{result.mode}.json", result.to_dict())


def plot_confusions(sr: ScopeResult, png: Path) -> None:
    """One confusion-matrix panel per k (counts annotated), saved atomically as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from histo.plots import save_figure

    n = len(sr.scores)
    size = max(3.5, 0.5 * max((len(s.labels) for s in sr.scores.values()), default=1) + 2)
    fig, axes = plt.subplots(1, n, figsize=(size * n, size), squeeze=False)
    for ax, (k, s) in zip(axes[0], sr.scores.items(), strict=True):
        cm, columns = np.array(s.confusion), list(s.labels)
        if any(s.abstained):  # abstentions are no class, but the reader should see them
            cm, columns = np.column_stack([cm, s.abstained]), [*columns, ABSTAIN]
        ax.imshow(cm, cmap="Blues")
        for (i, j), v in np.ndenumerate(cm):
            ax.text(j, i, str(v), ha="center", va="center", color="white" if v > cm.max() / 2 else "black")
        ax.set_xticks(range(len(columns)), columns, rotation=45, ha="right")
        ax.set_yticks(range(len(s.labels)), s.labels)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(
            f"{sr.scope} {'top-1' if k == 1 else f'MV@{k}'}: acc {s.accuracy:.2f}, macro-F1 {s.macro_f1:.2f}"
        )
    fig.tight_layout()
    save_figure(fig, png)
