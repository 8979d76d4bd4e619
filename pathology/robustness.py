"""KimiaNet features under H&E corruptions: leave-one-patient-out nearest-neighbour tile classification.

The clean selected tiles of a tile store form the archive (features of the uncorrupted tiles); every
tile, corrupted, queries it, its own patient excluded. Scores (`histo.classification`): tile accuracy, tile
macro-F1 and slide accuracy (majority vote of the slide's tiles; a tie goes to the first label by name).
This module supplies the cohort, the model loader and the evaluator; the study (grid, resume, ImageNet-C
metrics, plots) is `histo.robustness.study`'s. Spatial corruptions act at the store's target µm/px
(`pathology.corruptions.spatial_scale`). α-BN (optional, `alpha_bn`) calibrates the query forward passes
per corruption (each batch: `batch_size` tiles of one slide); by default the archive stays featurised
without it, so calibrated queries meet uncalibrated archive features.
`pathology.alpha_bn_archive: true` also featurises the archive under α-BN, with its own (clean) batches.
Which of the two was done is recorded (`alpha_bn_calibrates` in settings.json and the summary).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from histo.batch import BatchSummary, Outcome
from histo.calibration import alpha_bn_mode
from histo.classification import DEFINITIONS, classification_report, vote
from histo.errors import HistoError, InputFileError
from histo.robustness.grid import Evaluate, select_corruptions
from histo.robustness.study import Model, Study, run_study
from histo.robustness_config import PathologyRobustness, RobustnessConfig
from pathology.geometry import TileGeometry

METRICS = {"accuracy": True, "macro_f1": True, "slide_accuracy": True}


@dataclass
class Cohort:
    """The labelled slides of a store with the tiles to evaluate (cached in memory when small enough)."""

    store: Any
    slide_ids: list[str]
    labels: list[str]
    patients: list[str]
    indices: list[np.ndarray]
    left_out: list[Outcome] = field(default_factory=list)  # slides not evaluated, and why
    cache: dict[int, np.ndarray] = field(default_factory=dict)

    def tiles(self, i: int) -> np.ndarray:
        if i in self.cache:
            return self.cache[i]
        return self.store.read_selected(self.slide_ids[i], self.indices[i])


def load_cohort(store: Any, max_tiles_per_slide: int = 16, cache_mb: float = 2048) -> Cohort:
    """Labelled slides with selected tiles; tiles evenly spaced when more than `max_tiles_per_slide`."""
    cohort = Cohort(store, [], [], [], [])
    budget = cache_mb * 2**20
    for slide_id in store.slide_ids(status=None):
        try:
            rec = store.record(slide_id)
            if rec.status != "done":  # its tiling failed: the store records why
                continue
            n = int(np.count_nonzero(store.selected(slide_id)))
        except InputFileError as e:  # a damaged record fails its slide, not the study
            cohort.left_out.append(Outcome.failed(slide_id, None, str(e)))
            continue
        if rec.label in (None, ""):
            cohort.left_out.append(Outcome.skipped(slide_id, None, "no label"))
            continue
        if n == 0:
            cohort.left_out.append(Outcome.skipped(slide_id, None, "no selected tiles"))
            continue
        idx = np.arange(n)
        if 0 < max_tiles_per_slide < n:
            idx = np.unique(np.linspace(0, n - 1, max_tiles_per_slide).round().astype(np.int64))
        try:  # every slide is read once here, so a damaged chunk fails its slide, not the study
            tiles = store.read_selected(slide_id, idx)
        except InputFileError as e:
            cohort.left_out.append(Outcome.failed(slide_id, None, str(e)))
            continue
        if tiles.nbytes <= budget:
            cohort.cache[len(cohort.slide_ids)] = tiles
            budget -= tiles.nbytes
        cohort.slide_ids.append(slide_id)
        cohort.labels.append(str(rec.label))
        cohort.patients.append(str(rec.patient or slide_id))
        cohort.indices.append(idx)
    if len(set(cohort.patients)) < 2 or len(set(cohort.labels)) < 2:
        raise HistoError(
            f"{store.path}: need labelled slides of at least 2 patients and 2 labels for "
            f"leave-one-patient-out classification (found {len(cohort.slide_ids)} usable slides)"
        )
    return cohort


def tile_mpp(store: Any) -> float:
    """The µm/px of the store's tiles (its recorded geometry), which sizes the spatial corruptions."""
    return TileGeometry.recorded(store.params, str(store.path)).mpp


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
    """evaluate(corrupt) for `histo.robustness.grid`: corrupted queries against the clean archive."""
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


def alpha_bn_calibrates(alpha: float | None, archive: bool) -> str | None:
    """What α-BN calibrates in the study: None (off), "queries" or "queries and archive"."""
    if alpha is None:
        return None
    return "queries and archive" if archive else "queries"


def archive_features(
    extractor: Any, cohort: Cohort, batch_size: int, alpha: float | None
) -> list[np.ndarray]:
    """Features of each slide's clean tiles; under α-BN `alpha` (each batch calibrates itself) when set."""
    context = contextlib.nullcontext() if alpha is None else alpha_bn_mode(extractor.model, alpha)
    with context:
        return [extractor.extract(cohort.tiles(i), batch_size) for i in range(len(cohort.slide_ids))]


def open_model_extractor(path: str | os.PathLike, encoder: str | None, device: str, tiling: Any) -> Any:
    """The feature extractor of a histo checkpoint, or of `encoder`'s weight file at `path` (the registry)."""
    from pathology.encoders import open_extractor
    from pathology.kimianet import FeatureExtractor

    if encoder is None:
        return FeatureExtractor.from_checkpoint(path, device)
    return open_extractor(encoder, path, device, tiling=tiling)


def load_model(path: str | os.PathLike, cohort: Cohort, p: PathologyRobustness, device: str) -> Model:
    """A checkpoint's feature extractor and its evaluator per run: corrupted queries against the clean
    archive, featurised once (once per α as well under `alpha_bn_archive`)."""
    extractor = open_model_extractor(path, p.encoder, device, cohort.store.params)
    archives: dict[float | None, list[np.ndarray]] = {}

    def evaluator(alpha: float | None) -> Evaluate:
        key = alpha if p.alpha_bn_archive else None
        if key not in archives:
            archives[key] = archive_features(extractor, cohort, p.batch_size, key)
        return make_evaluate(extractor, cohort, archives[key], p.k, p.batch_size)

    return Model(extractor.model, extractor.model_hash, evaluator)


def evaluate_pathology(
    model: str | os.PathLike,
    tiles: str | os.PathLike,
    out: str | os.PathLike,
    config: RobustnessConfig | Mapping[str, Any] | None = None,
    reference: str | os.PathLike | None = None,
    progress: bool = True,
) -> BatchSummary:
    """The H&E corruption study of `model` on the labelled slides of the tile store `tiles`, into `out`.

    `config` (a RobustnessConfig, None for the defaults, or a mapping over them) and `reference` as for
    `histo.robustness.study.run_study`, which writes the outputs and returns the BatchSummary.
    """
    from pathology.corruptions import CORRUPTIONS, seeded, study_record
    from pathology.store import TileStore

    config = RobustnessConfig.coerce(config)
    p, run = config.pathology, config.run
    if p.encoder is not None:
        from pathology.encoders import get_encoder

        get_encoder(p.encoder)  # an unknown name fails here, before the cohort is read
    names = select_corruptions(config.corruptions, CORRUPTIONS)
    store = TileStore.open(tiles)
    mpp = tile_mpp(store)
    record = study_record(names, mpp)  # severity table and spatial scaling, in settings and summary
    cohort = load_cohort(store, p.max_tiles_per_slide, run.cache_mb)
    calibrates = {"alpha_bn_calibrates": alpha_bn_calibrates(config.alpha_bn, p.alpha_bn_archive)}
    study = Study(
        task="pathology",
        metrics=METRICS,
        corruptions={n: seeded(n, p.batch_size, run.workers, mpp) for n in names},
        load=lambda path: load_model(path, cohort, p, run.device),
        settings={
            "tiles": str(Path(tiles).resolve()),
            **calibrates,
            "pathology": p.model_dump(mode="json"),
            "slides": cohort.slide_ids,
            **DEFINITIONS,
            **record,
        },
        extra={
            "n_slides": len(cohort.slide_ids),
            "n_tiles": int(sum(len(i) for i in cohort.indices)),
            **record,
            **calibrates,
        },
        left_out=cohort.left_out,
    )
    return run_study(study, model, reference, out, config, progress)
