"""Reinhard et al. 2001 colour transfer in CIELAB (as tiatoolbox's and StainTools' ReinhardNormalizer): each
channel of the image is shifted and scaled to the target's mean and standard deviation over all pixels."""

from __future__ import annotations

import numpy as np


def lab_stats(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean, std) of the L, a, b channels over every pixel."""
    from skimage.color import rgb2lab

    lab = rgb2lab(rgb).reshape(-1, 3)
    return lab.mean(axis=0), lab.std(axis=0)


def reinhard(rgb: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """The image with its CIELAB channel statistics moved to (mean, std); RGB uint8."""
    from skimage.color import lab2rgb, rgb2lab

    lab = rgb2lab(rgb)
    own_mean, own_std = lab.reshape(-1, 3).mean(axis=0), lab.reshape(-1, 3).std(axis=0)
    lab = (lab - own_mean) * (std / np.maximum(own_std, 1e-6)) + mean
    lab[..., 0] = np.clip(lab[..., 0], 0, 100)
    return np.clip(np.rint(lab2rgb(lab) * 255.0), 0, 255).astype(np.uint8)
