"""BraTS label maps <-> the three nested evaluation regions [TC, WT, ET] (REFERENCE.md §5).

2018-2021 scheme: 1 necrotic/non-enhancing core, 2 edema, 4 enhancing; 2023 scheme: the same with ET = 3.
TC = {1, ET}, WT = {1, 2, ET}, ET = {ET}; channel order TC, WT, ET as MONAI's BraTS converter.
"""

from __future__ import annotations

import numpy as np

REGIONS = ("TC", "WT", "ET")
SCHEMES = {"2021": {"ncr": 1, "ed": 2, "et": 4}, "2023": {"ncr": 1, "ed": 2, "et": 3}}


def scheme_labels(scheme: str) -> dict[str, int]:
    """Label values {ncr, ed, et} of a scheme name ("2021" for 2018-2021, "2023")."""
    if scheme not in SCHEMES:
        raise ValueError(f"unknown BraTS label scheme {scheme!r}; known: {', '.join(SCHEMES)}")
    return SCHEMES[scheme]


def labels_to_regions(seg: np.ndarray, scheme: str) -> np.ndarray:
    """(…) integer label map -> (3, …) bool [TC, WT, ET]; ValueError on values outside the scheme."""
    lab = scheme_labels(scheme)
    seg = np.asarray(seg)
    values = np.unique(seg)
    if not np.array_equal(values, np.round(values)):
        raise ValueError(f"label map has non-integer values, e.g. {values[values != np.round(values)][:3]}")
    unknown = sorted(set(values.astype(np.int64).tolist()) - {0, *lab.values()})
    if unknown:
        raise ValueError(
            f"label values {unknown} are not in the BraTS {scheme} scheme {{0, 1, 2, {lab['et']}}}"
        )
    et = seg == lab["et"]
    tc = (seg == lab["ncr"]) | et
    wt = tc | (seg == lab["ed"])
    return np.stack([tc, wt, et])


def regions_to_labels(regions: np.ndarray, scheme: str) -> np.ndarray:
    """(3, …) [TC, WT, ET] masks -> uint8 label map; overlaps resolve inner-most first (ET > TC > WT)."""
    lab = scheme_labels(scheme)
    regions = np.asarray(regions, dtype=bool)
    if regions.shape[0] != 3:
        raise ValueError(f"expected 3 region channels [TC, WT, ET], got shape {regions.shape}")
    tc, wt, et = regions
    out = np.zeros(regions.shape[1:], dtype=np.uint8)
    out[wt] = lab["ed"]
    out[tc] = lab["ncr"]
    out[et] = lab["et"]
    return out
