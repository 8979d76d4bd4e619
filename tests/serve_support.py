"""Shared by the `histo serve` tests: a small demo index (built once per session) and polling helpers."""

from __future__ import annotations

import functools
import json
import time
from pathlib import Path
from typing import Any

TILE_OVERRIDES = {"tile.px": 64, "tile.um": 64.0, "mosaic.percent": 50.0, "cellularity.top_fraction": 1.0}


@functools.cache
def build_demo(root: Path) -> dict[str, Path]:
    """6 synthetic slides (3 classes x 2 patients, 2 sites), tiled with pixels saved, indexed with an
    untrained 32 px DenseNet: the demo's pipeline at test size (about 20 s on 2 cores, once per session)."""
    from histo.config import load_config
    from pathology import tile_slides
    from pathology.kimianet import random_init_checkpoint
    from pathology.synthetic import make_cohort
    from search.slide_index import SlideIndex

    root.mkdir(parents=True, exist_ok=True)
    labels = make_cohort(root / "slides", n_classes=3, patients_per_class=2, size=(1280, 1024), seed=1)
    cfg = load_config("tile", overrides=TILE_OVERRIDES)
    tile_slides([root / "slides"], root / "tiles.zarr", cfg, labels_csv=labels, progress=False)
    model = random_init_checkpoint(root / "model.pt", input_px=32)
    SlideIndex.build(root / "tiles.zarr", model, root / "index", device="cpu", progress=False)
    return {"root": root, "index": root / "index", "slides": root / "slides", "tiles": root / "tiles.zarr"}


def catalog(index: Path) -> list[dict[str, Any]]:
    return json.loads((index / "catalog.json").read_text())["slides"]


def index_files(index: Path) -> dict[str, bytes]:
    """Every file of the index dir outside the picture cache, with its bytes (to prove nothing changed)."""
    return {
        p.relative_to(index).as_posix(): p.read_bytes()
        for p in sorted(index.rglob("*"))
        if p.is_file() and ".serve-cache" not in p.parts
    }


def until(condition: Any, timeout: float = 120.0, step: float = 0.1) -> Any:
    """Poll `condition()` until it returns something truthy (returned) or fail after `timeout` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(step)
    raise AssertionError(f"condition not met within {timeout} s")
