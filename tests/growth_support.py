"""Index dirs from synthetic stored features (no tile store, no model): what `histo index` writes after
extraction, so the growth tests exercise the index structures alone."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from search import features as feats_io
from search.config import IndexConfig
from search.growth import build_version

DIM = 64
MODEL = {"hash": "synthetic", "feature_definition": "synthetic clusters", "feature_dim": DIM}
TILING = {"tile": "synthetic"}
SITES, LABELS = ("A", "B", "C", "D"), ("x", "y", "z")


def slide_ids(n: int) -> list[str]:
    return [f"S{i:03d}" for i in range(n)]


def write_features(index_dir: Path, ids: list[str], seed: int = 0, shift: float = 0.0) -> None:
    """Stored features of `ids`: each slide a few tissue clusters around a label centre (+ `shift`)."""
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(99).standard_normal((len(LABELS), DIM)).astype(np.float32) * 2
    root = feats_io.open_features(index_dir, MODEL, TILING)
    for sid in ids:
        number = int(sid[1:])
        label = number % len(LABELS)
        n = int(rng.integers(6, 14))
        slide = centres[label] + shift + rng.standard_normal(DIM).astype(np.float32)
        tissue = slide + 0.6 * rng.standard_normal((3, DIM)).astype(np.float32)
        feats = tissue[rng.integers(0, 3, n)] + 0.4 * rng.standard_normal((n, DIM)).astype(np.float32)
        record = {"slide_id": sid, "label": LABELS[label], "patient": f"P{number // 2:03d}",
                  "site": SITES[number % len(SITES)], "project": "TCGA" if number % 5 else "CPTAC", "n_tiles": n}  # fmt: skip
        feats_io.write_slide(root, record, feats.astype(np.float32), rng.integers(0, 10_000, (n, 2)))


def copy_features(source: Path, target: Path, ids: list[str]) -> None:
    """Copy stored slides into another index dir (as if extracted there)."""
    feats_io.open_features(target, MODEL, TILING)
    for sid in ids:
        dst = target / feats_io.FEATURES_DIR / feats_io.SLIDES / sid
        shutil.copytree(source / feats_io.FEATURES_DIR / feats_io.SLIDES / sid, dst)


def build(index_dir: Path, ids: list[str], kind: str = "flat", **params) -> dict:
    """A fresh build of `ids` (their features stored in `index_dir`), as `histo index` makes it."""
    cfg = IndexConfig.coerce({"type": kind, "params": {"calibration_queries": 40, **params}})
    content = {
        "index": {"type": kind, "params_requested": cfg.params.model_dump(mode="json")},
        "search": cfg.search.model_dump(mode="json"),
        "failed_slides": [],
        "built_with": {"feature_device": "cpu"},
    }
    return build_version(index_dir, content, ids, None)
