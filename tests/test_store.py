"""Tile store: round trip, atomic slide groups, concurrent writers, path safety, moved sources."""

from __future__ import annotations

import json
import multiprocessing as mp
import shutil
from pathlib import Path

import numpy as np
import pytest

from histo.config import load_config
from histo.errors import HistoError, InputFileError
from pathology.config import TileConfig
from pathology.store import PARTIAL, SlideRecord, TileStore, slide_id_problem
from pathology.synthetic import write_synthetic_slide
from pathology.tiler import store_params, tile_slide

PARAMS = {"seed": 0, "tile": {"px": 8}}


def _arrays(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "coords": rng.integers(0, 1000, (n, 2)).astype(np.int64),
        "cluster": rng.integers(0, 9, n).astype(np.int32),
        "cellularity": rng.random(n).astype(np.float32),
        "selected": rng.random(n) > 0.5,
    }


def test_round_trip_and_listing(tmp_path):
    store = TileStore.create_or_open(tmp_path / "s.zarr", PARAMS)
    rec = SlideRecord("b", "/x/b.svs", label="LUAD", patient="P1", n_mosaic=5, n_selected=2, tile_px=8)
    arrays = _arrays(5)
    pixels = np.random.default_rng(1).integers(
        0, 256, (int(arrays["selected"].sum()), 8, 8, 3), dtype=np.uint8
    )
    store.write_slide(rec, arrays, pixels)
    store.write_slide(SlideRecord("a", "/x/a.svs", status="failed", reason="no tissue"))
    again = TileStore.open(tmp_path / "s.zarr")
    assert again.params == PARAMS
    assert (
        again.slide_ids() == ["b"]
        and again.slide_ids("failed") == ["a"]
        and again.slide_ids(None) == ["a", "b"]
    )
    assert again.record("b") == rec and again.record("a").reason == "no tissue"
    for name, value in arrays.items():
        got = getattr(again, name)("b")
        assert got.dtype == value.dtype
        np.testing.assert_array_equal(got, value)
    assert again.has_pixels("b")
    np.testing.assert_array_equal(again.read_selected("b"), pixels)
    np.testing.assert_array_equal(again.read_selected("b", [1, 0]), pixels[[1, 0]])
    with pytest.raises(HistoError, match="no coords"):
        again.coords("a")
    assert not any((tmp_path / "s.zarr" / PARTIAL).iterdir())


def test_open_rejects_non_stores(tmp_path):
    with pytest.raises(InputFileError, match="not a tile store"):
        TileStore.open(tmp_path)
    (tmp_path / "zarr.json").write_text(json.dumps({"attributes": {"format": "other"}}))
    with pytest.raises(InputFileError, match="not a tile store"):
        TileStore.open(tmp_path)
    (tmp_path / "x.txt").write_text("x")
    with pytest.raises(InputFileError, match="not a tile store"):
        TileStore.create_or_open(tmp_path / "x.txt", PARAMS)


def test_params_must_match_existing_store(tmp_path):
    TileStore.create_or_open(tmp_path / "s.zarr", PARAMS)
    with pytest.raises(HistoError, match=r"different tiling parameters \(tile.px\)"):
        TileStore.create_or_open(tmp_path / "s.zarr", {"seed": 0, "tile": {"px": 16}})


@pytest.mark.parametrize("bad", ["../x", "..", "a/b", ".hidden", "__zarr", "", "a\x00b"])
def test_slide_ids_that_escape_the_store_are_refused(tmp_path, bad):
    assert slide_id_problem(bad)
    store = TileStore.create_or_open(tmp_path / "s.zarr", PARAMS)
    with pytest.raises(HistoError):
        store.write_slide(SlideRecord(bad, "/x"))
    with pytest.raises(HistoError):
        store.record(bad)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.zarr"]


def test_replacing_a_record_and_cleaning_leftovers(tmp_path):
    store = TileStore.create_or_open(tmp_path / "s.zarr", PARAMS)
    store.write_slide(SlideRecord("a", "/x/a.svs", status="failed", reason="no MPP"))
    store.write_slide(SlideRecord("a", "/x/a.svs", n_mosaic=3), _arrays(3))
    assert store.record("a").status == "done" and len(store.coords("a")) == 3
    partial = tmp_path / "s.zarr" / PARTIAL
    (partial / "a.tmp-123-deadbeef").mkdir()
    (partial / "a.b.tmp-123-deadbeef").mkdir()  # another slide's leftover: kept
    assert store.clean_partial("a") == 1
    assert [p.name for p in partial.iterdir()] == ["a.b.tmp-123-deadbeef"]


def _shard_writer(path: str, k: int) -> None:
    store = TileStore.create_or_open(path, PARAMS)
    store.write_slide(SlideRecord(f"slide{k}", f"/x/{k}.svs", n_mosaic=4), _arrays(4, k))


def test_concurrent_shards_share_one_store(tmp_path):
    path = str(tmp_path / "s.zarr")
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_shard_writer, args=(path, k)) for k in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    store = TileStore.open(path)
    assert store.params == PARAMS and store.slide_ids() == [f"slide{k}" for k in range(4)]
    for k in range(4):
        np.testing.assert_array_equal(store.coords(f"slide{k}"), _arrays(4, k)["coords"])
    assert [p.name for p in tmp_path.iterdir()] == ["s.zarr"]  # no temporary root left behind


def test_store_created_by_another_shard_meanwhile_is_opened(tmp_path, monkeypatch):
    """Shard B creates the store right after shard A saw none: A must open it, not call it foreign."""
    path = tmp_path / "s.zarr"
    real_exists = Path.exists
    raced: list[bool] = []

    def exists(self: Path, *args, **kwargs) -> bool:
        if self == path / "zarr.json" and not raced:
            raced.append(True)
            TileStore.create_or_open(path, PARAMS)  # the other shard wins the race here
            return False
        return real_exists(self, *args, **kwargs)

    monkeypatch.setattr(Path, "exists", exists)
    store = TileStore.create_or_open(path, PARAMS)
    assert raced and store.params == PARAMS
    assert [p.name for p in tmp_path.iterdir()] == ["s.zarr"]


def test_read_selected_from_source_and_moved_source(tmp_path):
    slide = write_synthetic_slide(tmp_path / "m.svs", 2400, 1800, 1, seed=2)
    cfg = load_config(TileConfig, overrides={"tile.px": 64})
    ts = tile_slide(slide, cfg)
    store = TileStore.create_or_open(tmp_path / "s.zarr", store_params(cfg))
    store.write_slide(ts.record, ts.arrays())
    assert not store.has_pixels("m")
    tiles = store.read_selected("m")
    assert tiles.shape == (ts.selected.sum(), 64, 64, 3)
    np.testing.assert_array_equal(tiles, ts.read_tiles("selected"))
    shutil.move(slide, tmp_path / "elsewhere.svs")
    with pytest.raises(InputFileError, match=r"m\.svs: slide file of 'm' .* has moved"):
        store.read_selected("m")
