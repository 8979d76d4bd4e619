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

from histo.errors import InputFileError
from histo.io import atomic_write_json, atomic_write_text
from segmentation.config import SegmentConfig
from segmentation.data import Case, find_cases, read_nifti, spacing_of
from segmentation.labels import REGIONS, labels_to_regions

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


METRIC_KEYS = [f"{m}_{r}" for m in ("dice", "hd95") for r in REGIONS]


def summarize(rows: Sequence[dict]) -> dict:
    """Mean, std, median, 25th/75th percentiles of every metric over the cases with status "ok"."""
    ok = [r for r in rows if r.get("status") == "ok"]
    stats: dict[str, dict[str, float]] = {}
    for key in [k for k in METRIC_KEYS if not ok or k in ok[0]]:  # HD95 may be off (eval.hd95)
        values = np.array([r[key] for r in ok], dtype=np.float64)
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
    return {
        "n_cases": len(rows),
        "n_ok": len(ok),
        "failed": [{"case_id": r["case_id"], "reason": r.get("reason", "")} for r in rows if r not in ok],
        "metrics": stats,
        "hd95_definition": HD95_DEFINITION,
        "conventions": CONVENTIONS,
    }


def write_report(rows: Sequence[dict], out_dir: str | os.PathLike) -> dict:
    """Write per-case `metrics.csv` and `summary.json` (atomic) into `out_dir`; return the summary."""
    out_dir = Path(out_dir)
    summary = summarize(rows)
    fields = ["case_id", "status", "reason", *summary["metrics"]]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fields, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(out_dir / "metrics.csv", buffer.getvalue())
    atomic_write_json(out_dir / "summary.json", summary)
    return summary


def evaluate_predictions(
    pred_dir: str | os.PathLike,
    data_dir: str | os.PathLike,
    out_dir=None,
    config: SegmentConfig | Mapping[str, Any] | None = None,
) -> dict:
    """Score `<pred_dir>/<case_id>.nii.gz` against each labelled case under `data_dir`; per-case CSV and
    summary JSON go to `out_dir` (default `pred_dir`). Missing or mismatched predictions are recorded.
    `config`: a SegmentConfig, None (the defaults) or a mapping over the defaults (its `eval` applies)."""
    from tqdm import tqdm

    settings = SegmentConfig.coerce(config).eval

    pred_dir = Path(pred_dir)
    if not pred_dir.is_dir():
        raise InputFileError(pred_dir, "prediction folder not found")
    rows: list[dict] = []
    cases = [c for c in find_cases(data_dir, errors=rows) if c.seg is not None]
    if not cases and not rows:
        raise InputFileError(data_dir, "no cases with a label file (*_seg) to evaluate against")
    for case in tqdm(cases, desc="evaluate", unit="case"):
        found = [pred_dir / f"{case.case_id}{s}" for s in (".nii.gz", ".nii")]
        found = [p for p in found if p.exists()]
        if not found:
            reason = f"no prediction {case.case_id}.nii.gz in {pred_dir}"
            rows.append({"case_id": case.case_id, "status": "error", "reason": reason})
            continue
        try:
            rows.append({"case_id": case.case_id, "status": "ok", **_score(found[0], case, settings.hd95)})
        except InputFileError as e:
            rows.append({"case_id": case.case_id, "status": "error", "reason": str(e)})
    return write_report(rows, out_dir if out_dir is not None else pred_dir)


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
