"""The Yottixel mosaic: a tile grid, tissue fractions, colour clusters and spatial selection per cluster.

The colour feature is each tile's mean R, G, B. A mean over a tile hardly depends on the resolution it
is taken at, so by default it comes from the low-resolution tissue image already read (no extra I/O);
with an explicit resolution (the authors used about 5x) it comes from one scaled read per run of
adjacent candidate tiles in a grid row - never one level-0 read per candidate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from pathology.config import MosaicConfig
from pathology.slide import Slide

BACKGROUND = 255.0  # what a read outside the slide gives (transparent, composited over white)


@dataclass(frozen=True)
class Grid:
    """A grid of square tiles of `size` level-0 px (float) from the level-0 origin (`x0`, `y0`).

    Its tiles may run past the slide's right and bottom edges (partial edge tiles, read padded with
    background); `Grid.of` gives the whole tiles from the slide's corner.
    """

    size: float
    n_cols: int
    n_rows: int
    x0: int = 0
    y0: int = 0

    @classmethod
    def of(cls, width: int, height: int, size: float) -> Grid:
        return cls(size, int(width // size), int(height // size))

    def origins(self) -> np.ndarray:
        """Level-0 (x, y) of every tile in row-major order, (n_rows * n_cols, 2) int64."""
        rows, cols = np.divmod(np.arange(self.n_rows * self.n_cols), self.n_cols)
        x = self.x0 + np.floor(cols * self.size + 0.5)
        return np.stack([x, self.y0 + np.floor(rows * self.size + 0.5)], 1).astype(np.int64)


def tile_grid(width: int, height: int, size: float, mask: np.ndarray, mosaic: MosaicConfig) -> Grid:
    """The mosaic's grid as `mosaic.edge_tiles` and `mosaic.grid_anchor` ask.

    edge_tiles: `whole` keeps the tiles that fit inside the slide; `partial` also the edge tiles that run
    past it (Yottixel's grid steps over the whole slide; CLAM pads): they are scored on the tissue of the
    part inside the slide and read padded with background. grid_anchor: `slide` starts the grid at the
    slide's corner, `tissue` at the corner of the tissue mask's bounding box (`mask` spans the slide), so
    a small specimen is not cut by a grid laid from the glass's corner. No tissue: a grid of no tiles.
    """
    edge, anchor = mosaic.edge_tiles, mosaic.grid_anchor
    if anchor == "slide":
        box = (0, 0, width, height)
    elif mask.any():
        box = _tissue_box(mask, width, height)
    else:
        return Grid(size, 0, 0)
    x0, y0, x1, y1 = box
    if edge == "whole":
        return Grid(size, int((width - x0) // size), int((height - y0) // size), x0, y0)
    return Grid(size, _cover(x1 - x0, size), _cover(y1 - y0, size), x0, y0)


def _cover(length: float, size: float) -> int:
    """Tiles of `size` covering `length`, less a last one with under 1 px inside."""
    n = math.ceil(length / size)
    return n - 1 if n > 0 and length - (n - 1) * size < 1 else n


def _tissue_box(mask: np.ndarray, width: int, height: int) -> tuple[int, int, int, int]:
    """Level-0 (x0, y0, x1, y1) of the bounding box of a tissue mask spanning the whole slide."""
    sx, sy = width / mask.shape[1], height / mask.shape[0]
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    x0, y0 = math.floor(cols[0] * sx), math.floor(rows[0] * sy)
    return x0, y0, min(width, math.ceil((cols[-1] + 1) * sx)), min(height, math.ceil((rows[-1] + 1) * sy))


def grid_hint(mosaic: MosaicConfig) -> str:
    """What to try when a grid gives no tissue tile: the grid options not in use, then the threshold."""
    options = []
    if mosaic.edge_tiles == "whole":
        options.append("mosaic.edge_tiles: partial (score partial edge tiles on their tissue, read padded)")
    if mosaic.grid_anchor == "slide":
        options.append("mosaic.grid_anchor: tissue (start the grid at the tissue's bounding box)")
    options.append("a smaller tile.px or mosaic.min_tissue_fraction")
    return "try " + ", or ".join(options)


def _overlap_weights(n_tiles: int, tile: float, n_px: int, px: float, origin: float = 0.0) -> np.ndarray:
    """(n_tiles, n_px) overlap of tile t = [o + t*tile, o + (t+1)*tile) and pixel p = [p*px, (p+1)*px)."""
    t0 = origin + np.arange(n_tiles)[:, None] * tile
    p0 = np.arange(n_px)[None, :] * px
    return np.clip(np.minimum(t0 + tile, p0 + px) - np.maximum(t0, p0), 0.0, None)


def _inside(n_tiles: int, tile: float, origin: float, limit: int) -> np.ndarray:
    """(n_tiles,) length of each tile inside [0, limit): exactly `tile` for a tile wholly inside."""
    t0 = origin + np.arange(n_tiles) * tile
    inside = np.clip(np.minimum(t0 + tile, limit) - np.maximum(t0, 0.0), 0.0, None)
    return np.where((t0 >= 0) & (t0 + tile <= limit), tile, inside)


def _box_sums(image: np.ndarray, grid: Grid, width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    """(n_tiles, C) area-weighted sums of an image spanning the whole slide over each grid tile, and the
    (n_tiles,) area of each tile inside the slide (level-0 px²)."""
    mh, mw = image.shape[:2]
    wx = _overlap_weights(grid.n_cols, grid.size, mw, width / mw, grid.x0)
    wy = _overlap_weights(grid.n_rows, grid.size, mh, height / mh, grid.y0)
    planes = image.reshape(mh, mw, -1)  # one float64 plane at a time: memory of a single channel
    sums = np.stack([wy @ planes[..., c].astype(np.float64) @ wx.T for c in range(planes.shape[2])], axis=-1)
    ex = _inside(grid.n_cols, grid.size, grid.x0, width)
    ey = _inside(grid.n_rows, grid.size, grid.y0, height)
    return sums.reshape(grid.n_rows * grid.n_cols, -1), (ey[:, None] * ex[None, :]).ravel()


def box_means(image: np.ndarray, grid: Grid, width: int, height: int) -> np.ndarray:
    """Area-weighted mean of an image spanning the whole slide over each grid tile as it is read: the
    part of a tile outside the slide counts as background (white).

    Image pixel (r, c) covers level-0 [c*sx, (c+1)*sx) x [r*sy, (r+1)*sy) with sx = width / image
    width; returns (n_rows * n_cols,) for a 2-D image, (n_rows * n_cols, C) for H x W x C.
    """
    sums, area = _box_sums(image, grid, width, height)
    means = (sums + BACKGROUND * (grid.size**2 - area)[:, None]) / grid.size**2
    return means[:, 0] if image.ndim == 2 else means


def tissue_fractions(mask: np.ndarray, grid: Grid, width: int, height: int) -> np.ndarray:
    """Fraction of each grid tile's part inside the slide that a tissue mask spanning the whole slide
    covers (n_rows * n_cols,): a partial edge tile is scored on its tissue area, as Yottixel does."""
    sums, area = _box_sums(mask, grid, width, height)
    return sums[:, 0] / np.maximum(area, 1e-12)


def tile_means(image: np.ndarray, origins: np.ndarray, size: float, width: int, height: int) -> np.ndarray:
    """Area-weighted mean of an H x W x C image spanning the whole slide over squares of `size` level-0
    px at arbitrary `origins` (N, 2) (e.g. given patches, not a grid): (N, C); only the part of a square
    on the slide counts."""
    mh, mw = image.shape[:2]
    sx, sy = width / mw, height / mh
    out = np.zeros((len(origins), image.shape[2]), np.float64)
    for i, (x0, y0) in enumerate(np.asarray(origins, np.float64)):
        c0, c1 = max(0, math.floor(x0 / sx)), min(mw, math.ceil((x0 + size) / sx))
        r0, r1 = max(0, math.floor(y0 / sy)), min(mh, math.ceil((y0 + size) / sy))
        if c1 <= c0 or r1 <= r0:
            continue
        wx = _span(x0, size, c0, c1, sx)
        wy = _span(y0, size, r0, r1, sy)
        crop = image[r0:r1, c0:c1].astype(np.float64)
        out[i] = np.einsum("r,rcx,c->x", wy, crop, wx) / (wy.sum() * wx.sum())
    return out


def _span(start: float, size: float, p0: int, p1: int, px: float) -> np.ndarray:
    """Overlap of [start, start + size) with each pixel p0..p1-1 of width `px`."""
    edges = np.arange(p0, p1 + 1) * px
    return np.clip(np.minimum(start + size, edges[1:]) - np.maximum(start, edges[:-1]), 0.0, None)


def colour_features(slide: Slide, origins: np.ndarray, grid: Grid, mpp: float) -> np.ndarray:
    """Mean R, G, B of each tile at `mpp` µm/px, one read per run of horizontally adjacent tiles."""
    tile_out = max(1, round(grid.size * slide.mpp / mpp))
    features = np.zeros((len(origins), 3), np.float64)
    order = np.lexsort((origins[:, 0], origins[:, 1]))
    runs: list[list[int]] = []
    for i in order:
        prev = runs[-1][-1] if runs else None
        adjacent = (
            prev is not None
            and origins[prev, 1] == origins[i, 1]
            and abs(origins[i, 0] - origins[prev, 0] - grid.size) < 1
        )
        if adjacent:
            runs[-1].append(i)
        else:
            runs.append([i])
    for run in runs:
        x0, y0 = origins[run[0]]
        strip = slide.read_scaled(x0, y0, grid.size * len(run), grid.size, tile_out * len(run), tile_out)
        means = strip.reshape(tile_out, len(run), tile_out, 3).mean(axis=(0, 2))
        features[run] = means
    return features


def _kmeans_pp(points: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """k-means++ seeding: each next centre drawn with probability proportional to squared distance."""
    centres = [points[rng.integers(len(points))]]
    d2 = ((points - centres[0]) ** 2).sum(axis=1)
    for _ in range(1, k):
        total = d2.sum()
        p = d2 / total if total > 0 else np.full(len(points), 1.0 / len(points))
        centres.append(points[rng.choice(len(points), p=p)])
        d2 = np.minimum(d2, ((points - centres[-1]) ** 2).sum(axis=1))
    return np.array(centres, np.float64)


def _assign(points: np.ndarray, centres: np.ndarray, chunk: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """Nearest centre of each point and the squared distance, in row chunks (bounded memory)."""
    labels = np.empty(len(points), np.int64)
    d2min = np.empty(len(points))
    c2 = (centres**2).sum(axis=1)
    for i in range(0, len(points), chunk):
        p = points[i : i + chunk]
        d2 = np.maximum((p**2).sum(axis=1)[:, None] - 2.0 * p @ centres.T + c2[None], 0.0)
        labels[i : i + chunk] = d2.argmin(axis=1)
        d2min[i : i + chunk] = d2[np.arange(len(p)), labels[i : i + chunk]]
    return labels, d2min


def kmeans(
    points: np.ndarray, k: int, seed: int, n_init: int = 10, max_iter: int = 300, tol: float = 1e-4
) -> tuple[np.ndarray, np.ndarray]:
    """Lloyd's k-means with k-means++ seeding, best of `n_init` runs by inertia (as scikit-learn's
    KMeans; tol is relative to the mean per-feature variance). Returns (labels, centres).

    Written out because the data are tiny (a few thousand points) and importing scikit-learn costs
    more than the whole clustering.
    """
    points = np.asarray(points, np.float64)
    rng = np.random.default_rng(seed)
    threshold = tol * points.var(axis=0).mean()
    best: tuple[float, np.ndarray, np.ndarray] | None = None
    for _ in range(n_init):
        centres = _kmeans_pp(points, k, rng)
        for _ in range(max_iter):
            labels, _ = _assign(points, centres)
            sums = np.zeros_like(centres)
            np.add.at(sums, labels, points)
            counts = np.bincount(labels, minlength=k)[:, None]
            new = np.where(counts > 0, sums / np.maximum(counts, 1), centres)
            shift = ((new - centres) ** 2).sum()
            centres = new
            if shift <= threshold:
                break
        labels, d2 = _assign(points, centres)
        inertia = float(d2.sum())
        if best is None or inertia < best[0]:
            best = (inertia, labels, centres)
    return best[1], best[2]


def spatial_pick(positions: np.ndarray, n_sel: int, seed: int) -> np.ndarray:
    """Indices of n_sel tiles: k-means on positions, then the real tile nearest each centroid (unique)."""
    if n_sel >= len(positions):
        return np.arange(len(positions))
    _, centres = kmeans(positions, n_sel, seed)
    chosen: list[int] = []
    for c in centres:
        dist = ((positions - c) ** 2).sum(axis=1).astype(np.float64)
        dist[chosen] = np.inf
        chosen.append(int(np.argmin(dist)))
    return np.sort(np.array(chosen, np.int64))


def select_mosaic(
    features: np.ndarray, positions: np.ndarray, n_clusters: int, percent: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Yottixel selection: k-means (k = min(n_clusters, n)) on colour, then in each cluster
    max(1, int(len * percent / 100)) tiles by spatial k-means on (y, x).

    Returns (indices into the candidates, sorted; colour cluster of each).
    """
    k = min(n_clusters, len(features))
    labels, _ = kmeans(features, k, seed)
    picked, clusters = [], []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        n_sel = n_selected_per_cluster(len(members), percent)
        chosen = members[spatial_pick(positions[members], n_sel, seed)]
        picked.append(chosen)
        clusters.append(np.full(len(chosen), c))
    idx, cl = np.concatenate(picked), np.concatenate(clusters)
    order = np.argsort(idx, kind="stable")
    return idx[order], cl[order].astype(np.int32)


def n_selected_per_cluster(size: int, percent: float) -> int:
    """Tiles kept from a colour cluster of `size` tiles (the published rule)."""
    return max(1, math.floor(size * percent / 100))
