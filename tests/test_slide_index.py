"""SlideIndex on a real (synthetic-slide) tile store: build, search, add/remove, manifest checks, models."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import TILE_OVERRIDES

from histo.errors import ConfigError, HistoError, InputFileError
from search import SlideIndex
from search.barcodes import minmax_barcode
from search.growth import compact

STRUCTURE_FILES = ("catalog", "coords", "barcodes", "float")  # the structure files of a version, by role
CPU = {"run": {"device": "cpu"}}  # index config over the defaults


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """4 synthetic slides (2 classes x 2 patients), a full and a 2-slide tile store, two random models."""
    from histo.config import load_config
    from pathology import tile_slides
    from pathology.config import TileConfig
    from pathology.kimianet import random_init_checkpoint
    from pathology.synthetic import make_cohort

    root = tmp_path_factory.mktemp("cohort")
    csv = make_cohort(root / "slides", n_classes=2, patients_per_class=2, size=(1536, 1024), seed=0)
    cfg = load_config(TileConfig, overrides=TILE_OVERRIDES)
    slides = sorted(p for p in (root / "slides").iterdir() if p.suffix in (".svs", ".tiff"))
    tile_slides(slides, root / "all.zarr", cfg, labels_csv=csv, progress=False)
    tile_slides(slides[::2], root / "half.zarr", cfg, labels_csv=csv, progress=False)
    return {
        "root": root,
        "slides": slides,
        "all": root / "all.zarr",
        "half": root / "half.zarr",
        "model": random_init_checkpoint(root / "model.pt", input_px=32, seed=0),
        "other_model": random_init_checkpoint(root / "other.pt", input_px=32, seed=1),
    }


@pytest.fixture(scope="module")
def flat(cohort: dict) -> SlideIndex:
    return SlideIndex.build(cohort["all"], cohort["model"], cohort["root"] / "flat", CPU, progress=False)


def structure_files(path: Path) -> dict[str, list[str]]:
    """The files of each structure of the index's current version (the manifest names them)."""
    m = json.loads((path / "manifest.json").read_text())
    return {
        "catalog": [m["catalog"]],
        **{role: [p["file"] for p in m["parts"][role]] for role in STRUCTURE_FILES[1:]},
    }


def files_of(path: Path) -> dict[str, list[bytes]]:
    return {
        role: [(path / name).read_bytes() for name in names] for role, names in structure_files(path).items()
    }


def test_build_records_everything(flat: SlideIndex, cohort: dict) -> None:
    from pathology.store import TileStore

    store = TileStore.open(cohort["all"])
    m = flat.manifest
    assert m["counts"]["slides"] == 4 == len(flat)
    assert m["counts"]["tiles"] == sum(store.record(s).n_selected for s in store.slide_ids())
    assert m["model"]["hash"] == flat.extractor.model_hash and m["model"]["feature_dim"] == 1024
    assert m["tiling"] == store.params and m["index"]["type"] == "flat"
    assert m["barcode"]["bits"] == 1023 and m["barcode"]["padded_bits"] == 1024
    assert {f for names in structure_files(flat.path).values() for f in names} | {"model.pt"} <= set(
        m["files"]
    )
    assert flat.codes.shape == (m["counts"]["tiles"], 128)
    # the stored barcodes are the MinMax codes of the stored features
    np.testing.assert_array_equal(flat.codes, minmax_barcode(flat._features()))


def test_query_slide_finds_itself_and_honours_patient_exclusion(flat: SlideIndex, cohort: dict) -> None:
    from pathology import tile_slide
    from pathology.tiler import tiling_config

    query = cohort["slides"][0]
    tiling = tiling_config(flat.manifest["tiling"], "manifest")
    tiles = tile_slide(query, tiling)  # a TileSet query: tiled once for both modes
    for mode in ("barcode", "float"):
        r = flat.search_slide(tiles, k=3, mode=mode)
        assert r.results[0].slide_id == query.stem and r.results[0].distance == pytest.approx(0.0, abs=1e-3)
        assert [h.distance for h in r.results] == sorted(h.distance for h in r.results)
        assert r.results[0].matches[0].xy == r.results[0].matches[0].query_xy
        d = r.to_dict()
        assert set(d) == {"query", "prediction", "results", "search"} and d["search"]["mode"] == mode
        assert d["search"]["strategy"] in ("two-stage", "exhaustive", "exhaustive (fewer than k candidates)")
        assert set(d["results"][0]) == {"slide_id", "label", "distance", "matches"}
        r2 = flat.search_slide(tiles, k=3, mode=mode, exclude_patient=True)
        assert query.stem not in [h.slide_id for h in r2.results] and len(r2.results) == 3
        assert r2.results[:2] == r.results[1:]  # one slide per patient here
    by_path = flat.search_slide(query, k=3)
    assert by_path.query == str(query) and by_path.results[0].slide_id == query.stem


def test_search_arguments_meet_the_config_rules(flat: SlideIndex, cohort: dict) -> None:
    """`k=-1` once returned n-1 results; API arguments are validated like `histo search --k`."""
    for k in (0, -1):
        with pytest.raises(
            ConfigError, match=rf"^search_slide: k: input should be greater than or equal to 1, got {k}$"
        ):
            flat.search_slide(cohort["slides"][0], k=k)
    with pytest.raises(ConfigError, match=r"^search_patch: patch_mode: input should be 'barcode' or 'float'"):
        flat.search_patch(np.zeros((32, 32, 3), np.uint8), mode="cosine")
    with pytest.raises(ConfigError, match=r"^evaluate: evaluate\.k\[0\]: "):
        flat.evaluate(k=(0,))


def test_two_stage_equals_exhaustive(flat: SlideIndex) -> None:
    assert flat.manifest["search"]["tile_k"] is None and flat.manifest["search"]["stage1_tiles"] == 32
    assert flat.engine.settings.tile_k is None and flat.engine.settings.stage1_tiles == 32  # the manifest's
    one_neighbour = flat.engine.settings.model_copy(update={"tile_k": 1})  # a query's own first stage
    for mode in ("barcode", "float"):
        base = flat.engine.tiles[mode]()
        for s in range(len(flat)):
            q = base[flat.catalog.rows(s)]
            fast, info = flat.engine.rank(q, mode, k=2, settings=one_neighbour)
            slow, _ = flat.engine.rank(q, mode, k=2, exhaustive=True)
            assert info["strategy"].startswith(("two-stage", "exhaustive")) and fast == slow
            assert info["strategy"] != "two-stage" or info["tile_k"] in (1, 4, 16)  # widened from 1
    assert flat.engine.settings.tile_k is None  # the index's settings are never edited by a query


def test_search_takes_slides_images_arrays_and_tile_sets(
    flat: SlideIndex, cohort: dict, tmp_path: Path
) -> None:
    """One `search` for every kind of query; `search_slide` / `search_patch` are its wrappers."""
    from PIL import Image

    from pathology.store import TileStore

    slide = next(p for p in cohort["slides"] if p.suffix == ".svs")
    by_path = flat.search(slide, 3)
    checked = by_path.info.pop("query")  # a query file records what file_query applied
    assert checked == {"kind": "slide", "mpp": 0.25, "mpp_source": "metadata"}
    assert by_path.to_dict() == flat.search_slide(slide, k=3).to_dict() and by_path.query == str(slide)
    plain = next(p for p in cohort["slides"] if p.suffix == ".tiff")  # one-page TIFF: read as an image
    with pytest.raises(
        InputFileError, match=r"\.tiff: 1536 x 1024 px .* covers 6 x 4 of the index's 32 px tile"
    ):
        flat.search(plain, 3)  # read as an image: a patch 6 x 4 tiles wide is refused, as histo search does
    assert "strategy" in flat.search_slide(plain, 3).info
    tiles = flat.tile_query(slide)
    by_tiles = flat.search(tiles, 3, mode="float", exhaustive=True)
    assert by_tiles.query == slide.stem and by_tiles.info["strategy"] == "exhaustive"
    assert by_tiles.results == flat.search_slide(tiles, k=3, mode="float").results
    store = TileStore.open(cohort["all"])
    rgb = store.read_selected(store.slide_ids()[2], [1])[0]
    png = tmp_path / "patch.png"
    Image.fromarray(rgb).save(png)
    from_file = flat.search(png, 4)
    assert from_file.info.pop("query")["rule"] == "as is"  # the index's own tile: searched as is
    assert from_file.query == str(png) and from_file.info == {"mode": "float"}  # patch_mode of the config
    assert from_file.results == flat.search_patch(rgb, k=4).results == flat.search(rgb, 4, name="x").results
    assert from_file.results[0].slide_id == store.slide_ids()[2] and from_file.results[0].matches[0].tile == 1
    with pytest.raises(HistoError, match=r"patch\.png: tile_k, exhaustive apply to slide queries"):
        flat.search(png, tile_k=3, exhaustive=True)
    with pytest.raises(HistoError, match="a query is a slide path, an image path, an RGB array or a TileSet"):
        flat.search(42)
    with pytest.raises(
        ConfigError, match=r"^search: stage1_tiles: input should be greater than or equal to 1"
    ):
        flat.search(tiles, stage1_tiles=0)


def test_first_stage_is_set_per_query(flat: SlideIndex, cohort: dict) -> None:
    tiles = flat.tile_query(cohort["slides"][-1])
    r = flat.search(tiles, 2, tile_k=1, stage1_tiles=2)
    assert (
        r.info["strategy"] == "two-stage" and r.info["stage1_tiles"] == 2 and r.info["tile_k"] in (1, 4, 16)
    )
    assert r.results == flat.search(tiles, 2, exhaustive=True).results
    assert flat.engine.settings.tile_k is None and flat.engine.settings.stage1_tiles == 32  # unchanged
    assert flat.search(tiles, 2).info["stage1_tiles"] == min(32, len(tiles.coords[tiles.selected]))


def test_search_patch_returns_the_stored_tile(flat: SlideIndex, cohort: dict) -> None:
    from pathology.store import TileStore

    store = TileStore.open(cohort["all"])
    sid = store.slide_ids()[1]
    tile = store.read_selected(sid, [2])[0]
    r = flat.search_patch(tile, k=3)
    assert r.results[0].slide_id == sid and r.results[0].matches[0].tile == 2
    assert r.results[0].distance == pytest.approx(0.0, abs=1e-3)
    with pytest.raises(HistoError, match="uint8"):
        flat.search_patch(tile.astype(np.float32))


def test_add_and_remove_equal_a_fresh_build(flat: SlideIndex, cohort: dict, tmp_path: Path) -> None:
    half_ids = [p.stem for p in cohort["slides"][::2]]
    fresh_half = SlideIndex.build(cohort["half"], cohort["model"], tmp_path / "half", CPU, progress=False)
    # remove: full index minus two slides == index built from the store of the other two
    shrunk_dir = tmp_path / "shrunk"
    shutil.copytree(flat.path, shrunk_dir)
    shrunk = SlideIndex.open(shrunk_dir)
    shrunk.remove([s for s in shrunk.catalog.slide_ids if s not in half_ids])
    assert shrunk.catalog.slide_ids == sorted(half_ids) == fresh_half.catalog.slide_ids
    assert files_of(shrunk_dir) == files_of(tmp_path / "half")
    assert SlideIndex.open(shrunk_dir).manifest["counts"]["slides"] == 2
    # add: the half index plus the full store == the full index
    grown = SlideIndex.open(tmp_path / "half")
    summary = grown.add(cohort["all"])
    extracted = [o.id for o in summary.outcomes if o.status == "done"]
    assert sorted(extracted) == sorted(set(flat.catalog.slide_ids) - set(half_ids))
    assert sorted(o.id for o in summary.outcomes if o.status == "skipped") == sorted(half_ids)
    assert grown.update.op == "add" and sorted(grown.update.slide_ids) == sorted(extracted)
    # the added rows are a new part of each structure; opened, the index holds a fresh build's arrays
    assert all(len(names) == 2 for names in structure_files(tmp_path / "half").values() if len(names) > 1)
    assert grown.catalog.slide_ids == flat.catalog.slide_ids
    np.testing.assert_array_equal(grown.catalog.coords, flat.catalog.coords)
    np.testing.assert_array_equal(grown.codes, flat.codes)
    np.testing.assert_array_equal(grown._features(), flat._features())
    compact(tmp_path / "half")  # one file per structure again: byte for byte the fresh build's
    assert files_of(tmp_path / "half") == files_of(flat.path)
    q = cohort["slides"][1]
    assert grown.search_slide(q, k=4).to_dict() == flat.search_slide(q, k=4).to_dict()
    with pytest.raises(HistoError, match="not in the index: nope"):
        grown.remove(["nope"])


def test_ivf_index_reuses_extracted_features(flat: SlideIndex, cohort: dict, tmp_path: Path) -> None:
    (tmp_path / "ivf").mkdir()
    shutil.copytree(flat.path / "features.zarr", tmp_path / "ivf" / "features.zarr")  # as if resumed
    idx = SlideIndex.build(
        cohort["all"], cohort["model"], tmp_path / "ivf", {**CPU, "type": "ivf"}, progress=False
    )
    np.testing.assert_array_equal(idx._features(), flat._features())
    p = idx.manifest["index"]["params"]
    assert p["nlist"] >= 1 and p["nprobe"] >= 1 and "calibrated_recall_at_10" in p
    again = SlideIndex.open(tmp_path / "ivf")
    r = again.search_slide(cohort["slides"][2], k=2, mode="float")
    assert r.results[0].slide_id == cohort["slides"][2].stem


def test_a_registered_kind_is_built_and_searched_end_to_end(
    flat: SlideIndex, cohort: dict, tmp_path: Path
) -> None:
    """A new index kind is one row of search/kinds.py: register it, and build, open and search use it."""
    import faiss

    from search.kinds import IndexKind, float_kind, register, unregister

    kind = register(IndexKind("ivfsq8_test", "IVF{nlist},SQ8", "IVF-SQ8 (test)", tunes=float_kind("ivf").tunes,
                              trainable=True))  # fmt: skip
    try:
        (tmp_path / "sq8").mkdir()
        shutil.copytree(flat.path / "features.zarr", tmp_path / "sq8" / "features.zarr")
        config = {**CPU, "type": kind.name, "params": {"calibration_queries": 16}}
        built = SlideIndex.build(cohort["all"], cohort["model"], tmp_path / "sq8", config, progress=False)
        m = built.manifest["index"]
        assert (
            m["type"] == "ivfsq8_test"
            and m["params"]["nprobe"] >= 1
            and "calibrated_recall_at_10" in m["params"]
        )
        assert built.manifest["barcode"]["index"]["kind"] == "ivf"  # the row's paired barcode index
        again = SlideIndex.open(tmp_path / "sq8")
        assert again.float_index.kind is kind
        assert isinstance(faiss.downcast_index(again.float_index.index), faiss.IndexIVFScalarQuantizer)
        q = [p for p in cohort["slides"] if p.suffix == ".svs"][-1]
        assert again.search(q, 2, mode="float").results[0].slide_id == q.stem
    finally:
        unregister(kind.name)


def test_corrupted_truncated_and_incomplete_index_refused(flat: SlideIndex, tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    shutil.copytree(flat.path, bad)
    files = structure_files(bad)
    float_file, barcodes_file = bad / files["float"][0], bad / files["barcodes"][0]
    data = bytearray(float_file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    float_file.write_bytes(bytes(data))
    with pytest.raises(InputFileError, match=r"float\.000001\.faiss: index file corrupted \(sha256"):
        SlideIndex.open(bad)
    barcodes_file.write_bytes(barcodes_file.read_bytes()[:-10])
    with pytest.raises(InputFileError, match=r"barcodes\.000001\.faissb: index file truncated"):
        SlideIndex.open(bad, {"run": {"verify": "size"}})
    (bad / "manifest.json").write_text('{"format": "histo-slide-in')
    with pytest.raises(InputFileError, match="truncated manifest"):
        SlideIndex.open(bad)
    (bad / "manifest.json").unlink()
    with pytest.raises(InputFileError, match="not a complete index"):
        SlideIndex.open(bad)


def test_a_different_model_is_refused(flat: SlideIndex, cohort: dict) -> None:
    with pytest.raises(HistoError, match="refusing to search with a different model"):
        SlideIndex.open(flat.path, model=cohort["other_model"])
    with pytest.raises(HistoError, match="features were extracted with model"):
        SlideIndex.build(cohort["all"], cohort["other_model"], flat.path, CPU, progress=False)
    assert SlideIndex.open(flat.path, model=cohort["model"]).extractor.model_hash == flat.model_hash
