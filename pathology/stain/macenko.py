"""Macenko et al. 2009 stain vectors: the plane of the two largest OD principal axes, and the robust
extreme angles of the tissue pixels in it (tiatoolbox's and StainTools' MacenkoExtractor, step by step)."""

from __future__ import annotations

import numpy as np


def h_first(v1: np.ndarray, v2: np.ndarray) -> np.ndarray:
    """The two stain vectors as rows, haematoxylin first: it absorbs red more than eosin does."""
    return np.array([v1, v2]) if v1[0] > v2[0] else np.array([v2, v1])


def macenko_stain_matrix(od: np.ndarray, angular_percentile: float) -> np.ndarray:
    """Unit stain vectors (2 x 3, rows H and E) of tissue OD pixels (N, 3)."""
    _, vectors = np.linalg.eigh(np.cov(od, rowvar=False))
    plane = vectors[:, [2, 1]]
    plane[:, plane[0] < 0] *= -1  # both axes point into positive red OD
    projected = od @ plane
    phi = np.arctan2(projected[:, 1], projected[:, 0])
    lo, hi = np.percentile(phi, (100 - angular_percentile, angular_percentile))
    v1 = plane @ np.array([np.cos(lo), np.sin(lo)])
    v2 = plane @ np.array([np.cos(hi), np.sin(hi)])
    he = h_first(v1, v2)
    return he / np.linalg.norm(he, axis=1, keepdims=True)
