"""The tile geometry: `tile.*` resolved once per config, recorded in the store, read back, used per slide."""

from __future__ import annotations

import json

import pytest
from conftest import TILE_OVERRIDES

from histo.config import load_config
from histo.errors import ConfigError, HistoError
from pathology.config import TileConfig
from pathology.geometry import TileGeometry
from pathology.synthetic import write_synthetic_slide
from pathology.tiler import store_params, tile_slides


def test_tile_options_resolve_into_one_geometry_per_config():
    base = load_config(TileConfig)
    g = base.geometry
    assert (g.px, g.mpp, g.um) == (1000, 0.5, 500.0) and base.geometry is g
    as_um = base.updated({"tile.px": 224, "tile.um": 500.0})
    assert as_um.geometry.mpp == pytest.approx(500 / 224)
    at_mpp = base.updated({"tile.px": 256, "tile.mpp": 0.25})
    assert at_mpp.geometry.um == 64.0
    at_10x = base.updated({"tile.px": 224, "tile.magnification": 10.0})
    assert at_10x.geometry.mpp == 1.0 and at_10x.geometry.level0_px(0.25) == pytest.approx(896.0)
    assert at_10x == load_config(TileConfig, overrides={"tile.px": 224, "tile.magnification": 10.0})
    with pytest.raises(ConfigError, match=r"tile\.px"):
        base.updated({"tile.px": 4})
    with pytest.raises(ConfigError, match=r"tile\.um or tile\.mpp, not both"):
        base.updated({"tile.um": 500.0, "tile.mpp": 0.5})


def test_the_recorded_geometry_reads_back_and_a_store_without_one_is_refused():
    cfg = load_config(TileConfig, overrides={"tile.px": 256, "tile.mpp": 0.25})
    params = json.loads(json.dumps(store_params(cfg)))  # as a store's attributes hold it
    assert params["resolved"] == {"tile_px": 256, "target_mpp": 0.25, "tile_um": 64.0}
    assert TileGeometry.recorded(params, "store") == cfg.geometry
    for bad in ({}, {"resolved": {"tile_px": 256}}, {"resolved": {**params["resolved"], "target_mpp": 0}}):
        with pytest.raises(HistoError, match=r"^old\.zarr: records no valid tile geometry"):
            TileGeometry.recorded(bad, "old.zarr")


def test_tile_slides_resolves_the_geometry_once_and_every_slide_uses_it(tmp_path, monkeypatch):
    from pathology.store import TileStore

    calls = []
    resolve = TileGeometry.of
    monkeypatch.setattr(
        TileGeometry, "of", classmethod(lambda cls, tile: calls.append(tile) or resolve(tile))
    )
    for i, mpp in enumerate((0.25, 0.5)):  # 40x and 20x scans: other level-0 sizes of the same tile
        write_synthetic_slide(tmp_path / "slides" / f"s{i}.svs", 1536, 1024, i % 2, seed=i, mpp=mpp)
    cfg = load_config(TileConfig, overrides=TILE_OVERRIDES)
    summary = tile_slides([tmp_path / "slides"], tmp_path / "tiles.zarr", cfg, progress=False)
    assert summary.counts["done"] == 2 and len(calls) == 1
    store = TileStore.open(tmp_path / "tiles.zarr")
    assert TileGeometry.recorded(store.params, "store") == cfg.geometry
    for slide_id, mpp in (("s0", 0.25), ("s1", 0.5)):
        rec = store.record(slide_id)
        assert rec.tile_px == cfg.geometry.px == 32
        assert rec.tile_size_level0 == pytest.approx(cfg.geometry.level0_px(mpp)) == 64.0 / mpp
