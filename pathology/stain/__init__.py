"""Stain normalization of the tiles that reach the encoder: Macenko, Vahadane, Reinhard.

A method is fitted once to a target (`stain.target`: an RGB image, or a tile store whose tiles stand for the
archive) before any slide is tiled; the fit (`StainFit`: the target's stain matrix and 99th-percentile
concentrations, or its CIELAB statistics) is recorded in the tile store's parameters, so training, the
index and every query (slide or patch, through the index manifest's tiling) normalize the same way without
the target at hand. Each tile is normalized on its own, as tiatoolbox and StainTools do: its stains are
estimated from its tissue pixels, their concentrations scaled to the target's and recomposed with the
target's stain vectors (Macenko, Vahadane), or its CIELAB channels moved to the target's (Reinhard).
The mosaic and cellularity selection see the raw pixels; the normalization acts on the tiles read for the
encoder (`TileSet.read_tiles`, `TileStore.read_selected`, saved pixels, patch queries).

To add a method: a module with its estimate and one `Method` row in METHODS.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from histo.errors import HistoError, InputFileError
from pathology.config import StainConfig, StainFit, TileConfig
from pathology.stain.macenko import macenko_stain_matrix
from pathology.stain.od import concentrations, od_to_rgb, rgb_to_od, tissue_od
from pathology.stain.reinhard import lab_stats, reinhard
from pathology.stain.vahadane import vahadane_stain_matrix

MONTAGE_TILES = 32  # tiles of a store sampled for an archive fit, spread over its slides
MONTAGE_PX = 256  # each resized to this side (stain statistics barely depend on resolution)
CONCENTRATION_PERCENTILE = 99  # the robust maximum of each stain's concentration (Macenko et al.)

Estimate = Callable[[np.ndarray, StainConfig], np.ndarray]  # tissue OD (N, 3) -> stain matrix (2, 3)


@dataclass(frozen=True)
class Method:
    """A normalization: fit a target's values (StainFit fields), apply them to one RGB image."""

    fit: Callable[[np.ndarray, StainConfig], dict[str, Any]]
    apply: Callable[[np.ndarray, StainFit, StainConfig], np.ndarray]


def _stains(rgb: np.ndarray, cfg: StainConfig, estimate: Estimate) -> tuple[np.ndarray, np.ndarray]:
    """(stain matrix, concentrations of every pixel (H*W, 2)) of an image."""
    matrix = estimate(tissue_od(rgb, cfg.luminosity_threshold), cfg)
    return matrix, concentrations(rgb_to_od(rgb).reshape(-1, 3), matrix)


def _robust_max(c: np.ndarray) -> np.ndarray:
    top = np.percentile(c, CONCENTRATION_PERCENTILE, axis=0)
    if not (top > 0).all():
        raise HistoError(
            f"an image has no positive {CONCENTRATION_PERCENTILE}th-percentile stain concentration"
        )
    return top


def _matrix_method(estimate: Estimate) -> Method:
    """Macenko and Vahadane differ only in how the stain vectors are estimated."""

    def fit(rgb: np.ndarray, cfg: StainConfig) -> dict[str, Any]:
        matrix, c = _stains(rgb, cfg, estimate)
        return {"stain_matrix": matrix.tolist(), "max_concentrations": _robust_max(c).tolist()}

    def apply(rgb: np.ndarray, target: StainFit, cfg: StainConfig) -> np.ndarray:
        _, c = _stains(rgb, cfg, estimate)
        c *= np.asarray(target.max_concentrations) / _robust_max(c)
        return od_to_rgb(c @ np.asarray(target.stain_matrix)).reshape(rgb.shape)

    return Method(fit, apply)


def _reinhard_fit(rgb: np.ndarray, cfg: StainConfig) -> dict[str, Any]:
    mean, std = lab_stats(rgb)
    return {"lab_mean": mean.tolist(), "lab_std": std.tolist()}


METHODS: dict[str, Method] = {
    "macenko": _matrix_method(lambda od, cfg: macenko_stain_matrix(od, cfg.angular_percentile)),
    "vahadane": _matrix_method(
        lambda od, cfg: vahadane_stain_matrix(od, macenko_stain_matrix(od, cfg.angular_percentile))
    ),
    "reinhard": Method(
        _reinhard_fit, lambda rgb, t, cfg: reinhard(rgb, np.asarray(t.lab_mean), np.asarray(t.lab_std))
    ),
}


def fit_image(rgb: np.ndarray, cfg: StainConfig, source: str) -> StainFit:
    """The fit of `cfg.method` to an RGB uint8 image; `source` names it in the record."""
    rgb = np.ascontiguousarray(rgb[..., :3], np.uint8)
    values = METHODS[cfg.method].fit(rgb, cfg)
    digest = hashlib.sha256(rgb.tobytes()).hexdigest()
    return StainFit.model_validate({"method": cfg.method, "source": source, "sha256": digest,
                                    "stain_matrix": None, "max_concentrations": None, "lab_mean": None,
                                    "lab_std": None, **values})  # fmt: skip


def normalize(rgb: np.ndarray, cfg: StainConfig) -> np.ndarray:
    """One RGB uint8 image normalized to the fitted target (as given when the method is none)."""
    if cfg.method == "none":
        return rgb
    if cfg.fit is None:
        raise HistoError(f"stain.method {cfg.method} has no fitted target yet (see fit_config)")
    return METHODS[cfg.method].apply(np.ascontiguousarray(rgb[..., :3], np.uint8), cfg.fit, cfg)


def normalize_tiles(tiles: np.ndarray, cfg: StainConfig, where: object = "tiles") -> np.ndarray:
    """Tiles (N, H, W, 3) normalized one by one; a tile that cannot be is an error naming it in `where`."""
    if cfg.method == "none":
        return tiles
    out = np.empty_like(tiles)
    for i, tile in enumerate(tiles):
        try:
            out[i] = normalize(tile, cfg)
        except HistoError as e:
            raise HistoError(f"{where}: tile {i}: stain normalization ({cfg.method}): {e}") from None
    return out


def read_target(path: str | os.PathLike) -> np.ndarray:
    """The RGB pixels a fit is made on: an image file, or a montage of a tile store's selected tiles."""
    path = Path(path)
    if (path / "zarr.json").is_file():
        return store_montage(path)
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except FileNotFoundError:
        raise InputFileError(path, "stain target not found (an RGB image or a tile store)") from None
    except (OSError, UnidentifiedImageError) as e:
        raise InputFileError(
            path, f"stain target is neither a readable image nor a tile store ({type(e).__name__})"
        ) from None


def store_montage(path: Path) -> np.ndarray:
    """Up to MONTAGE_TILES selected tiles of a store, spread evenly over its slides and their tiles, each
    resized to MONTAGE_PX and stacked into one image (as the store reads them)."""
    from skimage.transform import resize

    from pathology.store import TileStore

    store = TileStore.open(path)
    slides = [s for s in store.slide_ids() if store.selected(s).any()]
    if not slides:
        raise InputFileError(path, "stain target store has no slide with selected tiles")
    per_slide = max(1, -(-MONTAGE_TILES // len(slides)))
    tiles = []
    for sid in slides[:MONTAGE_TILES]:
        n = int(store.selected(sid).sum())
        picks = np.unique(np.linspace(0, n - 1, min(n, per_slide)).round().astype(np.int64))
        for tile in store.read_selected(sid, picks):
            small = resize(tile, (MONTAGE_PX, MONTAGE_PX), order=1, anti_aliasing=True, preserve_range=True)
            tiles.append(np.rint(small).astype(np.uint8))
    return np.concatenate(tiles[:MONTAGE_TILES], axis=0)


def fit_config(config: TileConfig) -> TileConfig:
    """The tile config with its stain fit made from `stain.target` (unchanged when there is nothing to fit
    or the fit is given). Called before any slide is tiled, so every shard records the same fit."""
    stain = config.stain
    if stain.method == "none" or stain.fit is not None:
        return config
    target = str(Path(stain.target).absolute())
    try:
        fitted = fit_image(read_target(target), stain, target)
    except InputFileError:
        raise
    except HistoError as e:
        raise HistoError(f"{target}: cannot fit stain.method {stain.method} to it: {e}") from None
    return config.updated({"stain.fit": fitted.model_dump(mode="json")}, source="stain.target")
