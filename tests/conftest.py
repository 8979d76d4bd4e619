"""Shared fixtures: the real data folder beside the clone, quiet, reproducible torch threads, a tiny tile store,
the tiling of the synthetic-slide tests, and the serve tests' demo index."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# One torch thread for the whole session, in this process and (through the environment) in every
# subprocess a test starts: results then do not depend on test order or on which process computed them,
# and DDP tests with two processes do not oversubscribe the two cores CI has.
os.environ["OMP_NUM_THREADS"] = "1"
import numpy as np
import torch

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = Path(os.environ.get("HISTO_SHARED_DATA", REPO.parent / "shared" / "data"))
#: TileConfig overrides of the synthetic-slide tests: 32 px tiles of 64 µm, half the clusters, all their tiles.
TILE_OVERRIDES = {"tile.px": 32, "tile.um": 64.0, "mosaic.percent": 50.0, "cellularity.top_fraction": 1.0}


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data (CI has it beside the clone); its absence is a failure, not a skip."""
    assert SHARED_DATA.is_dir(), f"real test data not found at {SHARED_DATA} (set HISTO_SHARED_DATA)"
    return SHARED_DATA


def _he_like(label: int, seed: int, n: int = 3, size: int = 32) -> np.ndarray:
    """Tiles whose colour and nuclear density depend on the label (so nearest neighbours can classify)."""
    rng = np.random.default_rng(seed)
    base = np.array([[235, 170, 205], [150, 90, 170]])[label]
    tiles = base + rng.normal(0, 8, size=(n, size, size, 3))
    dots = rng.random((n, size, size)) < (0.05 if label == 0 else 0.3)
    tiles[dots] = [70, 40, 130]
    return np.clip(tiles, 0, 255).astype(np.uint8)


@pytest.fixture(scope="session")
def tile_store(tmp_path_factory) -> Path:
    """A tile store of 4 labelled slides (2 classes, 4 patients) x 3 selected 32 px tiles at 0.25 µm/px (40x)."""
    from pathology.store import SlideRecord, TileStore

    path = tmp_path_factory.mktemp("store") / "tiles.zarr"
    params = {"seed": 0, "tile": {"px": 32}, "resolved": {"tile_px": 32, "target_mpp": 0.25, "tile_um": 8.0}}
    store = TileStore.create_or_open(path, params)
    for i in range(4):
        label = i % 2
        pixels = _he_like(label, seed=i)
        arrays = {
            "coords": np.zeros((3, 2), np.int64),
            "cluster": np.zeros(3, np.int32),
            "cellularity": np.ones(3, np.float32),
            "selected": np.ones(3, bool),
        }
        rec = SlideRecord(
            f"s{i}", f"/x/s{i}.svs", label=f"class{label}", patient=f"P{i}", tile_px=32, n_selected=3
        )
        store.write_slide(rec, arrays, pixels)
    return path


@pytest.fixture
def tiny_segment_study(tmp_path) -> dict[str, Path]:
    """Inputs of `histo robustness segment` on tiny data: one synthetic 32^3 BraTS case folder ("data"),
    an untrained BN UNet3D checkpoint ("model") and a config with a 32^3 window ("config")."""
    from segmentation.infer import save_model
    from segmentation.synthetic import make_cases
    from segmentation.unet import UNet3D

    make_cases(tmp_path / "data", 1, shape=(32, 32, 32), seed=0)
    torch.manual_seed(0)
    net = UNet3D(channels=(4, 8), blocks_per_level=1, norm="batch")
    save_model(tmp_path / "unet.pt", net, {})
    (tmp_path / "cfg.yaml").write_text("segment:\n  roi: [32, 32, 32]\n")
    return {"data": tmp_path / "data", "model": tmp_path / "unet.pt", "config": tmp_path / "cfg.yaml"}


@pytest.fixture(scope="session")
def demo(tmp_path_factory) -> dict[str, Path]:
    """6 synthetic slides (3 classes x 2 patients, 2 sites), tiled at 64 px with pixels saved, indexed with an
    untrained 32 px DenseNet: the demo's pipeline at test size for the serve tests (about 20 s on 2 cores)."""
    from histo.config import load_config
    from pathology import tile_slides
    from pathology.config import TileConfig
    from pathology.kimianet import random_init_checkpoint
    from pathology.synthetic import make_cohort
    from search.slide_index import SlideIndex

    root = tmp_path_factory.mktemp("serve-demo")
    labels = make_cohort(root / "slides", n_classes=3, patients_per_class=2, size=(1280, 1024), seed=1)
    cfg = load_config(TileConfig, overrides={**TILE_OVERRIDES, "tile.px": 64})
    tile_slides([root / "slides"], root / "tiles.zarr", cfg, labels_csv=labels, progress=False)
    model = random_init_checkpoint(root / "model.pt", input_px=32)
    SlideIndex.build(root / "tiles.zarr", model, root / "index", {"run": {"device": "cpu"}}, progress=False)
    return {"root": root, "index": root / "index", "slides": root / "slides", "tiles": root / "tiles.zarr"}


def pytest_sessionfinish(session, exitstatus) -> None:
    """Kill any worker process a test left alive: Python joins non-daemon children at exit, so one stuck
    worker would hold the finished session (and CI) open until its time limit instead of reporting."""
    import multiprocessing

    for child in multiprocessing.active_children():
        child.kill()
