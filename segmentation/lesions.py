"""Lesion-wise and global scores of one region, defined as the official BraTS scorer (`brats-evaluation`
0.0.10 on panoptica 2.1.7, REFERENCE.md §8) defines them, implemented here.

Lesions: connected components of the region's mask, 26-connectivity (panoptica's cc3d default).
Matching: one-to-one, maximising the summed Dice of the pairs (`scipy.optimize.linear_sum_assignment` on
cost 1 - Dice, pairs below Dice 1e-6 barred), as panoptica's MaxBipartiteMatching with the bundled
configs' threshold. A matched pair is a true positive; an unmatched reference lesion is missed (FN), an
unmatched predicted lesion is spurious (FP). Each matched pair gets its Dice and its pooled HD95
(segmentation.metrics.hd95_pooled, mm).

Lesion-wise means, by the scheme's rule (the package's two parsers):
- "matched" (`parse_seg_results`: glioma, paediatric, meningioma, GoAT): the mean over matched pairs;
  with none matched, Dice 0 and HD95 373 when either side has a lesion (the scorer reports the HD95 as
  infinite; 373 is its penalty elsewhere), NaN when both are empty.
- "penalised" (`parse_mets_results`: metastases): the mean over the reference lesions of at least
  20 mm³ (matched: their scores; missed: Dice 0, HD95 373) and every spurious lesion (0, 373); NaN when
  the reference has no lesion of 20 mm³.
Global scores on the whole region: Dice and pooled HD95 (mm); with no overlap, Dice 0 and HD95 373 (the
scorer's zero-true-positive rule, even when both masks are non-empty), NaN for both when both are empty.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from scipy.optimize import linear_sum_assignment

from segmentation.metrics import OFFICIAL_PENALTY, bounding_box, pooled_hd95, surface_distances

CONNECTIVITY = ndimage.generate_binary_structure(3, 3)  # 26-connected lesions
MATCH_THRESHOLD = 1e-6  # least Dice of a matchable pair (the bundled configs' matching_threshold)
LARGE_LESION_MM3 = 20.0  # parse_mets_results' vol_threshold
RULES = ("matched", "penalised")


@dataclass(frozen=True)
class Lesion:
    """A reference lesion: its volume in mm³ and, when matched, the pair's Dice and HD95 (NaN when not
    computed)."""

    volume: float
    dice: float | None = None
    hd95: float | None = None


@dataclass(frozen=True)
class LesionMatch:
    """The reference lesions of one region and the number of predicted lesions left unmatched."""

    lesions: tuple[Lesion, ...]
    spurious: int

    @property
    def tp(self) -> int:
        return sum(lesion.dice is not None for lesion in self.lesions)

    @property
    def fn(self) -> int:
        return len(self.lesions) - self.tp

    @property
    def fp(self) -> int:
        return self.spurious


def components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """(int32 labels 1..n, n) of the 26-connected components of a 3D mask."""
    labels, n = ndimage.label(mask, structure=CONNECTIVITY)
    return labels.astype(np.int32, copy=False), int(n)


def _pair_dice(ref_lab: np.ndarray, n_ref: int, pred_lab: np.ndarray, n_pred: int) -> np.ndarray:
    """(n_ref, n_pred) Dice of every reference/predicted lesion pair, from one joint count of overlaps."""
    both = (ref_lab > 0) & (pred_lab > 0)
    joint = np.bincount(
        (ref_lab[both].astype(np.int64) - 1) * n_pred + (pred_lab[both] - 1), minlength=n_ref * n_pred
    ).reshape(n_ref, n_pred)
    ref_size = np.bincount(ref_lab.ravel(), minlength=n_ref + 1)[1:]
    pred_size = np.bincount(pred_lab.ravel(), minlength=n_pred + 1)[1:]
    return 2.0 * joint / (ref_size[:, None] + pred_size[None, :])


def match(ref_lab: np.ndarray, n_ref: int, pred_lab: np.ndarray, n_pred: int) -> list[tuple[int, int]]:
    """Matched (reference label, predicted label) pairs: the one-to-one assignment of largest total Dice."""
    if n_ref == 0 or n_pred == 0:
        return []
    scores = _pair_dice(ref_lab, n_ref, pred_lab, n_pred)
    cost = np.where(scores >= MATCH_THRESHOLD, 1.0 - scores, 1.0 + MATCH_THRESHOLD)
    rows, cols = linear_sum_assignment(cost)
    return [(int(r) + 1, int(c) + 1) for r, c in zip(rows, cols, strict=True) if cost[r, c] < 1.0]


def match_lesions(
    pred: np.ndarray,
    ref: np.ndarray,
    spacing: Sequence[float],
    distances: tuple[np.ndarray, np.ndarray] | None = None,
    with_hd95: bool = True,
) -> LesionMatch:
    """Split both masks into lesions, match them and score every matched pair (Dice, and pooled HD95 unless
    `with_hd95` is False: NaN then). `distances`, the whole masks' surface distances, serve a region
    that is one lesion on each side."""
    box = bounding_box(pred | ref, pad=1)
    if box is None:
        return LesionMatch((), 0)
    pred, ref = pred[box], ref[box]
    ref_lab, n_ref = components(ref)
    pred_lab, n_pred = components(pred)
    pairs = dict(match(ref_lab, n_ref, pred_lab, n_pred))
    voxel = float(np.prod(spacing))
    sizes = np.bincount(ref_lab.ravel(), minlength=n_ref + 1)
    ref_boxes, pred_boxes = ndimage.find_objects(ref_lab), ndimage.find_objects(pred_lab)
    lesions = []
    for label in range(1, n_ref + 1):
        volume = float(sizes[label]) * voxel
        if label not in pairs:
            lesions.append(Lesion(volume))
            continue
        other = pairs[label]
        window = _union(ref_boxes[label - 1], pred_boxes[other - 1])
        r, p = ref_lab[window] == label, pred_lab[window] == other
        inter = int(np.count_nonzero(r & p))
        d = 2.0 * inter / (int(sizes[label]) + int(np.count_nonzero(p)))
        whole = distances is not None and n_ref == n_pred == 1  # the pair is the two whole masks
        if not with_hd95:
            lesions.append(Lesion(volume, d, math.nan))
            continue
        lesions.append(
            Lesion(volume, d, pooled_hd95(*(distances if whole else surface_distances(p, r, spacing))))
        )
    return LesionMatch(tuple(lesions), n_pred - len(pairs))


def _union(a: tuple[slice, ...], b: tuple[slice, ...]) -> tuple[slice, ...]:
    return tuple(slice(min(x.start, y.start), max(x.stop, y.stop)) for x, y in zip(a, b, strict=True))


def lesionwise_means(result: LesionMatch, rule: str) -> tuple[float, float]:
    """(lesion-wise Dice, lesion-wise HD95 in mm) of a region under `rule` (see the module docstring)."""
    if rule == "matched":
        matched = [lesion for lesion in result.lesions if lesion.dice is not None]
        if matched:
            return _mean(lesion.dice for lesion in matched), _mean(lesion.hd95 for lesion in matched)
        if result.lesions or result.spurious:
            return 0.0, OFFICIAL_PENALTY
        return math.nan, math.nan
    if rule == "penalised":
        large = [lesion for lesion in result.lesions if lesion.volume >= LARGE_LESION_MM3]
        if not large:
            return math.nan, math.nan
        missed = (0.0, OFFICIAL_PENALTY)
        scores = [missed if lesion.dice is None else (lesion.dice, lesion.hd95) for lesion in large]
        scores += [missed] * result.spurious
        return _mean(s[0] for s in scores), _mean(s[1] for s in scores)
    raise ValueError(f"unknown lesion-wise rule {rule!r}; known: {', '.join(RULES)}")


def _mean(values) -> float:
    return float(np.mean(np.fromiter(values, dtype=np.float64)))


def global_dice(pred: np.ndarray, ref: np.ndarray) -> float:
    """Global Dice of a whole region: NaN when both masks are empty, 0 without overlap."""
    if not pred.any() and not ref.any():
        return math.nan
    return 2.0 * int(np.count_nonzero(pred & ref)) / (int(pred.sum()) + int(ref.sum()))


def global_hd95(pred: np.ndarray, ref: np.ndarray, distances: tuple[np.ndarray, np.ndarray] | None) -> float:
    """Global pooled HD95 in mm of a whole region from its surface distances (None when a mask is empty):
    NaN when both are empty, 373 without overlap (the scorer's zero-true-positive rule)."""
    if not pred.any() and not ref.any():
        return math.nan
    if distances is None or not np.any(pred & ref):
        return OFFICIAL_PENALTY
    return pooled_hd95(*distances)
