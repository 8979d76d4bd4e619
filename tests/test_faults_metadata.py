"""Issue 20, item 4: stale metadata. A corrected labels CSV updates the store and the index on a re-run,
without reading pixels again, and says so; an index picks up a slide tiled anew."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from faults_support import TILE, write_slides

from histo.cli import main
from pathology.store import TileStore
from search import features as feats_io
from search.slide_index import SlideIndex


@pytest.fixture(scope="module")
def slides(tmp_path_factory):
    return write_slides(tmp_path_factory.mktemp("slides"), 4)


def _csv(path, rows, projects=None):
    """A labels CSV of (slide, label, site) rows, with a project column when `projects` ({slide: project})."""
    if projects is None:
        path.write_text("slide,label,site\n" + "".join(f"{s},{label},{site}\n" for s, label, site in rows))
    else:
        lines = [f"{s},{label},{site},{projects.get(s, '')}\n" for s, label, site in rows]
        path.write_text("slide,label,site,project\n" + "".join(lines))
    return path


def _invoke(args):
    result = CliRunner().invoke(main, [*map(str, args), "--json"])
    return result, {r["id"]: r for r in json.loads(result.stdout)["outcomes"]} if result.stdout else {}


def test_a_corrected_labels_csv_updates_store_and_index_without_reading_pixels(
    slides, tmp_path, monkeypatch
) -> None:
    from pathology.kimianet import random_init_checkpoint

    store, index = tmp_path / "s.zarr", tmp_path / "index"
    first = _csv(
        tmp_path / "v1.csv",
        [("s0", "A", "X"), ("s1.svs", "B", "X"), ("s2", "A", "Y"), ("s3", "B", "Y")],
        {"s3": "P1"},
    )
    tile = ["tile", *slides, "--out", store, *TILE, "--save-pixels", "--labels"]
    assert _invoke([*tile, first])[0].exit_code == 0
    model = random_init_checkpoint(tmp_path / "m.pt", input_px=32)
    index_args = ["index", "--tiles", store, "--model", model, "--out", index, "--device", "cpu"]
    assert _invoke(index_args)[0].exit_code == 0
    features_before = feats_io.read_slide(index / feats_io.FEATURES_DIR, "s0")[1]

    corrected = _csv(
        tmp_path / "v2.csv",
        [("s0", "B", "X"), ("s1.svs", "B", "Z"), ("s2", "A", "Y"), ("s3", "B", "Y")],
        {"s3": "P2"},
    )

    def no_pixels(*args, **kwargs):
        raise AssertionError("a metadata change must not read the slide again")

    monkeypatch.setattr("pathology.tiler.tile_slide", no_pixels)
    result, rows = _invoke([*tile, corrected])
    assert result.exit_code == 0, result.output
    assert rows["s0"]["status"] == "done" and rows["s0"]["detail"]["updated"] == {"label": ["A", "B"]}
    assert rows["s1"]["detail"]["updated"] == {"site": ["X", "Z"]}
    assert rows["s2"]["status"] == "skipped" and rows["s3"]["detail"]["updated"] == {"project": ["P1", "P2"]}
    assert "updated: s0: label A -> B" in result.stderr and "updated: s1: site X -> Z" in result.stderr
    records = TileStore.open(store)
    assert (records.record("s0").label, records.record("s1").site) == ("B", "Z")
    assert records.record("s0").n_selected == rows["s0"]["detail"]["n_selected"] > 0

    monkeypatch.setattr("pathology.kimianet.FeatureExtractor.extract_store", no_pixels)
    result, rows = _invoke(index_args)
    assert result.exit_code == 0, result.output
    assert rows["s0"]["status"] == "done" and rows["s0"]["detail"]["updated"] == {"label": ["A", "B"]}
    assert rows["s1"]["detail"]["updated"] == {"site": ["X", "Z"]}
    assert rows["s2"]["status"] == "skipped" and rows["s3"]["detail"]["updated"] == {"project": ["P1", "P2"]}
    assert "updated: s0: label A -> B" in result.stderr
    built = SlideIndex.open(index)
    assert built.catalog.projects[built.catalog.slide_ids.index("s3")] == "P2"
    position = built.catalog.slide_ids.index("s0")
    assert (
        built.catalog.labels[position] == "B"
        and built.catalog.sites[built.catalog.slide_ids.index("s1")] == "Z"
    )
    np.testing.assert_array_equal(
        feats_io.read_slide(index / feats_io.FEATURES_DIR, "s0")[1], features_before
    )


def test_an_index_extracts_a_slide_tiled_anew(slides, tmp_path) -> None:
    from pathology.kimianet import random_init_checkpoint

    store, index = tmp_path / "s.zarr", tmp_path / "index"
    assert _invoke(["tile", *slides[:3], "--out", store, *TILE])[0].exit_code == 0
    model = random_init_checkpoint(tmp_path / "m.pt", input_px=32)
    index_args = ["index", "--tiles", store, "--model", model, "--out", index, "--device", "cpu"]
    assert _invoke(index_args)[0].exit_code == 0
    record = feats_io.read_slide(index / feats_io.FEATURES_DIR, "s0")[0]
    assert record["tiles_digest"] == TileStore.open(store).record("s0").tiles_digest
    other = tmp_path / "other" / "s0.svs"
    other.parent.mkdir()
    other.write_bytes(slides[3].read_bytes())  # another slide under the ID s0
    assert _invoke(["tile", other, "--out", store, *TILE, "--replace"])[0].exit_code == 0
    result, rows = _invoke(index_args)
    assert result.exit_code == 0 and rows["s0"]["status"] == "done" and rows["s1"]["status"] == "skipped"
    assert "updated" not in rows["s0"]["detail"]  # extracted again, not relabelled
    new = feats_io.read_slide(index / feats_io.FEATURES_DIR, "s0")[0]
    assert new["tiles_digest"] == TileStore.open(store).record("s0").tiles_digest != record["tiles_digest"]
