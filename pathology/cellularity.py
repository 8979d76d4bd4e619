"""Cellularity: a tile's nuclei-pixel fraction or nuclei density from the haematoxylin channel; the keep rule.

Haematoxylin comes from Ruifrok-Johnston colour deconvolution (the same numbers as `skimage.color.rgb2hed`).
A pixel is a nucleus pixel when its (lightly smoothed) haematoxylin density exceeds the local background
- a grey-level opening over a square about one nucleus wide - by a threshold (a white top-hat). Nuclei
are small dense blobs; flat regions (glass, pen ink, folds, uniformly stained stroma) have no top-hat
response. Thresholds were set on the shared real tiles (see tests/test_cellularity.py).

Two scores (`cellularity.score`): `pixel_fraction` (the default), the share of nucleus pixels, which
counts a few large nuclei like many small ones; and `nuclei_density`, nuclei per mm² of tile: connected
components of the same mask, touching nuclei split at the peaks of its distance transform (one nucleus
per peak, peaks at least half a nucleus radius apart; what a watershed of the distance transform would
separate), specks under `MIN_NUCLEUS_UM2` dropped. scripts/cellularity_ranking.py measures both on real
tiles.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import get_args

import numpy as np
from scipy import ndimage

from pathology.config import CellularityConfig, CellularityScore

H_THRESHOLD = 0.01  # haematoxylin OD above the local background
RADIUS_PX = 6  # half-width of the background window, about one nucleus radius at 1 µm/px
SCORES = get_args(CellularityScore)  # cellularity.score
MIN_NUCLEUS_UM2 = 12.0  # smaller mask components are specks, not nuclei (a 4 µm disc)


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
    rgb: np.ndarray,
    h_threshold: float = H_THRESHOLD,
    radius_px: int = RADIUS_PX,
    sigma: float = 1.0,
    ink: tuple[str, ...] = (),
) -> np.ndarray:
    """Binary nuclei mask (H x W bool): white top-hat of the haematoxylin density above `h_threshold`;
    with `ink` colours, pen strokes (pathology/ink.py) are never nuclei, so ink cannot win the ranking."""
    h = haematoxylin(rgb)
    if sigma > 0:
        h = ndimage.gaussian_filter(h, sigma)
    side = 2 * radius_px + 1
    background = ndimage.grey_opening(h, size=(side, side), mode="reflect")
    nuclei = (h - background) > h_threshold
    if ink:
        from pathology.ink import ink_regions

        nuclei &= ~ink_regions(rgb, ink, speck_px=radius_px, margin_px=radius_px)
    return nuclei


def cellularity_score(
    rgb: np.ndarray,
    h_threshold: float = H_THRESHOLD,
    radius_px: int = RADIUS_PX,
    sigma: float = 1.0,
    ink: tuple[str, ...] = (),
) -> float:
    """Fraction of nucleus pixels in an RGB uint8 tile (0 = no nuclei; higher = more cellular)."""
    return float(nuclei_mask(rgb, h_threshold, radius_px, sigma, ink).mean())


def nuclei_count(mask: np.ndarray, mpp: float, split_um: float, min_area_um2: float = MIN_NUCLEUS_UM2) -> int:
    """Nuclei in a nuclei mask at `mpp` µm/px: each connected component of at least `min_area_um2` counts
    as many nuclei as its distance transform has peaks (at least one) at least `split_um` apart."""
    components, n = ndimage.label(mask)
    if n == 0:
        return 0
    areas = np.bincount(components.ravel(), minlength=n + 1)[1:] * mpp**2
    dist = ndimage.distance_transform_edt(mask)
    side = 2 * max(1, round(split_um / mpp)) + 1
    peaks, n_peaks = ndimage.label(mask & (dist >= ndimage.maximum_filter(dist, size=side)))
    if n_peaks:
        owner = ndimage.maximum(components, peaks, np.arange(1, n_peaks + 1)).astype(np.int64)
        per_component = np.bincount(owner, minlength=n + 1)[1:]
    else:
        per_component = np.zeros(n, np.int64)
    return int(np.maximum(per_component, 1)[areas >= min_area_um2].sum())


def nuclei_density(
    rgb: np.ndarray,
    mpp: float,
    h_threshold: float = H_THRESHOLD,
    radius_px: int = RADIUS_PX,
    sigma: float = 1.0,
    ink: tuple[str, ...] = (),
) -> float:
    """Nuclei per mm² of an RGB uint8 tile read at `mpp` µm/px (touching nuclei split, see `nuclei_count`)."""
    mask = nuclei_mask(rgb, h_threshold, radius_px, sigma, ink)
    count = nuclei_count(mask, mpp, split_um=radius_px * mpp / 2)
    return count / (mask.size * mpp**2 * 1e-6)


def tile_scorer(
    cfg: CellularityConfig, mpp: float, ink: tuple[str, ...] = ()
) -> Callable[[np.ndarray], float]:
    """The configured cellularity score (`cfg.score`) of an RGB tile read at `mpp` µm/px; pen ink of the
    `ink` colours never counts as nuclei."""
    radius_px = max(1, round(cfg.nucleus_radius_um / mpp))
    if cfg.score == "nuclei_density":
        return partial(nuclei_density, mpp=mpp, h_threshold=cfg.h_threshold, radius_px=radius_px, ink=ink)
    return partial(cellularity_score, h_threshold=cfg.h_threshold, radius_px=radius_px, ink=ink)


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
