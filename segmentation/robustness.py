"""3D U-Nets under MRI corruptions: Dice and HD95 per output region of the model's label scheme (TC, WT,
ET for the 2018-2023 glioma tasks; TC, WT, ET, RC for post-treatment glioma and metastases, ...) on
labelled BraTS cases.

Each case is loaded as acquired (`segmentation.data.load_raw`) in the checkpoint's recorded scheme (one
without a scheme: detected per case, channels TC, WT, ET), corrupted, preprocessed exactly as in training
(`segmentation.data.preprocess`), segmented by sliding-window inference and scored with the legacy BraTS
conventions of `segmentation.metrics`. For the ImageNet-C metrics the error of a region is 1 - Dice (HD95
is reported, lower is better). Every model of a study (and its reference) must predict the same regions.
This module supplies the cases, the model loader and the evaluator; the study (grid, resume, metrics,
plots) is `histo.robustness.study`'s.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from histo.batch import BatchSummary, Outcome
from histo.errors import HistoError
from histo.io import file_sha256
from histo.robustness.grid import select_corruptions
from histo.robustness.study import Model, Study, plan_runs, run_study
from histo.robustness_config import RobustnessConfig, SegmentRobustness


def metric_directions(regions: Sequence[str]) -> dict[str, bool]:
    """{metric: higher is better} of a study over the model's output `regions`."""
    return {
        **{f"dice_{r}": True for r in regions},
        "dice_mean": True,
        **{f"hd95_{r}": False for r in regions},
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
    """Labelled cases, loaded once and kept in memory up to `cache` cases (the rest re-load per cell), in
    the label scheme `labels` (None: detected per case) whose channels must be the model's `regions`."""

    def __init__(
        self,
        data: str | os.PathLike,
        max_cases: int = 0,
        cache: int = 8,
        labels: str | None = None,
        regions: Sequence[str] = ("TC", "WT", "ET"),
    ) -> None:
        from segmentation.data import find_cases

        errors: list[dict] = []
        found = find_cases(data, errors, labels)
        self.left_out = [Outcome.failed(e["case_id"], None, e["reason"]) for e in errors] + [
            Outcome.skipped(c.case_id, c.folder, "no label map") for c in found if c.seg is None
        ]
        self.cases = [c for c in found if c.seg is not None]
        if max_cases > 0:
            self.cases = self.cases[:max_cases]
        if not self.cases:
            raise HistoError(f"{data}: no labelled BraTS case found")
        _check_regions(self.cases, tuple(regions))
        self.regions = tuple(regions)
        self._cache = {i: self._load(i) for i in range(min(cache, len(self.cases)))}

    def _load(self, i: int) -> tuple[np.ndarray, np.ndarray, tuple[float, ...]]:
        from segmentation.data import load_raw

        raw, regions, affine, _ = load_raw(self.cases[i])
        return raw, regions.astype(bool), ras_spacing(affine)

    def __len__(self) -> int:
        return len(self.cases)

    def __getitem__(self, i: int):
        return self._cache[i] if i in self._cache else self._load(i)


def _check_regions(cases: Sequence[Any], regions: tuple[str, ...]) -> None:
    """HistoError when a case's label scheme has other channels than the model predicts."""
    from segmentation.label_schemes import get_scheme

    other = [c for c in cases if get_scheme(c.scheme).channels != regions]
    if other:
        found = ", ".join(f"{c.case_id} ({c.scheme}, {c.scheme_source})" for c in other[:3])
        raise HistoError(
            f"the model predicts {list(regions)}, but cases {found} have the channels "
            f"{list(get_scheme(other[0].scheme).channels)}; train a model of their task"
        )


def shared_task(segmenters: Sequence[Any]) -> tuple[str | None, tuple[str, ...]]:
    """(label scheme or None, output regions) that every checkpoint of a study records; HistoError naming
    the first that differs (their scores would not be comparable)."""
    first = segmenters[0]
    for other in segmenters[1:]:
        if (other.labels, other.regions) != (first.labels, first.regions):
            raise HistoError(
                f"{other.path}: predicts {list(other.regions)} (scheme {other.labels}), "
                f"{first.path} {list(first.regions)} (scheme {first.labels}): one task per study"
            )
    return first.labels, first.regions


def make_evaluate(model: Any, cases: Cases, settings: SegmentRobustness, device: Any, scheme: str):
    """evaluate(corrupt) for `histo.robustness.grid`: mean Dice / HD95 per output region over the
    cases (`scheme` maps a labels head's classes to the regions)."""
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
                scheme=scheme,
            )
            mask = prob >= settings.threshold  # scored on the label map, as `segment eval` scores it
            per_case.append(label_map_metrics(mask, regions, cases.cases[i].scheme, spacing))
        out = {k: float(np.mean([m[k] for m in per_case])) for k in per_case[0]}
        out["dice_mean"] = float(np.mean([out[f"dice_{r}"] for r in cases.regions]))
        return out

    return evaluate


def evaluate_segmentation(
    model: str | os.PathLike,
    data: str | os.PathLike,
    out: str | os.PathLike,
    config: RobustnessConfig | Mapping[str, Any] | None = None,
    reference: str | os.PathLike | None = None,
    progress: bool = True,
) -> BatchSummary:
    """The MRI corruption study of `model` on the labelled BraTS cases in `data`, into `out` (CE of
    1 - Dice per output region); `config` and `reference` as for `histo.robustness.study.run_study`.
    The checkpoints are read first: their shared task decides the scheme the cases are read in."""
    from histo.devices import resolve_device
    from segmentation.corruptions import CORRUPTIONS, study_record
    from segmentation.infer import check_roi, load_segmenter

    config = RobustnessConfig.coerce(config)
    s = config.segment
    names = select_corruptions(config.corruptions, CORRUPTIONS)
    device = resolve_device(config.run.device)
    plan, _ = plan_runs(model, reference, config.alpha_bn)
    segmenters = {str(path): load_segmenter(path, device) for _, path, _ in plan}
    for path, segmenter in segmenters.items():
        check_roi(segmenter.model, s.roi, "segment.roi", path)
    labels, regions = shared_task(list(segmenters.values()))
    cases = Cases(data, s.max_cases, config.run.cache_cases, labels, regions)
    scheme = labels or cases.cases[0].scheme  # a checkpoint without a scheme: TC, WT, ET of 2021 or 2023

    def load(path: str | os.PathLike) -> Model:
        net = segmenters[str(path)].model
        evaluate = make_evaluate(net, cases, s, device, scheme)
        return Model(net, file_sha256(path), lambda alpha: evaluate)  # α-BN wraps it (the grid's part)

    record = study_record(names)  # corruption space, preprocessing and severity table
    study = Study(
        task="segment",
        metrics=metric_directions(regions),
        corruptions={n: CORRUPTIONS[n] for n in names},
        load=load,
        settings={
            "data": str(Path(data).resolve()),
            "segment": s.model_dump(mode="json"),
            "cases": [c.case_id for c in cases.cases],
            **record,
        },
        extra={
            "n_cases": len(cases),
            "labels": scheme,
            "regions": list(regions),
            **record,
        },
        left_out=cases.left_out,
    )
    return run_study(study, model, reference, out, config, progress)
