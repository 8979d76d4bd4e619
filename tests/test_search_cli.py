"""`histo index` and `histo search` end to end: JSON schema, resumption after a kill, shards, errors."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import REPO, TILE_OVERRIDES

from histo.classification import MACRO_F1_DEFINITION
from histo.cli import main


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """6 synthetic slides (3 classes x 2 patients) tiled into a store, and a random-init model."""
    from histo.config import load_config
    from pathology import tile_slides
    from pathology.config import TileConfig
    from pathology.kimianet import random_init_checkpoint
    from pathology.synthetic import make_cohort

    root = tmp_path_factory.mktemp("cli")
    csv = make_cohort(root / "slides", n_classes=3, patients_per_class=2, size=(1280, 1024), seed=1)
    tile_slides([root / "slides"], root / "tiles.zarr", load_config(TileConfig, overrides=TILE_OVERRIDES),
                labels_csv=csv, progress=False)  # fmt: skip
    return {
        "root": root,
        "tiles": root / "tiles.zarr",
        "model": random_init_checkpoint(root / "model.pt", input_px=32),
        "slide": sorted((root / "slides").glob("*.svs"))[0],
    }


def run(args: list[str]) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, [str(a) for a in args])
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout, result.stderr


def index_args(data: dict, out: Path) -> list:
    return ["index", "--tiles", data["tiles"], "--model", data["model"], "--out", out, "--device", "cpu"]


def file_hashes(index_dir: Path) -> dict:
    return json.loads((index_dir / "manifest.json").read_text())["files"]


@pytest.fixture(scope="module")
def built(data: dict) -> Path:
    out = data["root"] / "index"
    code, stdout, _ = run([*index_args(data, out), "--evaluate", "--json"])
    assert code == 0
    report = json.loads(stdout)
    index = report["index"]
    assert index["counts"]["slides"] == 6 and index["type"] == "flat" and index["failed_slides"] == []
    assert report["counts"] == {"done": 6, "skipped": 0, "failed": 0}
    assert index["device"] == {"device": "cpu"}
    assert {(r["scope"], r["k"]) for r in report["evaluation"]["rows"]} >= {
        ("horizontal", 1),
        ("horizontal", 5),
    }
    assert all(Path(p).exists() for p in report["evaluation"]["pngs"])
    assert report["evaluation"]["macro_f1_definition"] == MACRO_F1_DEFINITION
    assert report["evaluation"]["strategy"] == "exhaustive"  # the published protocol ranks every slide
    agreement = report["evaluation"]["agreement"]["horizontal"]
    assert agreement["other"] == "two-stage" and agreement["n_queries"] == 6
    return out


def test_search_json_schema(built: Path, data: dict) -> None:
    patch = data["root"] / "patch.png"
    from PIL import Image

    from pathology.store import TileStore

    store = TileStore.open(data["tiles"])
    Image.fromarray(store.read_selected(store.slide_ids()[3], [0])[0]).save(patch)
    code, stdout, stderr = run(["search", "--index", built, data["slide"], patch, "--k", "3", "--json"])
    assert code == 0, stderr
    out = json.loads(stdout)
    assert set(out) == {"queries", "counts"} and len(out["queries"]) == 2
    assert out["counts"] == {"done": 2, "skipped": 0, "failed": 0}
    slide_q, patch_q = out["queries"]
    for q in out["queries"]:
        assert set(q) == {"query", "prediction", "results", "search"}  # search: how it was searched
        for r in q["results"]:
            assert set(r) == {"slide_id", "label", "distance", "matches"}
    assert slide_q["query"] == str(data["slide"]) and len(slide_q["results"]) == 3
    assert slide_q["results"][0]["slide_id"] == data["slide"].stem and slide_q["results"][0]["distance"] == 0
    assert set(slide_q["results"][0]["matches"][0]) == {"query_tile", "query_xy", "tile", "xy", "distance"}
    assert patch_q["results"][0]["slide_id"] == store.slide_ids()[3]
    assert slide_q["prediction"] == "class0" and slide_q["search"]["mode"] == "barcode"
    code, stdout, _ = run(["search", "--index", built, data["slide"], "--exclude-same-patient", "--json"])
    assert data["slide"].stem not in [r["slide_id"] for r in json.loads(stdout)["queries"][0]["results"]]


def test_search_config_sets_the_first_stage(built: Path, data: dict, tmp_path: Path) -> None:
    cfg = tmp_path / "search.yaml"
    cfg.write_text("tile_k: 7\nstage1_tiles: 2\n")
    code, stdout, stderr = run(
        ["search", "--index", built, data["slide"], "--config", cfg, "--k", "2", "--json"]
    )
    assert code == 0, stderr
    fast = json.loads(stdout)["queries"][0]
    assert fast["search"]["strategy"] == "two-stage"
    assert fast["search"]["stage1_tiles"] == 2 and fast["search"]["tile_k"] % 7 == 0
    code, stdout, stderr = run(
        ["search", "--index", built, data["slide"], "--k", "2", "--exhaustive", "--json"]
    )
    assert code == 0, stderr
    exact = json.loads(stdout)["queries"][0]
    assert exact["search"]["strategy"] == "exhaustive" and exact["results"] == fast["results"]


def test_bad_query_is_reported_and_the_rest_goes_on(built: Path, data: dict) -> None:
    missing = data["root"] / "missing.svs"
    code, stdout, stderr = run(["search", "--index", built, missing, data["slide"], "--json"])
    assert code == 1
    first, second = json.loads(stdout)["queries"]
    assert "missing.svs" in first["error"] and first["results"] == []
    assert second["results"][0]["slide_id"] == data["slide"].stem
    assert "error: " in stderr and "missing.svs" in stderr
    assert json.loads(stdout)["counts"] == {"done": 1, "skipped": 0, "failed": 1}
    assert stderr.strip().splitlines()[-1] == "1 done, 0 skipped, 1 failed"


def test_corrupted_index_is_one_line_error(built: Path, data: dict, tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    shutil.copytree(built, bad)
    coords = bad / json.loads((bad / "manifest.json").read_text())["parts"]["coords"][0]["file"]
    coords.write_bytes(coords.read_bytes()[:-3] + b"\x00\x01\x02")
    code, _, stderr = run(["search", "--index", bad, data["slide"]])
    assert code == 2 and stderr.strip().count("\n") == 0
    assert stderr.startswith("error: ") and f"{coords.name}: index file corrupted" in stderr


def test_kill_then_rerun_equals_uninterrupted(built: Path, data: dict, tmp_path: Path) -> None:
    out = tmp_path / "killed"
    cmd = [sys.executable, "-c", "from histo.cli import main; main()", *map(str, index_args(data, out))]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    slides_dir = out / "features.zarr" / "slides"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if slides_dir.exists() and any(d.is_dir() for d in slides_dir.iterdir()):
            break
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = [d for d in slides_dir.iterdir() if d.is_dir()]
    assert 1 <= len(done) < 6 and not (out / "manifest.json").exists()  # killed mid-extraction
    code, _, stderr = run(index_args(data, out))
    assert code == 0, stderr
    assert file_hashes(out) == file_hashes(built)


def test_shards_then_assembly_equal_one_run(built: Path, data: dict, tmp_path: Path) -> None:
    out = tmp_path / "sharded"
    shares = []
    for shard in ("1/2", "0/2"):
        code, stdout, _ = run([*index_args(data, out), "--shard", shard, "--json"])
        report = json.loads(stdout)
        assert (
            code == 0 and report["counts"] == {"done": 3, "skipped": 0, "failed": 0} and "index" not in report
        )
        assert not (out / "manifest.json").exists()  # features extracted, no index built
        shares.append({o["id"] for o in report["outcomes"]})
    assert shares[0].isdisjoint(shares[1]) and len(shares[0] | shares[1]) == 6
    assert len([d for d in (out / "features.zarr" / "slides").iterdir() if d.is_dir()]) == 6
    code, _, _ = run(index_args(data, out))
    assert code == 0 and file_hashes(out) == file_hashes(built)


def test_unknown_config_key_and_bad_store(data: dict, tmp_path: Path) -> None:
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("params:\n  nprobes: 3\n")
    code, _, stderr = run([*index_args(data, tmp_path / "x"), "--config", cfg])
    assert code == 2 and f"error: {cfg}: params.nprobes: unknown key" in stderr
    assert not (tmp_path / "x").exists()
    code, _, stderr = run(["index", "--tiles", tmp_path, "--model", data["model"], "--out", tmp_path / "y"])
    assert code == 2 and "not a tile store" in stderr


def test_search_where_returns_only_the_filtered_slides(built: Path, data: dict) -> None:
    args = ["search", "--index", built, data["slide"], "--k", "5", "--json"]
    code, stdout, stderr = run([*args, "--where", "label=class1,class2", "--where", "site=site1"])
    assert code == 0, stderr
    q = json.loads(stdout)["queries"][0]
    assert {r["label"] for r in q["results"]} == {"class2"}  # site1 holds classes 2 and 3
    assert len(q["results"]) == 2  # two patients of class 2
    assert q["search"]["where"] == {"label": ["class1", "class2"], "site": ["site1"]}
    assert q["search"]["allowed_slides"] == 2
    code, _, stderr = run([*args, "--where", "site=site9"])
    assert (
        code == 2
        and stderr.strip() == "error: no indexed slide has site=site9 (the index has site: site0, site1)"
    )


def test_index_grows_shrinks_retrains_and_checks_drift(built: Path, data: dict, tmp_path: Path) -> None:
    from search.slide_index import SlideIndex

    out = tmp_path / "index"
    shutil.copytree(built, out)
    ids = SlideIndex.open(built).catalog.slide_ids
    code, stdout, stderr = run(["index", "--out", out, "--remove", ids[1], ids[4], "--json"])
    assert code == 0, stderr
    report = json.loads(stdout)
    assert [o["id"] for o in report["outcomes"]] == [ids[1], ids[4]] and report["index"]["counts"][
        "slides"
    ] == 4
    assert report["updates"][0]["op"] == "remove" and "remove 2 slides" in stderr
    # the store again, without --model: the index's own model.pt extracts the two removed slides
    code, stdout, stderr = run(["index", "--tiles", data["tiles"], "--out", out, "--device", "cpu", "--json"])
    assert code == 0, stderr
    report = json.loads(stdout)
    assert (
        report["counts"] == {"done": 2, "skipped": 4, "failed": 0}
        and report["index"]["counts"]["slides"] == 6
    )
    assert report["updates"][0]["op"] == "add" and sorted(report["updates"][0]["slide_ids"]) == [
        ids[1],
        ids[4],
    ]
    assert "device" not in report["index"]  # grown without loading the index
    grown, fresh = SlideIndex.open(out), SlideIndex.open(built)
    assert grown.catalog.slide_ids == fresh.catalog.slide_ids
    assert (grown.codes == fresh.codes).all() and (grown._features() == fresh._features()).all()
    code, stdout, stderr = run(["index", "--tiles", data["tiles"], "--out", out, "--device", "cpu"])
    assert code == 0 and "no new slide" in stdout
    code, stdout, stderr = run(["index", "--out", out, "--retrain", "--drift", "--json"])
    assert code == 0, stderr
    report = json.loads(stdout)
    assert report["updates"][0]["op"] == "retrain" and report["drift"]["retrain"] is False
    assert report["index"]["growth"]["tiles_vs_trained"] == 1.0 and "drift: no retrain needed" in stderr
    assert file_hashes(out)["features.zarr/zarr.json"] == file_hashes(built)["features.zarr/zarr.json"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--remove"], "--remove takes the slide IDs to remove"),
        (["S1"], "unexpected arguments S1 (slide IDs go with --remove)"),
        (["--remove", "nope"], "not in the index: nope"),
        (
            [],
            "give --tiles STORE or --features DIR (build or grow OUT), or --remove, --retrain, --drift or "
            "--evaluate",
        ),
        (
            ["--tiles", "TILES", "--type", "hnsw"],
            "an existing index with type='flat'; adding slides keeps it",
        ),
    ],
)
def test_index_update_mistakes_are_one_line(built: Path, data: dict, args: list, message: str) -> None:
    before = file_hashes(built)
    args = [data["tiles"] if a == "TILES" else a for a in args]
    code, _, stderr = run(["index", "--out", built, *args])
    assert code == 2 and stderr.count("\n") == 1 and message in stderr
    assert file_hashes(built) == before
