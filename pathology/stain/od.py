"""Optical density and the tissue pixels that stain estimation looks at (shared by Macenko and Vahadane).

Conventions follow tiatoolbox's `utils.transforms` and StainTools, so a fitted target means the same here
and there: OD = max(-ln(I / 255), 1e-6) with I = 0 read as 1; a pixel is tissue when its CIELAB lightness,
after a 2-98 percentile contrast stretch of the image, is below `luminosity_threshold` (as a fraction of
100). Concentrations are the least-squares solution of OD = C @ M for a 2 x 3 stain matrix M (rows H, E).
"""

from __future__ import annotations

import numpy as np

from histo.errors import HistoError

MIN_TISSUE_PX = 64  # fewer tissue pixels than this give no stable stain estimate


def rgb_to_od(rgb: np.ndarray) -> np.ndarray:
    """Optical density (..., 3) float64 of RGB uint8 pixels."""
    rgb = np.maximum(np.asarray(rgb, np.float64), 1.0)
    return np.maximum(-np.log(rgb / 255.0), 1e-6)


def od_to_rgb(od: np.ndarray) -> np.ndarray:
    """RGB uint8 of optical densities, rounded and clipped to 0-255."""
    return np.clip(np.rint(255.0 * np.exp(-od)), 0, 255).astype(np.uint8)


def _stretch(rgb: np.ndarray) -> np.ndarray:
    """The image with its 2nd-98th percentile of values stretched to 0-255 (tiatoolbox's contrast_enhancer)."""
    low, high = np.percentile(rgb, (2, 98))
    if low >= high:
        low, high = float(rgb.min()), float(rgb.max())
    if high <= low:
        return rgb
    out = (np.clip(rgb.astype(np.float64), low, high) - low) / (high - low) * 255.0
    return out.astype(np.uint8)


def lightness(rgb: np.ndarray) -> np.ndarray:
    """CIELAB L / 100 of sRGB uint8 pixels (D65), computed from luminance alone: equal to
    `skimage.color.rgb2lab(rgb)[..., 0] / 100` at a fraction of its cost."""
    table = np.arange(256) / 255.0
    linear = np.where(table <= 0.04045, table / 12.92, ((table + 0.055) / 1.055) ** 2.4)
    y = linear[rgb[..., 0]] * 0.212671 + linear[rgb[..., 1]] * 0.715160 + linear[rgb[..., 2]] * 0.072169
    f = np.where(y > (6 / 29) ** 3, np.cbrt(y), y / (3 * (6 / 29) ** 2) + 4 / 29)
    return (116.0 * f - 16.0) / 100.0


def tissue_pixels(rgb: np.ndarray, luminosity_threshold: float) -> np.ndarray:
    """Boolean mask (H, W) of the pixels darker than the threshold: the stained tissue."""
    return lightness(_stretch(rgb)) < luminosity_threshold


def tissue_od(rgb: np.ndarray, luminosity_threshold: float) -> np.ndarray:
    """OD (N, 3) of the tissue pixels; HistoError when there are too few to estimate stains from."""
    mask = tissue_pixels(rgb, luminosity_threshold)
    if int(mask.sum()) < MIN_TISSUE_PX:
        raise HistoError(
            f"too little stained tissue to estimate stains ({int(mask.sum())} of {mask.size} pixels have "
            f"lightness below stain.luminosity_threshold {luminosity_threshold})"
        )
    return rgb_to_od(rgb[mask])


def concentrations(od: np.ndarray, stain_matrix: np.ndarray) -> np.ndarray:
    """Stain concentrations (N, 2) of OD rows (N, 3) for a 2 x 3 stain matrix: the least-squares solution
    of OD = C @ M, through the pseudo-inverse of M (full rank: two distinct stains)."""
    return od @ np.linalg.pinv(stain_matrix)
