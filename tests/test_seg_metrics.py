"""Dice and HD95 against an independent float64 scipy computation, with BraTS's empty-mask conventions."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from scipy import ndimage

from histo.batch import Outcome
from segmentation.evaluate import evaluate_case, write_report
from segmentation.label_schemes import labels_to_regions
from segmentation.metrics import HD95_DEFINITION, HD95_ONE_EMPTY, dice, hd95


def reference_hd95(pred: np.ndarray, ref: np.ndarray, spacing) -> float:
    """Surface = mask minus its 6-connected erosion (outside the array counts as background); distances by
    Euclidean distance transform in float64; max of the two directed 95th percentiles."""
    structure = ndimage.generate_binary_structure(pred.ndim, 1)

    def surface(mask):
        return mask & ~ndimage.binary_erosion(mask, structure=structure, border_value=0)

    sp, sr = surface(pred), surface(ref)
    to_ref = ndimage.distance_transform_edt(~sr, sampling=spacing).astype(np.float64)
    to_pred = ndimage.distance_transform_edt(~sp, sampling=spacing).astype(np.float64)
    return max(np.percentile(to_ref[sp], 95), np.percentile(to_pred[sr], 95))


def reference_dice(pred, ref) -> float:
    inter = sum(1.0 for p, r in zip(pred.ravel(), ref.ravel(), strict=True) if p and r)
    return 2.0 * inter / (float(pred.sum()) + float(ref.sum()))


def blob(shape, seed, threshold=0.8, sigma=2.0):
    rng = np.random.default_rng(seed)
    return ndimage.gaussian_filter(rng.standard_normal(shape), sigma) > threshold * 0.1


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (0.8, 1.5, 3.0)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_hd95_and_dice_match_independent_reference(spacing, seed):
    shape = (22, 18, 14)
    pred, ref = blob(shape, seed), blob(shape, seed + 100)
    pred[0, 2:6, 3:7] = True  # a mask touching the array border (its surface includes the border)
    assert ref.any() and 0.05 < pred.mean() < 0.95
    assert hd95(pred, ref, spacing) == pytest.approx(reference_hd95(pred, ref, spacing), rel=1e-5)
    assert dice(pred, ref) == pytest.approx(reference_dice(pred, ref), rel=1e-12)


def test_hd95_uses_spacing_per_axis():
    pred = np.zeros((9, 9, 9), bool)
    ref = np.zeros((9, 9, 9), bool)
    pred[4, 4, 1] = True
    ref[4, 4, 4] = True
    assert hd95(pred, ref, (1.0, 1.0, 2.5)) == pytest.approx(7.5, rel=1e-6)
    assert hd95(pred, ref, (2.5, 1.0, 1.0)) == pytest.approx(3.0, rel=1e-6)


def test_empty_mask_conventions():
    empty = np.zeros((6, 6, 6), bool)
    full = empty.copy()
    full[2:4, 2:4, 2:4] = True
    assert dice(empty, empty) == 1.0 and hd95(empty, empty, (1, 1, 1)) == 0.0
    assert dice(full, empty) == 0.0 and hd95(full, empty, (1, 1, 1)) == HD95_ONE_EMPTY == 373.13
    assert dice(empty, full) == 0.0 and hd95(empty, full, (1, 1, 1)) == 373.13
    assert dice(full, full) == 1.0 and hd95(full, full, (1, 1, 1)) == 0.0


@pytest.mark.parametrize("scheme,et", [("2021", 4), ("2023", 3)])
def test_evaluate_case_per_region(scheme, et):
    shape = (16, 16, 12)
    rng = np.random.default_rng(3)
    ref = np.zeros(shape, np.uint8)
    ref[3:12, 3:12, 2:10] = 2
    ref[5:10, 5:10, 4:8] = 1
    ref[6:9, 6:9, 5:7] = et
    pred = ref.copy()
    pred[rng.random(shape) < 0.05] = 2  # extra edema: WT differs, TC/ET identical
    pred[ref == et] = 0  # no ET predicted: the one-empty convention applies for ET
    out = evaluate_case(pred, ref, scheme, (1.0, 1.0, 2.0))
    regions_p, regions_r = labels_to_regions(pred, scheme), labels_to_regions(ref, scheme)
    for i, name in enumerate(("TC", "WT", "ET")):
        assert out[f"legacy_dice_{name}"] == pytest.approx(dice(regions_p[i], regions_r[i]))
    assert out["legacy_dice_WT"] < 1.0
    assert out["legacy_dice_ET"] == 0.0 and out["legacy_hd95_ET"] == 373.13
    assert out["legacy_hd95_WT"] == pytest.approx(
        reference_hd95(regions_p[1], regions_r[1], (1.0, 1.0, 2.0)), rel=1e-5
    )


def test_report_csv_and_summary(tmp_path):
    metrics = [
        {f"legacy_{m}_{r}": v for m in ("dice", "hd95") for r in ("TC", "WT", "ET")} for v in (1.0, 0.5)
    ]
    outcomes = [
        Outcome.done("a", "/d/a", **metrics[0]),
        Outcome.done("b", "/d/b", **metrics[1]),
        Outcome.failed("c", "/d/c", "no prediction"),
    ]
    summary = write_report(outcomes, tmp_path, "2021")
    assert summary.extra["metrics"]["legacy_dice_WT"]["mean"] == pytest.approx(0.75)
    assert summary.extra["metrics"]["legacy_dice_WT"]["median"] == pytest.approx(0.75)
    assert summary.counts["done"] == 2 and [(o.id, o.reason) for o in summary.failed()] == [
        ("c", "no prediction")
    ]
    assert summary.extra["hd95_definitions"]["legacy"] == HD95_DEFINITION and "MONAI" in HD95_DEFINITION
    with open(tmp_path / "metrics.csv") as f:
        table = list(csv.DictReader(f))
    assert [r["case_id"] for r in table] == ["a", "b", "c"] and table[2]["reason"] == "no prediction"
    assert [r["status"] for r in table] == ["done", "done", "failed"]
    assert len(json.loads((tmp_path / "summary.json").read_text())["outcomes"]) == 3
