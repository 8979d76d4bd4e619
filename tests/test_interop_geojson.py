"""QuPath GeoJSON both ways: tissue outline and tiles out; regions in (restrict, replace, include and
exclude classes); the exported tissue read back as the mask gives the same tiles; bad geometry fails."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from scipy import ndimage

from histo.cli import main
from histo.config import load_config
from histo.errors import ConfigError, InputFileError
from pathology.config import TileConfig
from pathology.interop.export import export_store
from pathology.interop.geojson import Region, mask_outline, rasterize, read_regions
from pathology.slide import open_slide
from pathology.store import TileStore
from pathology.synthetic import write_synthetic_slide
from pathology.tiler import slide_tissue, tile_slides

W, H = 6000, 4000


def _cfg(**over) -> TileConfig:
    return load_config(TileConfig, overrides={"tile.px": 112, "tile.magnification": 5.0, **over})


@pytest.fixture(scope="module")
def slides(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("slides")
    for c in range(2):
        write_synthetic_slide(d / f"s{c}.svs", W, H, c, seed=c)
    return d


@pytest.fixture(scope="module")
def store(slides, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("store") / "s.zarr"
    assert tile_slides([slides], out, _cfg(), progress=False).counts["done"] == 2
    return out


def test_outline_has_holes_and_islands_and_rasterizes_back_to_the_mask():
    rng = np.random.default_rng(0)
    mask = ndimage.gaussian_filter(rng.random((60, 90)), 3) > 0.5
    mask[10:40, 10:50] = True
    mask[18:32, 18:42] = False  # a hole ...
    mask[22:28, 25:35] = True  # ... with an island in it
    outline = mask_outline(mask, 900, 600)  # 10 level-0 px per mask pixel
    assert outline.is_valid and any(len(p.interiors) for p in outline.geoms)
    back = rasterize([Region("Tissue", outline)], mask.shape, 900, 600)
    np.testing.assert_array_equal(back, mask)
    assert abs(outline.area / 100 - mask.sum()) < 0.1 * mask.sum()


def test_export_writes_tissue_and_every_tile_with_measurements(store, tmp_path):
    batch = export_store(store, tmp_path, "qupath", progress=False)
    assert batch.counts["done"] == 2
    s = TileStore.open(store)
    for sid in s.slide_ids():
        doc = json.loads((tmp_path / f"{sid}.geojson").read_text())
        assert doc["type"] == "FeatureCollection"
        tissue, *tiles = doc["features"]
        assert tissue["properties"]["objectType"] == "annotation"
        assert tissue["properties"]["classification"] == {"name": "Tissue", "color": [0, 160, 0]}
        assert tissue["geometry"]["type"] in ("Polygon", "MultiPolygon")
        coords, size = s.coords(sid), s.record(sid).tile_size_level0
        assert len(tiles) == len(coords)
        for i, f in enumerate(tiles):
            p, m = f["properties"], f["properties"]["measurements"]
            assert p["objectType"] == "detection" and m["tile"] == i
            assert m["cluster"] == s.cluster(sid)[i] and m["cellularity"] == pytest.approx(
                s.cellularity(sid)[i]
            )
            want = "High-cellularity tile" if s.selected(sid)[i] else "Mosaic tile"
            assert p["classification"]["name"] == want
            x, y = coords[i]
            assert f["geometry"]["coordinates"][0][0] == [x, y]
            assert f["geometry"]["coordinates"][0][2] == [x + size, y + size]


def test_exported_tissue_as_the_mask_gives_the_same_tiles(store, slides, tmp_path):
    export_store(store, tmp_path / "q", "qupath", progress=False)
    cfg = _cfg(**{"roi.mode": "replace", "roi.include": ["Tissue"]})
    batch = tile_slides([slides], tmp_path / "r.zarr", cfg, progress=False, roi=tmp_path / "q")
    assert batch.counts["done"] == 2
    a, b = TileStore.open(store), TileStore.open(tmp_path / "r.zarr")
    for sid in a.slide_ids():
        np.testing.assert_array_equal(a.coords(sid), b.coords(sid))
        assert b.record(sid).roi == str(tmp_path / "q" / f"{sid}.geojson")
    with open_slide(slides / "s0.svs") as slide:
        _, mask, _ = slide_tissue(slide, cfg)
        _, again, _ = slide_tissue(slide, cfg, tmp_path / "q" / "s0.geojson")
    np.testing.assert_array_equal(mask, again)


def _write(path: Path, *features: dict) -> Path:
    path.write_text(json.dumps({"type": "FeatureCollection", "features": list(features)}))
    return path


def _box(x0, y0, x1, y1, cls=None, kind="annotation") -> dict:
    props = {"objectType": kind} | ({"classification": {"name": cls, "color": [1, 2, 3]}} if cls else {})
    ring = [[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]
    return {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [ring]}, "properties": props}


def test_include_and_exclude_classes_restrict_the_tiles(store, slides, tmp_path):
    roi = _write(
        tmp_path / "left.geojson", _box(0, 0, W / 2, H, "Ignore*"), _box(0, 0, 50, 50, kind="detection")
    )
    tile_slides([slides], tmp_path / "r.zarr", _cfg(), progress=False, roi=roi)
    full, cut = TileStore.open(store), TileStore.open(tmp_path / "r.zarr")
    for sid in full.slide_ids():
        assert any(c[0] < W / 2 for c in full.coords(sid))  # the left half has tissue ...
        assert len(cut.coords(sid)) > 0 and all(c[0] >= W / 2 for c in cut.coords(sid))  # ... cut out
    only = _write(tmp_path / "tumor.geojson", _box(0, 0, W, H, "Stroma"))
    batch = tile_slides(
        [slides / "s0.svs"], tmp_path / "t.zarr", _cfg(**{"roi.include": ["Tumor"]}), progress=False, roi=only
    )
    assert "no include annotation of class Tumor" in batch.outcomes[0].reason


@pytest.mark.parametrize(
    ("roi", "message"),
    [
        ({"mode": "cut"}, r"roi\.mode: input should be 'restrict' or 'replace', got 'cut'"),
        ({"include": "Tumor"}, r"roi\.include: must be a list, got 'Tumor'"),
        ({"exclude": [""]}, r"roi\.exclude\[0\]: string should have at least 1 character"),
    ],
)
def test_bad_roi_settings_are_refused_before_any_store(slides, tmp_path, roi, message):
    with pytest.raises(ConfigError, match=message):
        tile_slides([slides], tmp_path / "x.zarr", {"roi": roi}, roi=tmp_path / "nowhere.geojson")
    assert not (tmp_path / "x.zarr").exists()


def test_qupath_02_layout_and_bad_geometry(tmp_path):
    old = [  # QuPath 0.2: a list of features, class as a string, measurements as a list
        {"type": "Feature", "id": "PathAnnotationObject", "geometry": _box(10, 10, 20, 20)["geometry"],
         "properties": {"classification": "Tumor", "measurements": [{"name": "Area", "value": 100}]}},
    ]  # fmt: skip
    (tmp_path / "old.json").write_text(json.dumps(old))
    regions, others = read_regions(tmp_path / "old.json", W, H)
    assert [r.name for r in regions] == ["Tumor"] and others == 0 and regions[0].geometry.area == 100
    bowtie = _box(0, 0, 10, 10)
    bowtie["geometry"]["coordinates"] = [[[0, 0], [10, 10], [10, 0], [0, 10], [0, 0]]]
    line = {
        "type": "Feature",
        "geometry": {"type": "LineString", "coordinates": [[0, 0], [5, 5]]},
        "properties": {},
    }
    broken = {
        "type": "Feature",
        "geometry": {"type": "Polygon", "coordinates": [[[0, 0], [1]]]},
        "properties": {},
    }
    cases = {
        "bowtie": (bowtie, r"feature 1: invalid polygon \(Self-intersection"),
        "outside": (_box(5000, 0, 6500, 100), r"feature 1: outside the 6000x4000 slide \(bounds 5000, 0, 6500, 100\)"),
        "line": (line, r"feature 1: a LineString has no area"),
        "broken": (broken, r"feature 1: malformed geometry"),
    }  # fmt: skip
    for name, (feat, reason) in cases.items():
        path = _write(tmp_path / f"{name}.geojson", _box(0, 0, 5, 5), feat)
        with pytest.raises(InputFileError, match=reason) as e:
            read_regions(path, W, H)
        assert str(path) in str(e.value) and "\n" not in str(e.value)
    (tmp_path / "text.geojson").write_text("{not json")
    with pytest.raises(InputFileError, match="not valid JSON"):
        read_regions(tmp_path / "text.geojson", W, H)


def test_cli_export_qupath_and_tile_with_a_roi_folder(store, slides, tmp_path):
    runner = CliRunner()
    res = runner.invoke(main, ["export", str(store), "--format", "qupath", "--out", str(tmp_path / "q")])
    assert res.exit_code == 0, res.output
    (tmp_path / "q" / "s1.geojson").unlink()
    res = runner.invoke(
        main,
        ["tile", str(slides), "--out", str(tmp_path / "t.zarr"), "--tile-px", "112", "--magnification", "5",
         "--roi", str(tmp_path / "q")],
    )  # fmt: skip
    assert res.exit_code == 1 and "no GeoJSON file <slide id>.geojson for this slide" in res.output
    assert TileStore.open(tmp_path / "t.zarr").record("s0").status == "done"
