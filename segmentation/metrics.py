"""Dice and HD95 per BraTS region with the challenge's empty-mask conventions (REFERENCE.md §5).

HD95 here is MONAI's: surface voxels = mask XOR its binary erosion (6-connectivity, outside = background),
exact Euclidean distances in mm (voxel spacing), the 95th percentile (linear interpolation) of each
directed set, and the maximum of the two directions.
"""

from __future__ import annotations

import csv
import io
import math
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from histo.batch import BatchSummary, Outcome, run_batch
from histo.errors import InputFileError
from histo.io import atomic_write_json, atomic_write_text
from segmentation.config import SegmentConfig
from segmentation.data import Case, read_nifti, spacing_of
from segmentation.labels import REGIONS, labels_to_regions, regions_to_labels

HD95_DEFINITION = (
    "max of the two directed 95th percentiles of surface-voxel distances in mm "
    "(MONAI compute_hausdorff_distance, percentile=95; surface = mask XOR erosion, 6-connectivity)"
)
HD95_ONE_EMPTY = 373.13
CONVENTIONS = {
    "dice": "both empty = 1, exactly one empty = 0",
    "hd95": f"both empty = 0, exactly one empty = {HD95_ONE_EMPTY}",
}


def dice(pred: np.ndarray, ref: np.ndarray) -> float:
    """2|P∩R| / (|P| + |R|); both empty = 1, one empty = 0."""
    pred, ref = np.asarray(pred, dtype=bool), np.asarray(ref, dtype=bool)
    total = int(pred.sum()) + int(ref.sum())
    if total == 0:
        return 1.0
    return 2.0 * int(np.logical_and(pred, ref).sum()) / total


def hd95(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float]) -> float:
    """95th-percentile Hausdorff distance in mm (see HD95_DEFINITION); both empty = 0, one empty = 373.13."""
    from monai.metrics import compute_hausdorff_distance

    pred, ref = np.asarray(pred, dtype=bool), np.asarray(ref, dtype=bool)
    if len(spacing) != pred.ndim:
        raise ValueError(f"spacing {tuple(spacing)} does not match a {pred.ndim}-d mask")
    has_pred, has_ref = bool(pred.any()), bool(ref.any())
    if not has_pred and not has_ref:
        return 0.0
    if has_pred != has_ref:
        return HD95_ONE_EMPTY
    with warnings.catch_warnings():  # MONAI's own internal call of a deprecated argument
        warnings.simplefilter("ignore", FutureWarning)
        value = compute_hausdorff_distance(
            torch.from_numpy(pred)[None, None],
            torch.from_numpy(ref)[None, None],
            include_background=True,
            percentile=95,
            spacing=[float(s) for s in spacing],
        )
    return float(value.item())


def evaluate_case(
    pred_labels: np.ndarray, ref_labels: np.ndarray, scheme: str, spacing: Sequence[float]
) -> dict[str, float]:
    """Dice and HD95 of TC, WT, ET between two label maps of one scheme: {"dice_TC": …, "hd95_TC": …}."""
    if pred_labels.shape != ref_labels.shape:
        raise ValueError(f"prediction shape {pred_labels.shape} != reference shape {ref_labels.shape}")
    return region_metrics(
        labels_to_regions(pred_labels, scheme), labels_to_regions(ref_labels, scheme), spacing
    )


def region_metrics(
    pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float], with_hd95: bool = True
) -> dict[str, float]:
    """Dice and (unless `with_hd95` is False) HD95 per channel of (3, …) [TC, WT, ET] masks."""
    out: dict[str, float] = {}
    for i, name in enumerate(REGIONS):
        out[f"dice_{name}"] = dice(pred[i], ref[i])
        if with_hd95:
            out[f"hd95_{name}"] = hd95(pred[i], ref[i], spacing)
    return out


def label_map_metrics(
    pred: np.ndarray, ref: np.ndarray, scheme: str, spacing: Sequence[float], with_hd95: bool = True
) -> dict[str, float]:
    """Metrics of thresholded (3, …) [TC, WT, ET] channels as `segment eval` scores them: through the label
    map `segment predict` writes (`regions_to_labels`, then `labels_to_regions`), so ET ⊂ TC ⊂ WT.

    Validation during training and the robustness study score through here, so their Dice is the number
    `segment eval` reports for the same prediction (raw sigmoid channels need not nest)."""
    nested = labels_to_regions(regions_to_labels(pred, scheme), scheme)
    return region_metrics(nested, ref, spacing, with_hd95)


METRIC_KEYS = [f"{m}_{r}" for m in ("dice", "hd95") for r in REGIONS]


def summarize(outcomes: Sequence[Outcome]) -> dict[str, dict[str, float]]:
    """Mean, std, median, 25th/75th percentiles of every metric over the cases done."""
    done = [o.detail for o in outcomes if o.status == "done"]
    stats: dict[str, dict[str, float]] = {}
    for key in [k for k in METRIC_KEYS if not done or k in done[0]]:  # HD95 may be off (eval.hd95)
        values = np.array([d[key] for d in done], dtype=np.float64)
        if values.size == 0:
            stats[key] = {s: math.nan for s in ("mean", "std", "median", "q25", "q75")}
            continue
        stats[key] = {
            "mean": float(values.mean()),
            "std": float(values.std()),
            "median": float(np.median(values)),
            "q25": float(np.percentile(values, 25)),
            "q75": float(np.percentile(values, 75)),
        }
    return stats


def write_report(outcomes: Sequence[Outcome], out_dir: str | os.PathLike) -> BatchSummary:
    """Write per-case `metrics.csv` and `summary.json` (the summary's JSON, atomic) into `out_dir`."""
    out_dir = Path(out_dir)
    metrics = summarize(outcomes)
    fields = ["case_id", "status", "reason", *metrics]
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
        extra={"metrics": metrics, "hd95_definition": HD95_DEFINITION, "conventions": CONVENTIONS},
    )
    atomic_write_json(out_dir / "summary.json", batch.to_dict())
    return batch


NO_LABELS = "no label file (*_seg) to evaluate against"


def evaluate_predictions(
    pred_dir: str | os.PathLike,
    data_dir: str | os.PathLike,
    out_dir=None,
    config: SegmentConfig | Mapping[str, Any] | None = None,
    progress: bool = True,
) -> BatchSummary:
    """Score `<pred_dir>/<case_id>.nii.gz` against each labelled case under `data_dir`; per-case CSV and
    summary JSON go to `out_dir` (default `pred_dir`). A missing or mismatched prediction fails its case,
    a case without a label map is skipped; no labelled case at all is an InputFileError (nothing written).
    `config`: a SegmentConfig, None (the defaults) or a mapping over the defaults (its `eval` applies)."""
    from segmentation.data import CaseFolder, case_folders, find_case

    settings = SegmentConfig.coerce(config).eval
    pred_dir, data_dir = Path(pred_dir), Path(data_dir)
    if not pred_dir.is_dir():
        raise InputFileError(pred_dir, "prediction folder not found")
    if not data_dir.is_dir():
        raise InputFileError(data_dir, "data folder not found")

    def score(item: CaseFolder) -> Outcome:
        case = find_case(item.path)
        if case.seg is None:
            return Outcome.skipped(case.case_id, item.path, NO_LABELS)
        found = [p for p in (pred_dir / f"{case.case_id}{s}" for s in (".nii.gz", ".nii")) if p.exists()]
        if not found:
            return Outcome.failed(
                case.case_id, item.path, f"no prediction {case.case_id}.nii.gz in {pred_dir}"
            )
        scores = _score(found[0], case, settings.hd95)
        return Outcome.done(case.case_id, item.path, prediction=str(found[0]), **scores)

    items = [CaseFolder(f.name, f) for f in case_folders(data_dir)]
    if not items:
        raise InputFileError(data_dir, "no case folders with NIfTI files found")
    outcomes = run_batch(items, score, desc="evaluate", unit="case", progress=progress)
    if all(o.status == "skipped" for o in outcomes):
        raise InputFileError(data_dir, "no case with a label file (*_seg) to evaluate against")
    return write_report(outcomes, out_dir if out_dir is not None else pred_dir)


def _score(pred_path: Path, case: Case, with_hd95: bool) -> dict[str, float]:
    """Metrics of one prediction file against the case's label file (same grid required)."""
    pred_img, ref_img = read_nifti(pred_path), read_nifti(case.seg)
    if pred_img.shape != ref_img.shape:
        raise InputFileError(pred_path, f"shape {pred_img.shape} differs from the reference {ref_img.shape}")
    if not np.allclose(pred_img.affine, ref_img.affine, atol=1e-3):
        raise InputFileError(pred_path, f"affine differs from the reference {case.seg.name}")
    regions = []
    for path, img in ((pred_path, pred_img), (case.seg, ref_img)):
        try:
            regions.append(labels_to_regions(np.asarray(img.dataobj), case.scheme))
        except ValueError as e:
            raise InputFileError(path, str(e)) from None
    return region_metrics(regions[0], regions[1], spacing_of(ref_img.header), with_hd95)
