"""Tissue masks on a low-resolution image taken at a fixed physical resolution (µm/px).

Default: the Yottixel rule in HSD space (grey pixels with RGB std < 5 are background; the optical
density averaged by a mean filter must reach 0.05). Option: Otsu's threshold on HSV saturation.
Working at a fixed µm/px makes the mask independent of the slide's pyramid layout.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from pathology.config import TissueConfig

ROW_BLOCK = 256  # image rows per block of float64 per-pixel work (bounds memory)


def hsd_density(rgb: np.ndarray) -> np.ndarray:
    """HSD density D: the mean over R, G, B of the optical density -ln(I / 255), zero intensity -> eps."""
    x = rgb.astype(np.float64) / 255.0
    x[x == 0.0] = np.finfo(np.float64).eps
    return (-np.log(x)).mean(axis=2)


def hsd_mask(rgb: np.ndarray, std_threshold: float, density_threshold: float, filter_px: int) -> np.ndarray:
    """Yottixel mask: grey pixels (std over RGB < threshold) become white, then the density averaged
    over a filter_px square (mirrored border) must reach `density_threshold`.

    The per-pixel float64 work runs over row blocks, so a mask image of many megapixels needs about
    two float64 planes rather than a dozen."""
    grey = np.empty(rgb.shape[:2], bool)
    density = np.empty(rgb.shape[:2], np.float64)
    for r in range(0, rgb.shape[0], ROW_BLOCK):
        block = rgb[r : r + ROW_BLOCK]
        grey[r : r + ROW_BLOCK] = block.astype(np.float64).std(axis=2) < std_threshold
        cleaned = block.copy()
        cleaned[grey[r : r + ROW_BLOCK]] = 255
        density[r : r + ROW_BLOCK] = hsd_density(cleaned)
    mean_density = ndimage.uniform_filter(density, size=max(1, filter_px), mode="mirror")
    return ~grey & (mean_density >= density_threshold)


def otsu_saturation_mask(rgb: np.ndarray, min_saturation: float) -> np.ndarray:
    """Otsu's threshold on HSV saturation, never below `min_saturation` (a blank slide has no tissue)."""
    from skimage.color import rgb2hsv
    from skimage.filters import threshold_otsu

    sat = rgb2hsv(rgb)[..., 1]
    threshold = threshold_otsu(sat) if np.ptp(sat) > 0 else 1.0
    return sat > max(threshold, min_saturation)


def tissue_mask(rgb: np.ndarray, cfg: TissueConfig, mpp: float) -> np.ndarray:
    """The configured tissue mask of an RGB image taken at `mpp` µm/px (bool, same height/width)."""
    if cfg.method == "otsu":
        return otsu_saturation_mask(rgb, cfg.otsu_min_saturation)
    return hsd_mask(rgb, cfg.std_threshold, cfg.density_threshold, round(cfg.filter_um / mpp))


def brightfield_problem(rgb: np.ndarray, min_brightness: float) -> str | None:
    """A reason when the image is not a brightfield (H&E-like) slide: its bright background is missing.

    Brightfield glass is near white; fluorescence and dark-field images have a dark background, which the
    HSD rule would take for dense tissue. Uses the 95th percentile of luminance.
    """
    luminance = rgb.mean(axis=2, dtype=np.float64)  # reduces without a float64 copy of the image
    p95 = float(np.percentile(luminance, 95))
    if p95 < min_brightness:
        return (
            f"dark background (95th percentile brightness {p95:.0f} < {min_brightness:.0f}): "
            "not a brightfield H&E slide (fluorescence?)"
        )
    return None
