"""Plot helpers: training curves and atomic PNG writing (matplotlib with the headless Agg backend)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from histo.io import atomic_path


def save_figure(fig: plt.Figure, path: str | os.PathLike, dpi: int = 120) -> Path:
    """Write `fig` as PNG through a temporary file and close it."""
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return path


NOT_PLOTTED = {"lr", "seconds", "time", "step"}  # bookkeeping columns on another scale than the metrics


def _numeric_keys(rows: Sequence[dict], x: str) -> list[str]:
    keys: list[str] = []
    for row in rows:
        for key, value in row.items():
            if (
                key != x
                and key not in keys
                and isinstance(value, (int, float))
                and not isinstance(value, bool)
            ):
                keys.append(key)
    return keys


def plot_curves(rows: Sequence[dict], x: str, png_path: str | os.PathLike, title: str = "") -> Path:
    """One panel for losses (keys containing 'loss'), one for every other numeric metric, against `x`."""
    keys = [k for k in _numeric_keys(rows, x) if k not in NOT_PLOTTED]
    groups = [[k for k in keys if "loss" in k], [k for k in keys if "loss" not in k]]
    groups = [g for g in groups if g]
    fig, axes = plt.subplots(1, max(len(groups), 1), figsize=(5.5 * max(len(groups), 1), 3.8), squeeze=False)
    for ax, group in zip(axes[0], groups, strict=False):
        for key in group:
            pts = [(r[x], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
            if pts:
                xs, ys = zip(*pts, strict=True)
                ax.plot(xs, ys, marker="o", ms=3, label=key)
        ax.set_xlabel(x)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    return save_figure(fig, png_path)
