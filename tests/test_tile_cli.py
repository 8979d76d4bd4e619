"""`histo tile` / tile_slides end to end: bad inputs recorded, resume after a kill, shards, workers."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import openslide
import pytest
from click.testing import CliRunner
from conftest import REPO, SHARED_DATA

from histo.cli import main
from histo.config import load_config
from histo.errors import HistoError
from pathology.config import TileConfig
from pathology.store import PARTIAL, TileStore
from pathology.synthetic import write_synthetic_slide
from pathology.tiler import tile_slides

DATA = SHARED_DATA
WSI = DATA / "wsi"
TILE_PX = "224"
GOOD = {"syn0", "syn1", "syn2", "CMU-1-Small-Region"}
FAILED = {
    "blank": "no tissue",
    "tcga-cr-7395-01a-01-ts1": "no usable physical scale",
    "test3-DAPI-2-387": "not a brightfield H&E slide",
    "empty": "empty file",
    "cut": "",  # truncated: OpenSlide's own message
    "notes": "not a slide format",
    "..": "escape",
}


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("cohort")
    for c in range(3):
        fmt = "tiff" if c == 1 else "svs"
        write_synthetic_slide(d / f"syn{c}.{fmt}", 3000, 2000, c, seed=c, fmt=fmt)
    write_synthetic_slide(d / "blank.svs", 2000, 1500, 0, seed=9, tissue_fraction=0.0)
    for f in ("CMU-1-Small-Region.svs", "tcga-cr-7395-01a-01-ts1.svs", "test3-DAPI-2-387.ndpi"):
        assert (WSI / f).is_file(), f"missing shared test file {WSI / f}"
        os.symlink(WSI / f, d / f)
    (d / "empty.svs").write_bytes(b"")
    (d / "cut.svs").write_bytes((WSI / "CMU-1-Small-Region.svs").read_bytes()[:40_000])
    (d / "notes.svs").write_text("slide notes, not a slide\n" * 40)
    os.symlink(WSI / "CMU-1-Small-Region.svs", d / "...svs")  # slide ID "..": hidden, so named explicitly
    (d / "readme.txt").write_text("not a slide extension: ignored when searching folders")
    return d


def _inputs(cohort: Path) -> list[str]:
    return [str(cohort), str(cohort / "...svs")]


@pytest.fixture(scope="module")
def config() -> TileConfig:
    return load_config(TileConfig, overrides={"tile.px": int(TILE_PX)})


@pytest.fixture(scope="module")
def reference(cohort, config, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("ref") / "ref.zarr"
    return out, tile_slides(_inputs(cohort), out, config, progress=False)


def _dump(path: Path) -> dict:
    store = TileStore.open(path)
    out = {}
    for sid in store.slide_ids(None):
        rec = store.record(sid)
        arrays = {}
        if rec.status == "done":
            arrays = {
                n: getattr(store, n)(sid).tolist() for n in ("coords", "cluster", "cellularity", "selected")
            }
        out[sid] = (rec.to_dict(), arrays)
    return out


def test_cli_records_every_bad_input_and_goes_on(cohort, tmp_path, caplog):
    out, qc = tmp_path / "s.zarr", tmp_path / "qc"
    args = ["tile", *_inputs(cohort), "--out", str(out), "--tile-px", TILE_PX, "--qc-dir", str(qc), "--json"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1, result.output
    summary = json.loads(result.stdout)
    rows = {r["id"]: r for r in summary["outcomes"]}
    assert set(rows) == GOOD | set(FAILED)
    for sid in GOOD:
        detail = rows[sid]["detail"]
        assert rows[sid]["status"] == "done" and detail["n_mosaic"] >= detail["n_selected"] >= 1
    for sid, reason in FAILED.items():
        assert rows[sid]["status"] == "failed" and reason in rows[sid]["reason"], rows[sid]
    assert rows["syn1"]["detail"]["mpp_source"] == "tiff-resolution"
    assert rows["syn0"]["detail"]["mpp_source"] == "metadata"
    assert "failed" in result.stderr and "no usable physical scale" in result.stderr  # the human table
    store = TileStore.open(out)
    assert set(store.slide_ids()) == GOOD
    assert set(store.slide_ids("failed")) == set(FAILED) - {".."}  # an unsafe ID never names a group
    assert not (out.parent / "..").exists() or sorted(p.name for p in out.parent.iterdir()) == [
        "qc",
        "s.zarr",
    ]
    assert store.params["resolved"] == {"tile_px": 224, "target_mpp": 0.5, "tile_um": 112.0}
    assert {p.stem for p in qc.glob("*.png")} >= GOOD | {"blank", "test3-DAPI-2-387"}
    # Re-running skips finished slides and retries the failed ones.
    again = CliRunner().invoke(main, args)
    assert again.exit_code == 1
    again_rows = json.loads(again.stdout)["outcomes"]
    assert {r["id"] for r in again_rows if r["status"] == "skipped"} == GOOD
    assert {r["reason"] for r in again_rows if r["status"] == "skipped"} == {"already done"}
    # Labels supply the missing scale: the TCGA slide is then done with an "override" scale.
    csv = tmp_path / "labels.csv"
    csv.write_text("slide,label,mpp\ntcga-cr-7395-01a-01-ts1.svs,HNSC,0.5\nsyn0,A,\n")
    with caplog.at_level(logging.WARNING, logger="pathology.tiler"):
        third = CliRunner().invoke(main, [*args, "--labels", str(csv)])
    assert "slide(s) have no row in" in caplog.text  # unlabelled slides are named, not silent
    rows = {r["id"]: r for r in json.loads(third.stdout)["outcomes"]}
    assert rows["tcga-cr-7395-01a-01-ts1"]["status"] == "done"
    rec = TileStore.open(out).record("tcga-cr-7395-01a-01-ts1")
    assert (rec.mpp_source, rec.label, rec.patient, rec.project) == (
        "override",
        "HNSC",
        "TCGA-CR-7395",
        "TCGA",
    )


def test_read_error_mid_slide_is_recorded(cohort, config, tmp_path, monkeypatch):
    original = openslide.OpenSlide.read_region
    calls = {"n": 0}

    def flaky(self, location, level, size):
        if "syn2" in str(getattr(self, "_filename", "")):
            calls["n"] += 1
            if calls["n"] > 3:
                raise openslide.OpenSlideError("TIFFReadEncodedTile: JPEG decode error")
        return original(self, location, level, size)

    monkeypatch.setattr(openslide.OpenSlide, "read_region", flaky)
    out = tmp_path / "s.zarr"
    summary = tile_slides([cohort / "syn2.svs", cohort / "syn0.svs"], out, config, progress=False)
    rows = {o.id: o for o in summary.outcomes}
    assert calls["n"] > 3 and rows["syn2"].status == "failed" and "JPEG decode error" in rows["syn2"].reason
    assert rows["syn0"].status == "done" and summary.exit_code() == 1
    store = TileStore.open(out)
    assert store.slide_ids() == ["syn0"] and store.record("syn2").status == "failed"
    assert not any((out / PARTIAL).iterdir())


KILL_AFTER_TWO = """
import os, signal, sys
from pathlib import Path
from pathology import store as st
original = st.TileStore.write_slide
count = [0]
def write(self, record, *args, **kwargs):
    count[0] += 1
    if count[0] == 3:  # die in the middle of writing the third slide, leaving a partial group
        part = Path(self.path) / ".partial" / f"{record.slide_id}.tmp-99999-deadbeef"
        part.mkdir(parents=True)
        (part / "zarr.json").write_text("{")
        os.kill(os.getpid(), signal.SIGKILL)
    original(self, record, *args, **kwargs)
st.TileStore.write_slide = write
from histo.cli import main
main(sys.argv[1:])
"""


def test_kill_and_resume_equals_uninterrupted_run(cohort, reference, tmp_path):
    out = tmp_path / "k.zarr"
    cmd = [
        sys.executable,
        "-c",
        KILL_AFTER_TWO,
        "tile",
        *_inputs(cohort),
        "--out",
        str(out),
        "--tile-px",
        TILE_PX,
    ]
    killed = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9, killed.stderr
    assert len(TileStore.open(out).slide_ids(None)) == 2
    assert len(list((out / PARTIAL).iterdir())) == 1
    resumed = CliRunner().invoke(
        main, ["tile", *_inputs(cohort), "--out", str(out), "--tile-px", TILE_PX, "--json"]
    )
    assert resumed.exit_code == 1  # the bad inputs still fail
    statuses = [r["status"] for r in json.loads(resumed.stdout)["outcomes"]]
    assert statuses.count("skipped") >= 1
    assert not any((out / PARTIAL).iterdir())
    assert _dump(out) == _dump(reference[0])


def test_shard_union_with_workers_equals_unsharded(cohort, config, reference, tmp_path):
    out = tmp_path / "sh.zarr"
    a = tile_slides(_inputs(cohort), out, config.updated({"run.workers": 2}), shard=(0, 2), progress=False)
    b = tile_slides(_inputs(cohort), out, config, shard=(1, 2), progress=False)
    ids_a = {o.id for o in a.outcomes}
    ids_b = {o.id for o in b.outcomes}
    assert ids_a.isdisjoint(ids_b) and ids_a | ids_b == GOOD | set(FAILED)
    assert _dump(out) == _dump(reference[0])
    ref_rows = sorted(reference[1].outcomes, key=lambda o: o.id)
    got_rows = sorted(a.outcomes + b.outcomes, key=lambda o: o.id)
    assert got_rows == ref_rows


def test_save_pixels_match_reads_from_the_slide(cohort, config, tmp_path):
    out = tmp_path / "p.zarr"
    tile_slides([cohort / "syn1.tiff"], out, config, save_pixels=True, progress=False)
    store = TileStore.open(out)
    assert store.has_pixels("syn1")
    stored = store.read_selected("syn1")
    rec = store.record("syn1")
    from pathology.slide import open_slide

    with open_slide(rec.source_path) as s:
        x, y = store.coords("syn1")[store.selected("syn1")][0]
        np.testing.assert_array_equal(stored[0], s.read_tile(int(x), int(y), rec.tile_size_level0, 224))
    assert stored.shape == (rec.n_selected, 224, 224, 3)


def test_cli_config_errors_exit_2(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("mosaic:\n  k: 9\n")
    result = CliRunner().invoke(
        main, ["tile", str(tmp_path), "--out", str(tmp_path / "s.zarr"), "--config", str(bad)]
    )
    assert result.exit_code == 2 and f"error: {bad}: mosaic.k: unknown key" in result.stderr
    assert not (tmp_path / "s.zarr").exists()


def test_a_store_of_an_earlier_release_resumes_when_the_new_keys_keep_their_defaults(
    cohort, config, tmp_path
):
    """Keys added to the tile config since a store was written are filled with their defaults (which
    reproduce what that release did), so a re-run resumes instead of calling the parameters different."""
    import shutil

    import zarr

    out = tmp_path / "old.zarr"
    first = tile_slides([cohort / "syn0.svs"], out, config, progress=False)
    assert first.counts["done"] == 1
    root = zarr.open_group(out, mode="r+")
    params = dict(root.attrs["params"])
    added = [k for k in ("stain", "roi", "from_coords") if k in params]
    assert added, "the test needs a key that an earlier release did not record"
    for key in added:
        del params[key]
    root.attrs["params"] = params
    again = tile_slides([cohort / "syn0.svs"], out, config, progress=False)
    assert again.counts == {"done": 0, "skipped": 1, "failed": 0}
    changed = config.updated({"tile.px": 256})
    with pytest.raises(HistoError, match=r"different tiling parameters \(.*tile\.px"):
        tile_slides([cohort / "syn0.svs"], out, changed, progress=False)
    shutil.rmtree(out)
