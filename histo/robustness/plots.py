"""Plots of tidy robustness rows: a metric against severity per corruption, and annotated heat-maps."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from histo.robustness.grid import CLEAN
from histo.robustness.results import usable

LINESTYLES = ("-", "--", ":", "-.")
MARKERS = ("o", "s", "^", "D")


def model_styles(models: Sequence[str]) -> dict[str, dict[str, Any]]:
    """A distinct line style per model: tab10's ten colours, then the next line style and marker, so a
    study of more than ten models (every norm with and without α-BN) never draws two alike."""
    from histo.plots import plt

    colours = plt.get_cmap("tab10").colors
    return {
        m: {
            "color": colours[i % 10],
            "linestyle": LINESTYLES[i // 10 % len(LINESTYLES)],
            "marker": MARKERS[i // 10 % len(MARKERS)],
        }
        for i, m in enumerate(models)
    }


def plot_severity_curves(rows: Sequence[Mapping[str, Any]], metric: str, png_path: str | os.PathLike) -> Path:
    """One panel per corruption: `metric` against severity (0 = clean) with a line per model."""
    from histo.plots import plt, save_figure

    ok = [r for r in rows if usable(r, metric)]
    corruptions = sorted({r["corruption"] for r in ok} - {CLEAN})
    models = sorted({r["model"] for r in ok})
    styles = model_styles(models)
    cols = min(4, max(1, len(corruptions)))
    nrows = max(1, math.ceil(len(corruptions) / cols))
    fig, axes = plt.subplots(nrows, cols, figsize=(3.6 * cols, 2.9 * nrows), squeeze=False, sharey=True)
    for ax, c in zip(axes.flat, corruptions, strict=False):
        for model in models:
            clean = [r["value"] for r in ok if r["model"] == model and r["corruption"] == CLEAN]
            pts = sorted(
                (r["severity"], r["value"]) for r in ok if r["model"] == model and r["corruption"] == c
            )
            pts = [(0, clean[0]), *pts] if clean else pts
            if pts:
                ax.plot(*zip(*pts, strict=False), ms=3, label=model, **styles[model])
        ax.set_title(c, fontsize=9)
        ax.set_xlabel("severity")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(corruptions) :]:
        ax.axis("off")
    axes[0, 0].set_ylabel(metric)
    axes[0, 0].legend(fontsize=7)
    return save_figure(fig, png_path)


def plot_heatmap(values: Mapping[str, Mapping[str, float]], png_path: str | os.PathLike, title: str) -> Path:
    """Heat-map corruption (rows) x model (columns) of `values[model][corruption]`, annotated."""
    from histo.plots import plt, save_figure

    models = sorted(values)
    corruptions = sorted({c for per in values.values() for c in per})
    grid = np.array([[values[m].get(c, math.nan) for m in models] for c in corruptions], dtype=float)
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(models), 0.8 + 0.38 * len(corruptions)))
    image = ax.imshow(grid, aspect="auto", cmap="viridis")
    ax.set_xticks(range(len(models)), models, rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(len(corruptions)), corruptions, fontsize=8)
    for (i, j), v in np.ndenumerate(grid):
        text = f"{v:.3g}" if np.isfinite(v) else "n/a"
        ax.text(j, i, text, ha="center", va="center", fontsize=7, color="w" if np.isfinite(v) else "grey")
    fig.colorbar(image, ax=ax)
    ax.set_title(title, fontsize=10)
    return save_figure(fig, png_path)
