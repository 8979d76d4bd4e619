"""Overlap and surface-distance definitions for binary masks (REFERENCE.md §5 and §8), each named once.

Surfaces: a mask's voxels minus its binary erosion (6-connectivity, outside the array = background).
Surface distances: for each surface voxel of one mask, the Euclidean distance in mm (voxel spacing per
axis) to the nearest surface voxel of the other, from one distance transform per direction computed on
the masks' common bounding box (the box holds every surface voxel, so the distances are exact).
Two HD95 definitions reduce the same distances:
- `hd95` (legacy, BraTS 2018-2021 and MONAI's `compute_hausdorff_distance(percentile=95)`): the larger of
  the two directed 95th percentiles;
- `hd95_pooled` (the official `brats-evaluation`/panoptica scorer, as medpy): the 95th percentile of both
  directions' distances pooled.
Percentiles interpolate linearly (numpy's default, as both references).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

HD95_ONE_EMPTY = 373.13  # legacy: HD95 when exactly one mask is empty
OFFICIAL_PENALTY = 373.0  # the official scorer's HD95 for an infinite distance (the SRI24 cube diagonal)
HD95_DEFINITION = (
    "max of the two directed 95th percentiles of surface-voxel distances in mm "
    "(as MONAI compute_hausdorff_distance, percentile=95; surface = mask XOR erosion, 6-connectivity)"
)
HD95_POOLED_DEFINITION = (
    "95th percentile of the surface-voxel distances of both directions pooled, in mm "
    "(as the official brats-evaluation/panoptica scorer and medpy; surface = mask XOR erosion, 6-connectivity)"
)
_CROSS = ndimage.generate_binary_structure(3, 1)


def dice(pred: np.ndarray, ref: np.ndarray) -> float:
    """Legacy Dice 2|P∩R| / (|P| + |R|); both empty = 1, one empty = 0."""
    pred, ref = np.asarray(pred, dtype=bool), np.asarray(ref, dtype=bool)
    total = int(pred.sum()) + int(ref.sum())
    if total == 0:
        return 1.0
    return 2.0 * int(np.logical_and(pred, ref).sum()) / total


def bounding_box(mask: np.ndarray, pad: int = 0) -> tuple[slice, ...] | None:
    """Slices of the smallest box holding `mask`'s voxels, grown by `pad` and clipped; None when empty."""
    box = []
    for axis in range(mask.ndim):
        hit = np.flatnonzero(np.any(mask, axis=tuple(a for a in range(mask.ndim) if a != axis)))
        if hit.size == 0:
            return None
        box.append(slice(max(int(hit[0]) - pad, 0), min(int(hit[-1]) + 1 + pad, mask.shape[axis])))
    return tuple(box)


def _surface(mask: np.ndarray) -> np.ndarray:
    structure = _CROSS if mask.ndim == 3 else ndimage.generate_binary_structure(mask.ndim, 1)
    return mask & ~ndimage.binary_erosion(mask, structure=structure, border_value=0)


def surface_distances(
    a: np.ndarray, b: np.ndarray, spacing: Sequence[float]
) -> tuple[np.ndarray, np.ndarray]:
    """(distances from a's surface voxels to b's surface, from b's to a's) in mm; both masks non-empty."""
    a, b = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    if len(spacing) != a.ndim:
        raise ValueError(f"spacing {tuple(spacing)} does not match a {a.ndim}-d mask")
    box = bounding_box(a | b, pad=1)
    if box is None or not a.any() or not b.any():
        raise ValueError("surface distances need two non-empty masks")
    a, b = a[box], b[box]
    # Padding by one keeps erosion exact: a mask touches the box edge only where it touches the array's.
    sa, sb = _surface(a), _surface(b)
    sampling = [float(s) for s in spacing]
    to_b = ndimage.distance_transform_edt(~sb, sampling=sampling)
    to_a = ndimage.distance_transform_edt(~sa, sampling=sampling)
    return to_b[sa], to_a[sb]


def hd95(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float]) -> float:
    """Legacy HD95 in mm (HD95_DEFINITION); both empty = 0, exactly one empty = 373.13."""
    pred, ref = np.asarray(pred, dtype=bool), np.asarray(ref, dtype=bool)
    if len(spacing) != pred.ndim:
        raise ValueError(f"spacing {tuple(spacing)} does not match a {pred.ndim}-d mask")
    has_pred, has_ref = bool(pred.any()), bool(ref.any())
    if not has_pred and not has_ref:
        return 0.0
    if has_pred != has_ref:
        return HD95_ONE_EMPTY
    return directed_hd95(*surface_distances(pred, ref, spacing))


def directed_hd95(d_ab: np.ndarray, d_ba: np.ndarray) -> float:
    """The larger of the two directed 95th percentiles (the legacy reduction)."""
    return float(max(np.percentile(d_ab, 95), np.percentile(d_ba, 95)))


def pooled_hd95(d_ab: np.ndarray, d_ba: np.ndarray) -> float:
    """The 95th percentile of both directions pooled (the official reduction)."""
    return float(np.percentile(np.concatenate([d_ab, d_ba]), 95))


def hd95_pooled(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float]) -> float:
    """HD95 in mm of two non-empty masks as the official scorer defines it (HD95_POOLED_DEFINITION)."""
    return pooled_hd95(*surface_distances(pred, ref, spacing))


def region_metrics(
    pred: np.ndarray,
    ref: np.ndarray,
    spacing: Sequence[float],
    names: Sequence[str] = ("TC", "WT", "ET"),
    with_hd95: bool = True,
) -> dict[str, float]:
    """Legacy Dice and (unless `with_hd95` is False) HD95 per channel `names` of (C, …) masks:
    {"dice_TC": …, "hd95_TC": …}."""
    out: dict[str, float] = {}
    for i, name in enumerate(names):
        out[f"dice_{name}"] = dice(pred[i], ref[i])
        if with_hd95:
            out[f"hd95_{name}"] = hd95(pred[i], ref[i], spacing)
    return out


def label_map_metrics(
    pred: np.ndarray, ref: np.ndarray, scheme: str, spacing: Sequence[float], with_hd95: bool = True
) -> dict[str, float]:
    """Metrics of thresholded (C, …) channels of the scheme's regions as `segment eval` scores them: through
    the label map `segment predict` writes (`regions_to_labels`, then `labels_to_regions`), so the channels
    nest (ET ⊂ TC ⊂ WT).

    Validation during training and the robustness study score through here, so their Dice is the number
    `segment eval` reports for the same prediction (raw sigmoid channels need not nest)."""
    from segmentation.label_schemes import get_scheme, labels_to_regions, regions_to_labels

    nested = labels_to_regions(regions_to_labels(pred, scheme), scheme)
    return region_metrics(nested, ref, spacing, get_scheme(scheme).channels, with_hd95)
