"""Tissue masks on a low-resolution image taken at a fixed physical resolution (µm/px).

Default: the Yottixel rule in HSD space (van der Laak et al. 2000: density D = mean optical density over
R, G, B; chromatic cx = OD_R / D - 1, cy = (OD_G - OD_B) / (sqrt(3) D)). Grey pixels with RGB std < 5 are
background, and a channel averaged by a mean filter must reach a threshold. `tissue.hsd_channel`: density
(D >= 0.05, histo's default) or cy (cy >= 0.05, the authors' code, which rejects green ink and neutral dark
artefacts: their cy is negative or zero). `tissue.filter_rule`: physical (a `filter_um` square) or yottixel
(30 px of a 500 px thumbnail: 6 % of the slide's long side, about 1.5 mm on a 25 mm slide). Option: Otsu's
threshold on HSV saturation. Pen ink (`tissue.ink`) is cut out afterwards (pathology/ink.py).
Working at a fixed µm/px makes the mask independent of the slide's pyramid layout.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from pathology.config import TissueConfig

ROW_BLOCK = 256  # image rows per block of float64 per-pixel work (bounds memory)


YOTTIXEL_FILTER = (
    30 / 500
)  # the authors' 30 px mean filter on a ~500 px thumbnail, as a share of the long side
EPS = np.finfo(np.float64).eps


def _od(rgb: np.ndarray) -> np.ndarray:
    x = rgb.astype(np.float64) / 255.0
    x[x == 0.0] = EPS
    return -np.log(x)


def hsd_density(rgb: np.ndarray) -> np.ndarray:
    """HSD density D: the mean over R, G, B of the optical density -ln(I / 255), zero intensity -> eps."""
    return _od(rgb).mean(axis=2)


def hsd_cy(rgb: np.ndarray) -> np.ndarray:
    """HSD chromatic cy = (OD_G - OD_B) / (sqrt(3) D), D = 0 -> eps (white: cy = 0), as the authors' RGB2HSD."""
    od = _od(rgb)
    d = od.mean(axis=2)
    d[d == 0.0] = EPS
    return (od[..., 1] - od[..., 2]) / (np.sqrt(3.0) * d)


HSD_CHANNELS = {"density": hsd_density, "cy": hsd_cy}


def hsd_mask(
    rgb: np.ndarray, std_threshold: float, density_threshold: float, filter_px: int, channel: str = "density"
) -> np.ndarray:
    """Yottixel mask: grey pixels (std over RGB < threshold) become white, then the HSD `channel` (density
    or cy) averaged over a filter_px square (mirrored border) must reach `density_threshold`.

    The per-pixel float64 work runs over row blocks, so a mask image of many megapixels needs about
    two float64 planes rather than a dozen."""
    grey = np.empty(rgb.shape[:2], bool)
    density = np.empty(rgb.shape[:2], np.float64)
    for r in range(0, rgb.shape[0], ROW_BLOCK):
        block = rgb[r : r + ROW_BLOCK]
        grey[r : r + ROW_BLOCK] = block.astype(np.float64).std(axis=2) < std_threshold
        cleaned = block.copy()
        cleaned[grey[r : r + ROW_BLOCK]] = 255
        density[r : r + ROW_BLOCK] = HSD_CHANNELS[channel](cleaned)
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
        mask = otsu_saturation_mask(rgb, cfg.otsu_min_saturation)
    else:
        filter_px = filter_size(cfg, rgb.shape[:2], mpp)
        threshold = cfg.cy_threshold if cfg.hsd_channel == "cy" else cfg.density_threshold
        mask = hsd_mask(rgb, cfg.std_threshold, threshold, filter_px, cfg.hsd_channel)
    if cfg.ink:
        from pathology.ink import ink_regions

        mask &= ~ink_regions(rgb, cfg.ink, speck_px=1, margin_px=round(cfg.ink_margin_um / mpp))
    return mask


def filter_size(cfg: TissueConfig, shape: tuple[int, int], mpp: float) -> int:
    """Side in pixels of the HSD mean filter on an image of `shape` at `mpp` µm/px."""
    if cfg.filter_rule == "yottixel":
        return max(1, round(YOTTIXEL_FILTER * max(shape)))
    return max(1, round(cfg.filter_um / mpp))


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
