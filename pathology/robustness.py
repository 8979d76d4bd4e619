"""KimiaNet features under H&E corruptions: leave-one-patient-out nearest-neighbour tile classification.

The clean selected tiles of a tile store form the archive (features of the uncorrupted tiles); every
tile, corrupted, queries it, its own patient excluded. Scores (`histo.classification`): tile accuracy, tile
macro-F1 and slide accuracy (majority vote of the slide's tiles; a tie goes to the first label by name).
The grid, the ImageNet-C metrics and the plots come from `histo.robustness`; α-BN (optional) calibrates the
query forward passes per corruption.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from histo.classification import DEFINITIONS, classification_report, vote
from histo.errors import HistoError
from histo.io import atomic_write_json
from histo.robustness import ModelRun, parse_severities, plan_runs, run_study, select_corruptions

METRICS = {"accuracy": True, "macro_f1": True, "slide_accuracy": True}


@dataclass
class Cohort:
    """The labelled slides of a store with the tiles to evaluate (cached in memory when small enough)."""

    store: Any
    slide_ids: list[str]
    labels: list[str]
    patients: list[str]
    indices: list[np.ndarray]
    skipped: list[dict] = field(default_factory=list)
    cache: dict[int, np.ndarray] = field(default_factory=dict)

    def tiles(self, i: int) -> np.ndarray:
        if i in self.cache:
            return self.cache[i]
        return self.store.read_selected(self.slide_ids[i], self.indices[i])


def load_cohort(store: Any, max_tiles_per_slide: int = 16, cache_mb: float = 2048) -> Cohort:
    """Labelled slides with selected tiles; tiles evenly spaced when more than `max_tiles_per_slide`."""
    cohort = Cohort(store, [], [], [], [])
    budget = cache_mb * 2**20
    for slide_id in store.slide_ids():
        rec = store.record(slide_id)
        n = int(np.count_nonzero(store.selected(slide_id)))
        if rec.label in (None, ""):
            cohort.skipped.append({"slide_id": slide_id, "reason": "no label"})
            continue
        if n == 0:
            cohort.skipped.append({"slide_id": slide_id, "reason": "no selected tiles"})
            continue
        idx = np.arange(n)
        if 0 < max_tiles_per_slide < n:
            idx = np.unique(np.linspace(0, n - 1, max_tiles_per_slide).round().astype(np.int64))
        cohort.slide_ids.append(slide_id)
        cohort.labels.append(str(rec.label))
        cohort.patients.append(str(rec.patient or slide_id))
        cohort.indices.append(idx)
        size = len(idx) * rec.tile_px * rec.tile_px * 3
        if size <= budget:
            cohort.cache[len(cohort.slide_ids) - 1] = store.read_selected(slide_id, idx)
            budget -= size
    if len(set(cohort.patients)) < 2 or len(set(cohort.labels)) < 2:
        raise HistoError(
            f"{store.path}: need labelled slides of at least 2 patients and 2 labels for "
            f"leave-one-patient-out classification (found {len(cohort.slide_ids)} usable slides)"
        )
    return cohort


def knn_predict(
    query: np.ndarray,
    q_groups: np.ndarray,
    index: np.ndarray,
    i_labels: np.ndarray,
    i_groups: np.ndarray,
    k: int,
) -> np.ndarray:
    """Majority label of the k Euclidean-nearest index vectors of another group (histo.classification.vote)."""
    q = query.astype(np.float64)
    x = index.astype(np.float64)
    dist = (q**2).sum(1)[:, None] - 2 * q @ x.T + (x**2).sum(1)[None]
    dist[q_groups[:, None] == i_groups[None]] = np.inf
    k = min(k, int(np.isfinite(dist).sum(1).min()))
    if k < 1:
        raise HistoError("a query has no index tile of another patient")
    order = np.argsort(dist, axis=1, kind="stable")[:, :k]
    near = np.take_along_axis(dist, order, axis=1)
    return np.array([vote(row, d) for row, d in zip(i_labels[order], near, strict=True)])


def classification_scores(y_true: np.ndarray, y_pred: np.ndarray, slide: np.ndarray) -> dict[str, float]:
    """Tile accuracy and macro-F1 (histo.classification.classification_report), slide accuracy (tile vote)."""
    report = classification_report(y_true, y_pred)
    slides = np.unique(slide)
    votes = [vote(y_pred[slide == s]) == y_true[slide == s][0] for s in slides]
    return {"accuracy": report.accuracy, "macro_f1": report.macro_f1, "slide_accuracy": float(np.mean(votes))}


def make_evaluate(extractor: Any, cohort: Cohort, index: list[np.ndarray], k: int, batch_size: int):
    """evaluate(corrupt) for `histo.robustness.run_grid`: corrupted queries against the clean archive."""
    sizes = [len(f) for f in index]
    groups = np.repeat(np.array(cohort.patients), sizes)
    labels = np.repeat(np.array(cohort.labels), sizes)
    slides = np.repeat(np.arange(len(sizes)), sizes)
    archive = np.concatenate(index)

    def evaluate(corrupt) -> dict[str, float]:
        queries = np.concatenate(
            [extractor.extract(corrupt(cohort.tiles(i), i), batch_size) for i in range(len(cohort.slide_ids))]
        )
        pred = knn_predict(queries, groups, archive, labels, groups, k)
        return classification_scores(labels, pred, slides)

    return evaluate


def evaluate_pathology(
    model: str | os.PathLike,
    tiles: str | os.PathLike,
    out: str | os.PathLike,
    config: dict,
    reference: str | os.PathLike | None = None,
    progress: bool = True,
) -> dict:
    """Run the corruption grid for `model` (its α-BN variant, and `reference`) on a tile store's tiles.

    Writes results.csv (resumable), CE tables, plots and summary.json into `out`; returns the summary.
    """
    from pathology.corruptions import CORRUPTIONS, seeded
    from pathology.encoders import open_extractor
    from pathology.kimianet import FeatureExtractor
    from pathology.store import TileStore

    p = config["pathology"]
    names = select_corruptions(config["corruptions"], CORRUPTIONS)
    severities = parse_severities(str(config["severities"]))
    store = TileStore.open(tiles)
    cohort = load_cohort(store, p["max_tiles_per_slide"], p["cache_mb"])
    plan, ref_label = plan_runs(model, reference, config["alpha_bn"])

    def extractor(path: str | os.PathLike) -> Any:  # a histo checkpoint, or weights of pathology.encoder
        if p["encoder"] is None:
            return FeatureExtractor.from_checkpoint(path, config["device"])
        return open_extractor(p["encoder"], path, config["device"], tiling=store.params)

    extractors = {str(path): extractor(path) for _, path, _ in plan}
    archives = {
        key: [ex.extract(cohort.tiles(i), p["batch_size"]) for i in range(len(cohort.slide_ids))]
        for key, ex in extractors.items()
    }
    runs = [
        ModelRun(
            label,
            make_evaluate(extractors[str(path)], cohort, archives[str(path)], p["k"], p["batch_size"]),
            alpha,
            extractors[str(path)].model,
        )
        for label, path, alpha in plan
    ]
    settings = {
        "task": "pathology",
        "tiles": str(Path(tiles).resolve()),
        "models": {label: extractors[str(path)].model_hash for label, path, _ in plan},
        "corruptions": names,
        "severities": severities,
        "seed": config["seed"],
        "alpha_bn": config["alpha_bn"],
        "pathology": {k: v for k, v in p.items() if k not in ("workers", "cache_mb")},  # not in the results
        "slides": cohort.slide_ids,
        **DEFINITIONS,
    }
    summary = run_study(
        runs,
        {n: seeded(n, p["batch_size"], p["workers"]) for n in names},
        severities,
        out,
        settings,
        METRICS,
        reference=ref_label,
        seed=config["seed"],
        progress=progress,
    )
    summary.update(
        task="pathology",
        models=settings["models"],
        n_slides=len(cohort.slide_ids),
        n_tiles=int(sum(len(i) for i in cohort.indices)),
        skipped_slides=cohort.skipped,
    )
    atomic_write_json(Path(out) / "summary.json", summary)
    return summary
