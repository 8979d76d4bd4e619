"""Vahadane et al. 2016 stain vectors: sparse non-negative factorisation of tissue OD, V ≈ C W with C, W >= 0,
rows of W unit length and an L1 penalty on C (each pixel mostly one stain), i.e. the paper's objective
min 1/2 ||V - C W||^2 + lambda |C|_1, solved by a fixed number of multiplicative updates from the Macenko
vectors of the same pixels on a fixed sample of them (deterministic, about 50 ms a tile).

lambda is 0.02 (OD in natural-log units): the paper's 0.1 lets one stain's concentrations die out on real
tiles under these updates, and its vector then drifts to pure red. tiatoolbox's own Vahadane extractor is
marked unstable by its authors (scikit-learn's dictionary learning given the transposed data) and is not
the reference here: the tests check recovery of known stains instead.
"""

from __future__ import annotations

import numpy as np

from pathology.stain.macenko import h_first

REGULARIZER = 0.02
ITERATIONS = 100
SAMPLE_PX = 20_000  # tissue pixels the factorisation sees (a fixed random subset of larger tiles)
EPS = 1e-9


def vahadane_stain_matrix(od: np.ndarray, start: np.ndarray) -> np.ndarray:
    """Unit stain vectors (2 x 3, rows H and E) of tissue OD pixels (N, 3), refined from `start` (2 x 3)."""
    if len(od) > SAMPLE_PX:
        od = od[np.random.default_rng(0).choice(len(od), SAMPLE_PX, replace=False)]
    w = np.array(start, np.float64)
    c = np.maximum(od @ np.linalg.pinv(w), EPS)
    for _ in range(ITERATIONS):
        c *= (od @ w.T) / (c @ (w @ w.T) + REGULARIZER + EPS)
        w *= (c.T @ od) / ((c.T @ c) @ w + EPS)
        norms = np.linalg.norm(w, axis=1, keepdims=True)
        w /= norms
        c *= norms.T
    return h_first(w[0], w[1])
