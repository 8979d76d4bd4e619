"""`histo segment eval`: per case and region of the label scheme, the legacy metrics (BraTS 2018-2021), the
official global metrics and the official lesion-wise metrics (segmentation.lesions), in a per-case CSV
and a summary JSON.

Columns and summary keys, for each region R of the scheme (e.g. ET, TC, WT):
  legacy_dice_R      Dice; both empty = 1, one empty = 0
  legacy_hd95_R      HD95 (mm), the larger directed 95th percentile (as MONAI); both empty = 0, one empty = 373.13
  global_dice_R      Dice; no overlap = 0, both empty = NaN (the official scorer)
  global_hd95_R      HD95 (mm), the pooled 95th percentile (as the official scorer); no overlap = 373, both empty = NaN
  lesionwise_dice_R  mean Dice over lesions by the scheme's rule (segmentation.lesions)
  lesionwise_hd95_R  mean pooled HD95 (mm) over lesions by the same rule
  lesions_tp_R, lesions_fp_R, lesions_fn_R   matched, spurious and missed lesions
The official scorer computes its global HD95 in voxel units (it passes no spacing); here every HD95 is in
mm, which is the same number on BraTS's 1 mm grids. Summaries leave NaN out and give the count `n`.
With `eval.hd95: false` the three HD95 columns are left out (no surface distances are computed).
"""

from __future__ import annotations

import csv
import io
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from histo.batch import BatchSummary, Outcome, run_batch
from histo.errors import HistoError, InputFileError
from histo.io import atomic_write_json, atomic_write_text
from segmentation.config import SegmentConfig
from segmentation.data import Case, label_error, read_nifti, spacing_of
from segmentation.label_schemes import LabelScheme, check_values, get_scheme
from segmentation.lesions import global_dice, global_hd95, lesionwise_means, match_lesions
from segmentation.metrics import (
    HD95_DEFINITION,
    HD95_ONE_EMPTY,
    HD95_POOLED_DEFINITION,
    bounding_box,
    dice,
    directed_hd95,
    surface_distances,
)

METRICS = ("legacy_dice", "legacy_hd95", "global_dice", "global_hd95", "lesionwise_dice", "lesionwise_hd95")
HD95_METRICS = ("legacy_hd95", "global_hd95", "lesionwise_hd95")
COUNTS = ("lesions_tp", "lesions_fp", "lesions_fn")
HD95_DEFINITIONS = {
    "legacy": HD95_DEFINITION,
    "global": HD95_POOLED_DEFINITION + " on the whole region",
    "lesionwise": HD95_POOLED_DEFINITION + " per matched lesion pair",
}
CONVENTIONS = {
    "legacy_dice": "both empty = 1, exactly one empty = 0",
    "legacy_hd95": f"both empty = 0, exactly one empty = {HD95_ONE_EMPTY}",
    "global": "no overlap: Dice 0, HD95 373; both empty: NaN (brats-evaluation 0.0.10)",
    "lesionwise": "26-connected lesions matched one-to-one by largest total Dice (brats-evaluation 0.0.10); "
    "matched rule: mean over matched lesions, none matched = Dice 0 / HD95 373, both empty = NaN; "
    "penalised rule (mets): reference lesions >= 20 mm3 and spurious lesions, missed/spurious = 0 / 373",
}
NO_LABELS = "no label file (*_seg) to evaluate against"


def score_region(
    pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float], rule: str, with_hd95: bool = True
) -> dict[str, float]:
    """Every metric of one region's binary masks (keys of METRICS and COUNTS, without the region; the
    HD95_METRICS only `with_hd95`)."""
    has_pred, has_ref = bool(pred.any()), bool(ref.any())
    distances = surface_distances(pred, ref, spacing) if with_hd95 and has_pred and has_ref else None
    lesions = match_lesions(pred, ref, spacing, distances, with_hd95)
    lesion_dice, lesion_hd95 = lesionwise_means(lesions, rule)
    scores = {
        "legacy_dice": dice(pred, ref),
        "global_dice": global_dice(pred, ref),
        "lesionwise_dice": lesion_dice,
    }
    if with_hd95:
        if distances is not None:
            legacy_hd95 = directed_hd95(*distances)
        else:
            legacy_hd95 = HD95_ONE_EMPTY if has_pred != has_ref else 0.0
        scores |= {
            "legacy_hd95": legacy_hd95,
            "global_hd95": global_hd95(pred, ref, distances),
            "lesionwise_hd95": lesion_hd95,
        }
    return scores | {"lesions_tp": lesions.tp, "lesions_fp": lesions.fp, "lesions_fn": lesions.fn}


def evaluate_case(
    pred_labels: np.ndarray,
    ref_labels: np.ndarray,
    scheme: str | LabelScheme,
    spacing: Sequence[float],
    with_hd95: bool = True,
) -> dict[str, float]:
    """Every metric of every region between two label maps of one scheme: {"legacy_dice_ET": …, …}.

    ValueError for different shapes or a label value outside the scheme."""
    scheme = get_scheme(scheme)
    pred_labels, ref_labels = np.asarray(pred_labels), np.asarray(ref_labels)
    if pred_labels.shape != ref_labels.shape:
        raise ValueError(f"prediction shape {pred_labels.shape} != reference shape {ref_labels.shape}")
    pred, ref = crop_to_labels(pred_labels, ref_labels)
    check_values(pred, scheme)
    check_values(ref, scheme)
    out: dict[str, float] = {}
    for name, values in scheme.regions.items():
        scores = score_region(
            np.isin(pred, sorted(values)), np.isin(ref, sorted(values)), spacing, scheme.lesionwise, with_hd95
        )
        out.update({f"{key}_{name}": value for key, value in scores.items()})
    return out


def crop_to_labels(pred: np.ndarray, ref: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both maps cut to the box of their non-zero voxels grown by one (every metric is the same on it)."""
    box = bounding_box((pred != 0) | (ref != 0), pad=1)
    if box is None:
        box = tuple(slice(0, 1) for _ in pred.shape)
    return pred[box], ref[box]


def metric_keys(scheme: str | LabelScheme, with_hd95: bool = True) -> list[str]:
    """CSV columns and summary keys of a scheme: each metric (the HD95 ones only `with_hd95`) for each
    region, then the lesion counts."""
    regions = get_scheme(scheme).regions
    metrics = [m for m in METRICS if with_hd95 or m not in HD95_METRICS]
    return [f"{m}_{r}" for m in (*metrics, *COUNTS) for r in regions]


def summarize(outcomes: Sequence[Outcome], keys: Sequence[str]) -> dict[str, dict[str, float]]:
    """Mean, std, median, 25th/75th percentiles and count `n` of every metric over the cases done, NaN
    values left out (a region absent from both maps has no global or lesion-wise score)."""
    done = [o.detail for o in outcomes if o.status == "done"]
    stats: dict[str, dict[str, float]] = {}
    for key in keys:
        values = np.array([d[key] for d in done if key in d], dtype=np.float64)
        values = values[~np.isnan(values)]
        if values.size == 0:
            stats[key] = {s: math.nan for s in ("mean", "std", "median", "q25", "q75")} | {"n": 0}
            continue
        stats[key] = {
            "mean": float(values.mean()),
            "std": float(values.std()),
            "median": float(np.median(values)),
            "q25": float(np.percentile(values, 25)),
            "q75": float(np.percentile(values, 75)),
            "n": int(values.size),
        }
    return stats


def write_report(
    outcomes: Sequence[Outcome], out_dir: str | os.PathLike, scheme: str | LabelScheme, with_hd95: bool = True
) -> BatchSummary:
    """Write per-case `metrics.csv` and `summary.json` (the summary's JSON, atomic) into `out_dir`."""
    scheme = get_scheme(scheme)
    out_dir = Path(out_dir)
    keys = metric_keys(scheme, with_hd95)
    fields = ["case_id", "status", "reason", "scheme", *keys]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fields, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(
        {"case_id": o.id, "status": o.status, "reason": o.reason or "", **o.detail} for o in outcomes
    )
    atomic_write_text(out_dir / "metrics.csv", buffer.getvalue())
    batch = BatchSummary(
        tuple(outcomes),
        out=str(out_dir),
        extra={
            "labels": {
                "scheme": scheme.name,
                "description": scheme.describe(),
                "regions": {r: sorted(v) for r, v in scheme.regions.items()},
                "lesionwise_rule": scheme.lesionwise,
            },
            "metrics": summarize(outcomes, keys),
            "hd95_definitions": HD95_DEFINITIONS,
            "conventions": CONVENTIONS,
        },
    )
    atomic_write_json(out_dir / "summary.json", batch.to_dict())
    return batch


@dataclass(frozen=True)
class _Scorer:
    """Scores one case against `<pred_dir>/<case_id>.nii.gz` (a picklable process for batch workers)."""

    pred_dir: Path
    labels: str | None
    with_hd95: bool

    def __call__(self, item) -> Outcome:
        from segmentation.data import find_case

        case = find_case(item.path, self.labels, images=False)
        if case.seg is None:
            return Outcome.skipped(case.case_id, item.path, NO_LABELS)
        found = [p for p in (self.pred_dir / f"{case.case_id}{s}" for s in (".nii.gz", ".nii")) if p.exists()]
        if not found:
            return Outcome.failed(
                case.case_id, item.path, f"no prediction {case.case_id}.nii.gz in {self.pred_dir}"
            )
        metrics = score_files(found[0], case, self.with_hd95)
        return Outcome.done(
            case.case_id,
            item.path,
            prediction=str(found[0]),
            scheme=case.scheme,
            scheme_source=case.scheme_source,
            **metrics,
        )


def evaluate_predictions(
    pred_dir: str | os.PathLike,
    data_dir: str | os.PathLike,
    out_dir: str | os.PathLike | None = None,
    config: SegmentConfig | Mapping[str, Any] | None = None,
    progress: bool = True,
) -> BatchSummary:
    """Score `<pred_dir>/<case_id>.nii.gz` against each labelled case under `data_dir` in the label scheme
    `data.labels` (auto: detected per case, one set of regions required); per-case CSV and summary JSON
    go to `out_dir` (default `pred_dir`). A missing or mismatched prediction fails its case, a case without
    a label map is skipped; no labelled case at all is an InputFileError (nothing written).

    `config`: a SegmentConfig, None (the defaults) or a mapping over the defaults: `data.labels`,
    `eval.hd95` (False: no HD95 columns) and `run.workers` (> 1: cases scored in parallel processes)."""
    from segmentation.data import CaseFolder, case_folders, case_id_of

    config = SegmentConfig.coerce(config)
    labels = None if config.data.labels == "auto" else config.data.labels
    with_hd95 = config.eval.hd95
    pred_dir, data_dir = Path(pred_dir), Path(data_dir)
    if not pred_dir.is_dir():
        raise InputFileError(pred_dir, "prediction folder not found")
    if not data_dir.is_dir():
        raise InputFileError(data_dir, "data folder not found")
    items = [CaseFolder(case_id_of(f), f) for f in case_folders(data_dir)]
    if not items:
        raise InputFileError(data_dir, "no case folders with NIfTI files found")
    scheme = _report_scheme(items, labels)
    outcomes = run_batch(
        items,
        _Scorer(pred_dir, labels, with_hd95),
        workers=config.run.workers,
        desc="evaluate",
        unit="case",
        progress=progress,
    )
    if all(o.status == "skipped" for o in outcomes):
        raise InputFileError(data_dir, "no case with a label file (*_seg) to evaluate against")
    return write_report(outcomes, out_dir if out_dir is not None else pred_dir, scheme, with_hd95)


def _report_scheme(items, labels: str | None) -> LabelScheme:
    """The scheme whose regions the report lists: `labels`, or the one all detected schemes share."""
    from segmentation.data import find_case

    if labels is not None:
        return get_scheme(labels)
    found: dict[str, list[str]] = {}
    for item in items:
        try:
            found.setdefault(find_case(item.path, images=False).scheme, []).append(item.id)
        except InputFileError:
            continue  # the case fails with its own reason when it is scored
    schemes = [get_scheme(name) for name in found]
    if len({tuple(s.regions.items()) for s in schemes}) > 1:
        groups = "; ".join(f"{name}: {', '.join(ids[:3])}" for name, ids in found.items())
        raise HistoError(
            f"cases were detected as tasks with different regions ({groups}); pass --labels TASK"
        )
    return schemes[0] if schemes else get_scheme("2021")


def score_files(pred_path: Path, case: Case, with_hd95: bool = True) -> dict[str, float]:
    """Metrics of one prediction file against the case's label file (same grid required)."""
    pred_img, ref_img = read_nifti(pred_path), read_nifti(case.seg)
    if pred_img.shape != ref_img.shape:
        raise InputFileError(pred_path, f"shape {pred_img.shape} differs from the reference {ref_img.shape}")
    if not np.allclose(pred_img.affine, ref_img.affine, atol=1e-3):
        raise InputFileError(pred_path, f"affine differs from the reference {case.seg.name}")
    pred, ref = crop_to_labels(np.asarray(pred_img.dataobj), np.asarray(ref_img.dataobj))
    for path, data in ((pred_path, pred), (case.seg, ref)):
        try:
            check_values(data, case.scheme)
        except ValueError as e:
            raise InputFileError(path, label_error(e, case)) from None
    return evaluate_case(pred, ref, case.scheme, spacing_of(ref_img.header), with_hd95)
