"""`histo search --geojson DIR`: the query's and each hit's matched tiles as QuPath detections, drawn where
the tiles lie at level 0 (the index records each slide's tile side); re-runs replace a query's folder;
an index that cannot draw its tiles and clashing query IDs are refused before any query runs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image

from histo.cli import main
from pathology.store import TileStore

TILE_OVERRIDES = {"tile.px": 32, "tile.um": 64.0, "mosaic.percent": 50.0, "cellularity.top_fraction": 1.0}


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict:
    from histo.config import load_config
    from pathology import tile_slides
    from pathology.config import TileConfig
    from pathology.kimianet import random_init_checkpoint
    from pathology.synthetic import make_cohort

    root = tmp_path_factory.mktemp("geo")
    csv = make_cohort(root / "slides", n_classes=2, patients_per_class=2, size=(1536, 1024), seed=3)
    cfg = load_config(TileConfig, overrides=TILE_OVERRIDES)
    tile_slides([root / "slides"], root / "t.zarr", cfg, labels_csv=csv, progress=False)
    model = random_init_checkpoint(root / "m.pt", input_px=32, seed=0)
    args = ["index", "--tiles", root / "t.zarr", "--model", model, "--out", root / "idx", "--device", "cpu"]
    code, _ = run(args)
    assert code == 0
    return {"root": root, "store": root / "t.zarr", "index": root / "idx", "slides": root / "slides"}


def run(args: list) -> tuple[int, str]:
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result.exit_code, result.output


def _squares(path: Path) -> list[tuple[dict, tuple[float, float, float, float]]]:
    """(properties, (x0, y0, x1, y1)) of every feature of a GeoJSON file."""
    doc = json.loads(path.read_text())
    assert doc["type"] == "FeatureCollection"
    out = []
    for f in doc["features"]:
        ring = f["geometry"]["coordinates"][0]
        xs, ys = [p[0] for p in ring], [p[1] for p in ring]
        out.append((f["properties"], (min(xs), min(ys), max(xs), max(ys))))
    return out


def test_matched_tiles_are_drawn_on_the_query_and_on_each_hit(built, tmp_path):
    store = TileStore.open(built["store"])
    query = sorted(built["slides"].glob("*.svs"))[0]
    patch = tmp_path / "patch.png"
    Image.fromarray(store.read_selected(store.slide_ids()[2], [1])[0]).save(patch)
    out = tmp_path / "geo"
    code, output = run(
        ["search", "--index", built["index"], query, patch, "--k", "3", "--geojson", out, "--json"]
    )
    assert code == 0, output
    slide_q, patch_q = json.loads(output[output.index("{") :])["queries"]
    assert slide_q["geojson"] == str(out / query.stem) and patch_q["geojson"] == str(out / "patch")
    qrec = store.record(query.stem)
    query_tiles = store.coords(query.stem)[store.selected(query.stem)]
    query_file = _squares(out / query.stem / "query" / f"{query.stem}.geojson")
    n_matches = sum(len(h["matches"]) for h in slide_q["results"])
    assert len(query_file) == n_matches > 0
    drawn = iter(query_file)
    for rank, hit in enumerate(slide_q["results"], 1):
        rec = store.record(hit["slide_id"])
        hit_tiles = store.coords(hit["slide_id"])[store.selected(hit["slide_id"])]
        hit_file = _squares(out / query.stem / "hits" / f"{hit['slide_id']}.geojson")
        assert len(hit_file) == len(hit["matches"])
        for m, (props, box), (qprops, qbox) in zip(hit["matches"], hit_file, drawn, strict=False):
            # the hit's square is its indexed tile `tile`, one stored tile side wide, at level 0
            x, y = hit_tiles[m["tile"]]
            assert list(m["xy"]) == [x, y] and box == (
                x,
                y,
                x + rec.tile_size_level0,
                y + rec.tile_size_level0,
            )
            qx, qy = query_tiles[m["query_tile"]]
            assert qbox == (qx, qy, qx + qrec.tile_size_level0, qy + qrec.tile_size_level0)
            assert props["objectType"] == "detection" and props["classification"]["name"] == "Hit match"
            assert qprops["classification"]["name"] == "Query match"
            assert props["measurements"] == qprops["measurements"] == {
                "rank": rank, "slide_distance": hit["distance"], "distance": m["distance"], "tile": m["tile"],
                "query_tile": m["query_tile"],
            }  # fmt: skip
            assert props["name"] == f"#{rank} query tile {m['query_tile']}"
    # a patch query: no query slide, the hits' tiles grouped by slide
    assert not (out / "patch" / "query").exists()
    by_slide: dict[str, int] = {}
    for h in patch_q["results"]:
        by_slide[h["slide_id"]] = by_slide.get(h["slide_id"], 0) + 1
    for sid, n in by_slide.items():
        assert len(_squares(out / "patch" / "hits" / f"{sid}.geojson")) == n
    # a re-run with fewer hits replaces the folder: no file of the first result is left
    code, output = run(["search", "--index", built["index"], query, "--k", "1", "--geojson", out])
    assert code == 0 and f"geojson: {out / query.stem}" in output
    assert [p.name for p in (out / query.stem / "hits").iterdir()] == [
        f"{slide_q['results'][0]['slide_id']}.geojson"
    ]


def test_an_index_without_tile_sides_and_clashing_ids_are_refused_first(built, tmp_path):
    query = sorted(built["slides"].glob("*.svs"))[0]
    twin = tmp_path / "elsewhere" / query.name
    twin.parent.mkdir()
    twin.write_bytes(query.read_bytes())
    code, output = run(["search", "--index", built["index"], query, twin, "--geojson", tmp_path / "g"])
    assert code == 2 and f"same query ID {query.stem!r}" in output.splitlines()[-1]
    assert not (tmp_path / "g").exists()
    old = tmp_path / "old"  # an index built before tile sides were recorded
    shutil.copytree(built["index"], old)
    catalog_file = old / json.loads((old / "manifest.json").read_text())["catalog"]  # this version's
    catalog = json.loads(catalog_file.read_text())
    for row in catalog["slides"]:
        del row["tile_size_level0"]
    catalog_file.write_text(json.dumps(catalog))
    code, output = run(
        ["search", "--index", old, query, "--geojson", tmp_path / "g", "--config", _no_verify(tmp_path)]
    )
    assert code == 2 and output.splitlines()[-1].startswith(
        f"error: {old}: tile sizes of 4 slide(s) are not recorded"
    )
    assert not (tmp_path / "g").exists()
    code, _ = run(["search", "--index", old, query, "--config", _no_verify(tmp_path)])
    assert code == 0  # searching such an index without --geojson still works


def _no_verify(tmp_path: Path) -> Path:
    cfg = tmp_path / "search.yaml"
    cfg.write_text("run:\n  verify: none\n")
    return cfg
