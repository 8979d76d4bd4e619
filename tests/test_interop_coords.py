"""CLAM/TRIDENT coordinate files: export with each tool's attributes, files written the way each tool
writes them read back, `histo tile --from-coords` keeps a lab's patching, and bad files fail in one line."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import openslide
import pytest
from click.testing import CliRunner
from conftest import SHARED_DATA

from histo.cli import main
from histo.config import load_config
from histo.errors import ConfigError, InputFileError
from pathology.config import TileConfig
from pathology.interop.coords import clam_attrs, find_coords_files, read_coords
from pathology.interop.export import export_store
from pathology.slide import open_slide
from pathology.store import TileStore
from pathology.synthetic import write_synthetic_slide
from pathology.tiler import tile_slides

PX = 112  # tiles: 112 px at 5x (2 µm/px) = 224 µm = 896 level-0 px of a 0.25 µm/px slide: read at level 1


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("slides")
    for c in range(2):
        write_synthetic_slide(d / f"s{c}.svs", 6000, 4000, c, seed=c)
    return d


def _cfg(**over) -> TileConfig:
    return load_config(TileConfig, overrides={"tile.px": PX, "tile.magnification": 5.0, **over})


@pytest.fixture(scope="module")
def store(cohort, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("store") / "s.zarr"
    batch = tile_slides([cohort], out, _cfg(), progress=False)
    assert batch.counts["done"] == 2
    return out


def _attrs(path: Path) -> tuple[np.ndarray, dict]:
    with h5py.File(path, "r") as f:
        return f["coords"][...], dict(f["coords"].attrs)


def test_export_writes_each_tools_attributes(store, tmp_path):
    s = TileStore.open(store)
    for fmt in ("clam", "trident"):
        batch = export_store(store, tmp_path / fmt, fmt, progress=False)
        assert batch.counts["done"] == 2
    for sid in s.slide_ids():
        rec = s.record(sid)
        selected = s.coords(sid)[s.selected(sid)]
        coords, a = _attrs(tmp_path / "clam" / "patches" / f"{sid}.h5")
        assert coords.dtype == np.int64 and np.array_equal(coords, selected)
        # level 1 (downsample 4) is the coarsest not coarser than 896 / 112 = 8: 896 / 4 = 224 px there
        assert (int(a["patch_level"]), int(a["patch_size"])) == (1, 224)
        assert list(a["downsample"]) == [4.0, 4.0] and list(a["level_dim"]) == [1500, 1000]
        assert list(a["downsampled_level_dim"]) == [1500, 1000] and a["name"] == sid
        coords, t = _attrs(tmp_path / "trident" / "patches" / f"{sid}_patches.h5")
        assert np.array_equal(coords, selected)
        assert (int(t["patch_size"]), int(t["patch_size_level0"]), int(t["overlap"])) == (PX, 896, 0)
        assert (float(t["level0_magnification"]), float(t["target_magnification"])) == (40.0, 5.0)
        assert (int(t["level0_width"]), int(t["level0_height"]), t["name"]) == (rec.width, rec.height, sid)
        # TRIDENT's own rule gives back the level-0 side: patch_size * level0_mag // target_mag
        assert int(t["patch_size"]) * t["level0_magnification"] // t["target_magnification"] == 896
    mosaic = export_store(store, tmp_path / "all", "trident", which="mosaic", progress=False)
    coords, _ = _attrs(Path(mosaic.outcomes[0].detail["file"]))
    assert np.array_equal(coords, s.coords(mosaic.outcomes[0].id))


def test_from_coords_round_trip_keeps_the_tiles_and_pixels(store, cohort, tmp_path):
    s = TileStore.open(store)
    for fmt in ("clam", "trident"):
        export_store(store, tmp_path / fmt, fmt, progress=False)
        out = tmp_path / f"{fmt}.zarr"
        batch = tile_slides([cohort], out, _cfg(), progress=False, from_coords=tmp_path / fmt)
        assert batch.counts["done"] == 2
        back = TileStore.open(out)
        for sid in s.slide_ids():
            given = s.coords(sid)[s.selected(sid)]
            assert np.array_equal(back.coords(sid), given) and back.selected(sid).all()  # select: none
            assert (back.cluster(sid) == -1).all()
            assert back.record(sid).tile_size_level0 == s.record(sid).tile_size_level0
            assert back.record(sid).given_coords.endswith(".h5")
            np.testing.assert_array_equal(back.read_selected(sid), s.read_selected(sid))


def test_files_written_the_way_each_tool_writes_them(cohort, tmp_path):
    """CLAM: save_hdf5 with chunks (1, 2), attributes on coords, tuple downsample; TRIDENT: coords_to_h5
    with integer magnifications from its MPP buckets; a CLAM file without downsample uses the slide's."""
    slide = open_slide(cohort / "s0.svs")
    xy = np.array([[0, 0], [896, 0], [1792, 896]], np.int64)
    patches = tmp_path / "job" / "patches"
    patches.mkdir(parents=True)
    with h5py.File(patches / "s0.h5", "w") as f:  # CLAM, patch_level 1
        d = f.create_dataset("coords", data=xy, maxshape=(None, 2), chunks=(1, 2))
        for k, v in {"patch_size": 224, "patch_level": 1, "downsample": (4.0, 4.0),
                     "downsampled_level_dim": (1500, 1000), "level_dim": (1500, 1000), "name": "s0",
                     "save_path": str(patches)}.items():  # fmt: skip
            d.attrs[k] = v
    with h5py.File(patches / "s1_patches.h5", "w") as f:  # TRIDENT, 40x slide at 5x
        d = f.create_dataset("coords", data=xy, maxshape=(None, 2), chunks=(1, 2))
        for k, v in {"patch_size": PX, "patch_size_level0": PX * 40 // 5, "level0_magnification": 40,
                     "target_magnification": 5, "overlap": 0, "name": "s1", "savetodir": "job",
                     "level0_width": 6000, "level0_height": 4000}.items():  # fmt: skip
            d.attrs[k] = v
    assert set(find_coords_files(tmp_path / "job")) == {"s0", "s1"}
    clam = read_coords(patches / "s0.h5")
    trident = read_coords(patches / "s1_patches.h5")
    assert (clam.format, clam.size_level0, trident.format, trident.size_level0) == (
        "clam",
        896,
        "trident",
        896,
    )
    with h5py.File(patches / "s0.h5", "a") as f:
        del f["coords"].attrs["downsample"]
    with pytest.raises(InputFileError, match="no downsample"):
        read_coords(patches / "s0.h5")
    assert read_coords(patches / "s0.h5", slide.level_downsamples).size_level0 == 896
    out = tmp_path / "given.zarr"
    batch = tile_slides([cohort], out, _cfg(), progress=False, from_coords=tmp_path / "job")
    assert batch.counts["done"] == 2
    assert all(np.array_equal(TileStore.open(out).coords(s), xy) for s in ("s0", "s1"))


def test_clam_reads_the_same_region_histo_tiles(shared_data):
    """CLAM reads `patch_size` px at `patch_level` then resizes; on an exact level that is histo's tile."""
    ndpi = shared_data / "wsi" / "test3-DAPI-2-387.ndpi"
    slide = open_slide(ndpi)
    a = clam_attrs(slide, 1000.0, 250, "x")
    assert (a["patch_level"], a["patch_size"]) == (2, 250)
    clam = np.asarray(
        openslide.OpenSlide(str(ndpi)).read_region((1000, 1200), a["patch_level"], (a["patch_size"],) * 2)
    )[..., :3]
    np.testing.assert_array_equal(slide.read_tile(1000, 1200, 1000.0, 250), clam)


def test_selection_on_top_of_given_patches(store, cohort, tmp_path):
    s = TileStore.open(store)
    export_store(store, tmp_path / "m", "trident", which="mosaic", progress=False)
    for mode in ("cellularity", "mosaic"):
        out = tmp_path / f"{mode}.zarr"
        cfg = _cfg(**{"from_coords.select": mode, "mosaic.n_clusters": 2})  # 2 colour clusters of the 9
        tile_slides([cohort], out, cfg, progress=False, from_coords=tmp_path / "m")
        back = TileStore.open(out)
        for sid in s.slide_ids():
            given = {tuple(c) for c in s.coords(sid)}
            kept = {tuple(c) for c in back.coords(sid)}
            assert kept <= given and back.selected(sid).sum() < len(given)
            if mode == "cellularity":  # every patch scored, the top 20 % kept
                assert kept == given and back.selected(sid).sum() == max(1, round(0.2 * len(given)))
            else:
                assert len(kept) < len(given) and (back.cluster(sid) >= 0).all()
    with pytest.raises(ConfigError, match=r"from_coords\.select: input should be 'none', 'cellularity' or"):
        tile_slides(
            [cohort], tmp_path / "x.zarr", {"from_coords": {"select": "all"}}, from_coords=tmp_path / "m"
        )
    assert not (tmp_path / "x.zarr").exists()


def _one_file(tmp_path: Path, name: str, xy, **attrs) -> Path:
    d = tmp_path / name
    (d / "patches").mkdir(parents=True)
    with h5py.File(d / "patches" / "s0_patches.h5", "w") as f:
        dset = f.create_dataset("coords", data=np.asarray(xy))
        base = {
            "patch_size": PX,
            "patch_size_level0": 896,
            "level0_magnification": 40,
            "target_magnification": 5,
        }
        for k, v in {**base, **attrs}.items():
            dset.attrs[k] = v
    return d


def test_bad_coordinate_files_fail_the_slide_in_one_line(cohort, tmp_path):
    cases = {
        "outside": (_one_file(tmp_path, "outside", [[0, 0], [7000, 10]]), r"1 patch corner\(s\) outside the 6000x4000 slide, first \(7000, 10\)"),
        "size": (_one_file(tmp_path, "size", [[0, 0]], patch_size_level0=448), r"patches are 112.0 µm .* store's tiles are 224.0 µm .*--tile-px 112 --magnification 10"),
        "shape": (_one_file(tmp_path, "shape", [1, 2, 3]), r"coords must be \(N, 2\)"),
        "attrs": (_one_file(tmp_path, "attrs", [[0, 0]], patch_size_level0=-3), r"'patch_size_level0' must be a positive number"),
    }  # fmt: skip
    for name, (folder, reason) in cases.items():
        batch = tile_slides(
            [cohort / "s0.svs"], tmp_path / f"{name}.zarr", _cfg(), progress=False, from_coords=folder
        )
        (o,) = batch.outcomes
        assert o.status == "failed" and "\n" not in o.reason, name
        assert "s0_patches.h5" in o.reason and __import__("re").search(reason, o.reason), (name, o.reason)
    batch = tile_slides(
        [cohort], tmp_path / "missing.zarr", _cfg(), progress=False, from_coords=cases["size"][0]
    )
    failed = {o.id: o.reason for o in batch.failed()}
    assert "no coordinate file for this slide in" in failed["s1"]
    assert TileStore.open(tmp_path / "missing.zarr").record("s1").status == "failed"
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputFileError, match=r"no \.h5 coordinate files"):
        tile_slides([cohort], tmp_path / "e.zarr", _cfg(), from_coords=tmp_path / "empty")
    (tmp_path / "text" / "patches").mkdir(parents=True)
    (tmp_path / "text" / "patches" / "s0.h5").write_text("not hdf5")
    with pytest.raises(InputFileError, match=r"s0.h5: not a readable HDF5 file"):
        read_coords(tmp_path / "text" / "patches" / "s0.h5")


def test_cli_export_and_tile_from_coords(store, cohort, tmp_path):
    runner = CliRunner()
    res = runner.invoke(main, ["export", str(store), "--format", "clam", "--out", str(tmp_path / "c")])
    assert res.exit_code == 0, res.output
    assert "s0: " in res.output and "2 done, 0 skipped, 0 failed" in res.output
    res = runner.invoke(
        main,
        ["tile", str(cohort), "--out", str(tmp_path / "t.zarr"), "--tile-px", str(PX), "--magnification", "5",
         "--from-coords", str(tmp_path / "c")],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    res = runner.invoke(
        main, ["export", str(tmp_path / "nostore"), "--format", "clam", "--out", str(tmp_path)]
    )
    assert res.exit_code == 2 and "not a tile store" in res.output
    assert SHARED_DATA.is_dir()
