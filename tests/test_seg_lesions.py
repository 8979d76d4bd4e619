"""Lesion-wise and global scores (the official BraTS definitions) on hand-built lesions: split, merged,
missed and spurious lesions, the matching, both lesion-wise rules and the empty-mask conventions; the
legacy and pooled HD95 against independent computations. The official scorer itself is compared in
tests/test_seg_official.py (the `full` lane)."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from scipy import ndimage

from segmentation.evaluate import evaluate_case, score_region
from segmentation.lesions import components, lesionwise_means, match_lesions
from segmentation.metrics import OFFICIAL_PENALTY, hd95, hd95_pooled

SPACING = (1.0, 1.0, 1.0)


def pooled_reference(pred: np.ndarray, ref: np.ndarray, spacing) -> float:
    """Independent pooled HD95 on the full arrays: medpy's surface distances, both directions pooled."""

    def surface(mask):
        return mask & ~ndimage.binary_erosion(mask, structure=ndimage.generate_binary_structure(3, 1))

    sp, sr = surface(pred), surface(ref)
    d_pr = ndimage.distance_transform_edt(~sr, sampling=spacing)[sp]
    d_rp = ndimage.distance_transform_edt(~sp, sampling=spacing)[sr]
    return float(np.percentile(np.hstack([d_pr, d_rp]), 95))


def volume(shape=(40, 32, 32)) -> np.ndarray:
    return np.zeros(shape, bool)


def test_split_lesion_is_one_match_and_one_spurious():
    ref, pred = volume(), volume()
    ref[10:16, 10:16, 10:16] = True  # 216 voxels
    pred[10:13, 10:16, 10:16] = True  # two halves with a gap plane at x = 13 ... 14
    pred[14:16, 10:16, 10:16] = True
    result = match_lesions(pred, ref, SPACING)
    assert (result.tp, result.fp, result.fn) == (1, 1, 0)
    (lesion,) = result.lesions
    assert lesion.dice == pytest.approx(2 * 108 / (216 + 108))  # the larger half is matched
    bigger = volume()
    bigger[10:13, 10:16, 10:16] = True
    assert lesion.hd95 == pytest.approx(pooled_reference(bigger, ref, SPACING))
    assert lesionwise_means(result, "matched") == (lesion.dice, lesion.hd95)
    # penalised: the matched lesion and the spurious half (Dice 0, HD95 373)
    assert lesionwise_means(result, "penalised") == pytest.approx(
        ((lesion.dice + 0.0) / 2, (lesion.hd95 + OFFICIAL_PENALTY) / 2)
    )


def test_merged_lesions_match_once_and_miss_the_other():
    ref, pred = volume(), volume()
    ref[5:9, 5:9, 5:9] = True
    ref[11:15, 5:9, 5:9] = True  # two 64-voxel lesions, 2 voxels apart
    pred[5:15, 5:9, 5:9] = True  # one lesion over both and the gap (160 voxels)
    result = match_lesions(pred, ref, SPACING)
    assert (result.tp, result.fp, result.fn) == (1, 0, 1)
    matched = [lesion for lesion in result.lesions if lesion.dice is not None]
    assert [m.dice for m in matched] == pytest.approx([2 * 64 / (64 + 160)])
    assert lesionwise_means(result, "matched")[0] == pytest.approx(2 * 64 / 224)
    assert lesionwise_means(result, "penalised")[0] == pytest.approx(2 * 64 / 224 / 2)
    assert lesionwise_means(result, "penalised")[1] == pytest.approx((matched[0].hd95 + OFFICIAL_PENALTY) / 2)


def test_matching_maximises_the_total_dice():
    """A greedy reference-order match would give P to A and leave B with nothing; the optimum is A-P, B-Q."""
    ref, pred = volume((30, 11, 11)), volume((30, 11, 11))
    ref[0:10, 5, 5] = True  # A
    ref[12:22, 5, 5] = True  # B
    pred[5:17, 5, 5] = True  # P: 5 voxels of A, 5 of B (Dice 0.4545 with each)
    pred[19:22, 5, 5] = True  # Q: 3 voxels of B (Dice 0.4615)
    result = match_lesions(pred, ref, SPACING)
    assert (result.tp, result.fp, result.fn) == (2, 0, 0)
    assert sorted(lesion.dice for lesion in result.lesions) == pytest.approx([10 / 22, 6 / 13])


def test_lesions_are_26_connected():
    mask = volume((5, 5, 5))
    mask[1, 1, 1] = mask[2, 2, 2] = True  # corners touch
    mask[4, 4, 4] = True
    assert components(mask)[1] == 2


def test_missed_spurious_and_empty_conventions():
    lesion = volume()
    lesion[5:10, 5:10, 5:10] = True
    empty = volume()
    missed = score_region(empty, lesion, SPACING, "matched")
    assert (missed["lesions_tp"], missed["lesions_fn"], missed["lesions_fp"]) == (0, 1, 0)
    assert (missed["lesionwise_dice"], missed["lesionwise_hd95"]) == (0.0, OFFICIAL_PENALTY)
    assert (missed["global_dice"], missed["global_hd95"]) == (0.0, OFFICIAL_PENALTY)
    assert (missed["legacy_dice"], missed["legacy_hd95"]) == (0.0, 373.13)
    spurious = score_region(lesion, empty, SPACING, "matched")
    assert (spurious["lesions_fp"], spurious["lesionwise_dice"], spurious["global_hd95"]) == (1, 0.0, 373.0)
    # penalised: no reference lesion of 20 mm3 -> no lesion-wise score at all
    assert all(math.isnan(v) for v in lesionwise_means(match_lesions(lesion, empty, SPACING), "penalised"))
    nothing = score_region(empty, empty, SPACING, "matched")
    assert (nothing["legacy_dice"], nothing["legacy_hd95"]) == (1.0, 0.0)
    for key in ("global_dice", "global_hd95", "lesionwise_dice", "lesionwise_hd95"):
        assert math.isnan(nothing[key])


def test_no_overlap_gives_the_global_penalty_but_a_legacy_distance():
    ref, pred = volume(), volume()
    ref[5:10, 5:10, 5:10] = True
    pred[20:25, 5:10, 5:10] = True
    out = score_region(pred, ref, SPACING, "matched")
    assert out["global_dice"] == 0.0 and out["global_hd95"] == OFFICIAL_PENALTY  # the scorer's zero-TP rule
    assert out["legacy_hd95"] == pytest.approx(15.0)
    assert (out["lesions_tp"], out["lesions_fp"], out["lesions_fn"]) == (0, 1, 1)


def test_penalised_rule_counts_large_reference_lesions_and_every_spurious_one():
    ref, pred = volume(), volume()
    ref[2:6, 2:6, 2:6] = True  # 64 voxels, matched exactly
    pred[2:6, 2:6, 2:6] = True
    ref[10:14, 10:14, 10:14] = True  # 64 voxels, missed
    ref[20:22, 20:22, 20:24] = True  # 16 voxels < 20 mm3, missed: left out of the lesion-wise mean
    pred[30:31, 25:26, 25:26] = True  # one spurious voxel
    result = match_lesions(pred, ref, SPACING)
    assert (result.tp, result.fp, result.fn) == (1, 1, 2)
    dice_lw, hd_lw = lesionwise_means(result, "penalised")
    assert dice_lw == pytest.approx((1.0 + 0.0 + 0.0) / 3)
    assert hd_lw == pytest.approx((0.0 + 373.0 + 373.0) / 3)
    assert lesionwise_means(result, "matched") == (1.0, 0.0)
    # voxel volume counts: at 2 mm spacing the 16-voxel lesion is 128 mm3 and joins the mean
    coarse = lesionwise_means(match_lesions(pred, ref, (2.0, 2.0, 2.0)), "penalised")
    assert coarse[0] == pytest.approx(1.0 / 4)


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (0.8, 1.5, 3.0)])
def test_hd95_definitions_against_independent_computations(spacing):
    rng = np.random.default_rng(7)
    pred = ndimage.gaussian_filter(rng.standard_normal((30, 26, 22)), 2) > 0.05
    ref = ndimage.gaussian_filter(rng.standard_normal((30, 26, 22)), 2) > 0.05
    pred[0, 3:8, 4:9] = True  # touching the array border
    assert hd95_pooled(pred, ref, spacing) == pytest.approx(pooled_reference(pred, ref, spacing), rel=1e-9)
    from monai.metrics import compute_hausdorff_distance

    with warnings.catch_warnings():  # MONAI's own internal call of a deprecated argument
        warnings.simplefilter("ignore", FutureWarning)
        expected = compute_hausdorff_distance(
            torch.from_numpy(pred)[None, None],
            torch.from_numpy(ref)[None, None],
            percentile=95,
            spacing=list(spacing),
        )
    assert hd95(pred, ref, spacing) == pytest.approx(float(expected), rel=1e-5)  # legacy = MONAI's


def test_evaluate_case_scores_every_region_of_the_scheme():
    ref = np.zeros((24, 24, 24), np.uint8)
    ref[4:12, 4:12, 4:12] = 2  # SNFH
    ref[6:10, 6:10, 6:10] = 1  # NETC
    ref[7:9, 7:9, 7:9] = 3  # ET
    ref[16:20, 16:20, 16:20] = 4  # RC
    out = evaluate_case(ref, ref, "gli", SPACING)
    for region in ("ET", "TC", "WT", "RC", "NETC", "SNFH"):
        assert out[f"global_dice_{region}"] == 1.0 and out[f"lesionwise_hd95_{region}"] == 0.0
        assert out[f"lesions_tp_{region}"] == 1
    with pytest.raises(ValueError, match=r"label values \[4\] are not in scheme 2023"):
        evaluate_case(ref, ref, "2023", SPACING)
