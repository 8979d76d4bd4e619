"""QC picture of a tiled slide: thumbnail, tissue-mask outline, mosaic tiles and high-cellularity tiles."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np


def write_qc(tileset, path: str | os.PathLike) -> Path:
    """PNG of the tissue-mask image with the mask outline (yellow), mosaic tiles (blue) and the selected
    high-cellularity tiles (red); the title carries the outcome and its reason."""
    from matplotlib.patches import Rectangle

    from histo.plots import plt, save_figure

    rec = tileset.record
    thumb = tileset.thumbnail
    fig, ax = plt.subplots(figsize=(7, 7 * thumb.shape[0] / max(1, thumb.shape[1]) + 0.6))
    ax.imshow(thumb)
    sx, sy = thumb.shape[1] / rec.width, thumb.shape[0] / rec.height
    if tileset.mask is not None and tileset.mask.any() and not tileset.mask.all():
        ax.contour(tileset.mask.astype(float), levels=[0.5], colors="yellow", linewidths=0.8)
    side = rec.tile_size_level0
    for (x, y), sel in zip(tileset.coords, tileset.selected, strict=True):
        colour, width = ("red", 1.6) if sel else ("dodgerblue", 0.9)
        ax.add_patch(Rectangle((x * sx, y * sy), side * sx, side * sy, fill=False, ec=colour, lw=width))
    title = (
        f"{rec.slide_id}: {rec.status}, {rec.n_mosaic} mosaic (blue), {rec.n_selected} high-cellularity (red)"
    )
    if rec.reason:
        title += f"\n{rec.reason}"
    ax.set_title(title, fontsize=8)
    ax.set_axis_off()
    return save_figure(fig, Path(path))


def has_picture(tileset) -> bool:
    """Whether a QC picture can be drawn (the tissue-mask image was read)."""
    return tileset is not None and isinstance(tileset.thumbnail, np.ndarray) and tileset.thumbnail.size > 0
