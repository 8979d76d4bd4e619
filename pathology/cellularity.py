"""Cellularity: the nuclei-pixel fraction of a tile from the haematoxylin channel, and the keep rule.

Haematoxylin comes from Ruifrok-Johnston colour deconvolution (the same numbers as `skimage.color.rgb2hed`).
A pixel is a nucleus pixel when its (lightly smoothed) haematoxylin density exceeds the local background
- a grey-level opening over a square about one nucleus wide - by a threshold (a white top-hat). Nuclei
are small dense blobs; flat regions (glass, pen ink, folds, uniformly stained stroma) have no top-hat
response. Thresholds were set on the shared real tiles (see tests/test_cellularity.py).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from pathology.config import CellularityConfig

H_THRESHOLD = 0.01  # haematoxylin OD above the local background
RADIUS_PX = 6  # half-width of the background window, about one nucleus radius at 1 µm/px


# Ruifrok & Johnston stain vectors (rows: haematoxylin, eosin, DAB; columns: R, G, B), as in skimage.
RGB_FROM_HED = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
_H_FROM_OD = np.linalg.inv(RGB_FROM_HED)[:, 0]


def haematoxylin(rgb: np.ndarray) -> np.ndarray:
    """Haematoxylin concentration of an RGB uint8 image (float64, H x W), exactly as
    `skimage.color.rgb2hed(rgb)[..., 0]`: optical density log(max(I/255, 1e-6)) / log(1e-6) times the
    first column of the inverse stain matrix, clipped at 0 (without importing scikit-image)."""
    od = np.log(np.maximum(rgb[..., :3] / 255.0, 1e-6)) / np.log(1e-6)
    return np.maximum(od @ _H_FROM_OD, 0.0)


def nuclei_mask(
    rgb: np.ndarray, h_threshold: float = H_THRESHOLD, radius_px: int = RADIUS_PX, sigma: float = 1.0
) -> np.ndarray:
    """Binary nuclei mask (H x W bool): white top-hat of the haematoxylin density above `h_threshold`."""
    h = haematoxylin(rgb)
    if sigma > 0:
        h = ndimage.gaussian_filter(h, sigma)
    side = 2 * radius_px + 1
    background = ndimage.grey_opening(h, size=(side, side), mode="reflect")
    return (h - background) > h_threshold


def cellularity_score(
    rgb: np.ndarray,
    h_threshold: float = H_THRESHOLD,
    radius_px: int = RADIUS_PX,
    sigma: float = 1.0,
    ink: tuple[str, ...] = (),
) -> float:
    """Fraction of nucleus pixels in an RGB uint8 tile (0 = no nuclei; higher = more cellular); with `ink`
    colours, pixels of pen strokes (pathology/ink.py) never count as nuclei, so ink cannot win the ranking."""
    nuclei = nuclei_mask(rgb, h_threshold, radius_px, sigma)
    if ink:
        from pathology.ink import ink_regions

        nuclei &= ~ink_regions(rgb, ink, speck_px=radius_px, margin_px=radius_px)
    return float(nuclei.mean())


def keep_most_cellular(scores: np.ndarray, cfg: CellularityConfig) -> np.ndarray:
    """Boolean keep mask over tiles by the configured rule (ties broken by tile order).

    top_fraction: the max(1, round(f * n)) highest scores; top_k: the k highest; min_score: every tile
    scoring at least the threshold.
    """
    n = len(scores)
    keep = np.zeros(n, bool)
    if n == 0:
        return keep
    if cfg.rule == "min_score":
        return scores >= cfg.min_score
    count = max(1, round(cfg.top_fraction * n)) if cfg.rule == "top_fraction" else min(n, cfg.top_k)
    keep[np.argsort(-scores, kind="stable")[:count]] = True
    return keep
