"""3D U-Nets under MRI corruptions: Dice and HD95 per region (TC, WT, ET) on labelled BraTS cases.

Each case is loaded as acquired (`segmentation.data.load_raw`), corrupted, preprocessed exactly as in
training (`segmentation.data.preprocess`), segmented by sliding-window inference and scored with the BraTS
conventions of `segmentation.metrics`. For the ImageNet-C metrics the error of a region is 1 - Dice (HD95
is reported, lower is better). This module supplies the cases, the model loader and the evaluator; the
study (grid, resume, metrics, plots) is `histo.robustness.study`'s.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from histo.batch import BatchSummary
from histo.errors import HistoError
from histo.io import file_sha256
from histo.robustness.grid import select_corruptions
from histo.robustness.study import Model, Study, run_study
from histo.robustness_config import RobustnessConfig, SegmentRobustness

REGIONS = ("TC", "WT", "ET")
METRICS = {
    **{f"dice_{r}": True for r in REGIONS},
    "dice_mean": True,
    **{f"hd95_{r}": False for r in REGIONS},
}


def ras_spacing(affine: np.ndarray) -> tuple[float, ...]:
    """Voxel size (mm) along the RAS-ordered axes of arrays from `load_case`."""
    zooms = nib.affines.voxel_sizes(affine)
    ornt = nib.orientations.io_orientation(affine)
    spacing = [0.0] * 3
    for axis, (target, _) in enumerate(ornt):
        spacing[int(target)] = float(zooms[axis])
    return tuple(spacing)


class Cases:
    """Labelled cases, loaded once and kept in memory up to `cache` cases (the rest re-load per cell)."""

    def __init__(self, data: str | os.PathLike, max_cases: int = 0, cache: int = 8) -> None:
        from segmentation.data import find_cases

        errors: list[dict] = []
        found = find_cases(data, errors)
        self.skipped = [dict(e) for e in errors] + [
            {"case_id": c.case_id, "reason": "no label map"} for c in found if c.seg is None
        ]
        self.cases = [c for c in found if c.seg is not None]
        if max_cases > 0:
            self.cases = self.cases[:max_cases]
        if not self.cases:
            raise HistoError(f"{data}: no labelled BraTS case found")
        self._cache = {i: self._load(i) for i in range(min(cache, len(self.cases)))}

    def _load(self, i: int) -> tuple[np.ndarray, np.ndarray, tuple[float, ...]]:
        from segmentation.data import load_raw

        raw, regions, affine, _ = load_raw(self.cases[i])
        return raw, regions.astype(bool), ras_spacing(affine)

    def __len__(self) -> int:
        return len(self.cases)

    def __getitem__(self, i: int):
        return self._cache[i] if i in self._cache else self._load(i)


def make_evaluate(model: Any, cases: Cases, settings: SegmentRobustness, device: Any):
    """evaluate(corrupt) for `histo.robustness.grid`: mean Dice / HD95 per region over the cases."""
    from segmentation.data import preprocess
    from segmentation.infer import predict_volume
    from segmentation.metrics import label_map_metrics

    def evaluate(corrupt) -> dict[str, float]:
        per_case = []
        for i in range(len(cases)):
            raw, regions, spacing = cases[i]
            image, brain = preprocess(corrupt(raw, i))  # the acquisition is corrupted, then preprocessed
            prob = predict_volume(
                model,
                image,
                roi=settings.roi,
                overlap=settings.overlap,
                device=device,
                brain_mask=brain,
            )
            scheme = cases.cases[i].scheme  # scored on the label map, as `segment eval` scores it
            per_case.append(label_map_metrics(prob >= settings.threshold, regions, scheme, spacing))
        out = {k: float(np.mean([m[k] for m in per_case])) for k in per_case[0]}
        out["dice_mean"] = float(np.mean([out[f"dice_{r}"] for r in REGIONS]))
        return out

    return evaluate


def load_model(path: str | os.PathLike, cases: Cases, settings: SegmentRobustness, device: Any) -> Model:
    """A checkpoint's U-Net (its patch size checked against `segment.roi`) with its evaluator."""
    from segmentation.infer import check_roi
    from segmentation.infer import load_model as load_unet

    net = load_unet(path, device)[0]
    check_roi(net, settings.roi, "segment.roi", path)
    evaluate = make_evaluate(net, cases, settings, device)
    return Model(net, file_sha256(path), lambda alpha: evaluate)  # α-BN wraps it (the grid's part)


def evaluate_segmentation(
    model: str | os.PathLike,
    data: str | os.PathLike,
    out: str | os.PathLike,
    config: RobustnessConfig | Mapping[str, Any] | None = None,
    reference: str | os.PathLike | None = None,
    progress: bool = True,
) -> BatchSummary:
    """The MRI corruption study of `model` on the labelled BraTS cases in `data`, into `out` (CE of
    1 - Dice per region); `config` and `reference` as for `histo.robustness.study.run_study`."""
    from histo.devices import resolve_device
    from segmentation.corruptions import CORRUPTIONS, study_record

    config = RobustnessConfig.coerce(config)
    s = config.segment
    names = select_corruptions(config.corruptions, CORRUPTIONS)
    device = resolve_device(config.run.device)
    cases = Cases(data, s.max_cases, config.run.cache_cases)
    record = study_record(names)  # corruption space, preprocessing and severity table
    study = Study(
        task="segment",
        metrics=METRICS,
        corruptions={n: CORRUPTIONS[n] for n in names},
        load=lambda path: load_model(path, cases, s, device),
        settings={
            "data": str(Path(data).resolve()),
            "segment": s.model_dump(mode="json"),
            "cases": [c.case_id for c in cases.cases],
            **record,
        },
        extra={"n_cases": len(cases), "skipped_cases": cases.skipped, **record},
    )
    return run_study(study, model, reference, out, config, progress)
