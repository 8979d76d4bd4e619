"""Issue 19, item 1: a re-run of `histo index` on an existing index decides which stored slides are done
from their records and their files' stamps (size, mtime, inode), so an add reads no stored features;
`--verify` decodes them all. A chunk changed in place is found; one whose size and mtime were put back is
found only by `--verify` (the quick check's documented limit)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import REPO

from histo.cli import main
from histo.errors import InputFileError
from pathology.store import TileStore
from search import features as feats_io
from search.slide_index import SlideIndex

ROOT = Path(feats_io.FEATURES_DIR)


@pytest.fixture
def index(tile_store, tmp_path) -> dict[str, Path]:
    """An index of slides s0-s2 of a copy of the tile store (its s3 kept aside for an add)."""
    from pathology.kimianet import random_init_checkpoint

    store, aside = tmp_path / "tiles.zarr", tmp_path / "s3"
    shutil.copytree(tile_store, store)
    shutil.move(store / "slides" / "s3", aside)
    model = random_init_checkpoint(tmp_path / "m.pt", input_px=32)
    paths = {"store": store, "aside": aside, "model": model, "out": tmp_path / "index"}
    result = _index(paths)
    assert result.exit_code == 0, result.output
    return paths


def _index(paths: dict[str, Path], *extra: str):
    args = ["index", "--tiles", paths["store"], "--model", paths["model"], "--out", paths["out"]]
    return CliRunner().invoke(main, [*map(str, args), "--device", "cpu", "--json", *extra])


def _rows(result) -> dict[str, dict]:
    return {r["id"]: r for r in json.loads(result.stdout)["outcomes"]}


@pytest.fixture
def decodes(monkeypatch) -> list[str]:
    """The slide IDs whose stored features are decoded (every reader goes through `read_slide`)."""
    seen: list[str] = []
    read = feats_io.read_slide

    def counted(root: Path, slide_id: str):
        seen.append(slide_id)
        return read(root, slide_id)

    monkeypatch.setattr(feats_io, "read_slide", counted)
    return seen


def _chunk(out: Path, slide_id: str) -> Path:
    chunks = sorted(
        p for p in (out / ROOT / "slides" / slide_id / "features" / "c").rglob("*") if p.is_file()
    )
    assert len(chunks) == 1
    return chunks[0]


def _damage(chunk: Path, keep_times: bool) -> None:
    """Zero 64 bytes in the middle of a chunk (its size unchanged); `keep_times`: put its mtime back."""
    before = chunk.stat()
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 64] = bytes(64)
    chunk.write_bytes(bytes(data))
    if keep_times:
        os.utime(chunk, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = chunk.stat()
    assert after.st_size == before.st_size and after.st_ino == before.st_ino
    assert (after.st_mtime_ns == before.st_mtime_ns) is keep_times


def test_a_rerun_with_nothing_new_decodes_no_stored_features(index, decodes) -> None:
    result = _index(index)
    assert result.exit_code == 0, result.output
    assert {r["status"] for r in _rows(result).values()} == {"skipped"}
    assert "no new slide or change" in result.stderr
    assert decodes == []


def test_an_add_reads_and_hashes_only_the_new_slides_features(index, decodes, monkeypatch) -> None:
    from search import manifest

    hashed: list[str] = []
    sha256 = manifest.file_sha256

    def counted(path):
        hashed.append(Path(path).relative_to(index["out"]).as_posix())
        return sha256(path)

    monkeypatch.setattr(manifest, "file_sha256", counted)
    shutil.move(index["aside"], index["store"] / "slides" / "s3")
    result = _index(index)
    assert result.exit_code == 0, result.output
    rows = _rows(result)
    assert (
        rows["s3"]["status"] == "done" and [rows[s]["status"] for s in ("s0", "s1", "s2")] == ["skipped"] * 3
    )
    assert decodes == ["s3"]  # the add's own read of the new rows; the done check read none
    slides = f"{ROOT.as_posix()}/slides/"
    assert {h[len(slides) :].split("/")[0] for h in hashed if h.startswith(slides)} == {"s3"}
    assert len(SlideIndex.open(index["out"])) == 4  # full sha256 verify of the new version


def test_an_api_add_reloads_hashing_only_the_files_it_wrote(index, monkeypatch) -> None:
    """SlideIndex.add reloads the new version with full verification (the default run.verify), hashing
    only the files the add wrote: those it opened with were hashed then."""
    from search import manifest

    opened = SlideIndex.open(index["out"])
    before = dict(opened.manifest["files"])
    hashed: list[str] = []
    sha256 = manifest.file_sha256
    monkeypatch.setattr(manifest, "file_sha256", lambda p: hashed.append(str(p)) or sha256(p))
    shutil.move(index["aside"], index["store"] / "slides" / "s3")
    opened.add(TileStore.open(index["store"]), progress=False)
    assert len(opened) == 4
    after = opened.manifest["files"]
    reloaded = {Path(h).relative_to(index["out"]).as_posix() for h in hashed}
    written = {rel for rel, meta in after.items() if before.get(rel) != meta}
    assert written and reloaded >= written  # every new or changed file was hashed, by the add or the reload
    assert not reloaded & {rel for rel, meta in after.items() if before.get(rel) == meta}
    # a file damaged with its size kept is still found by a fresh open
    victim = next(rel for rel in sorted(after) if rel.startswith(f"{ROOT.as_posix()}/slides/s0/features/c"))
    data = bytearray((index["out"] / victim).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (index["out"] / victim).write_bytes(bytes(data))
    with pytest.raises(InputFileError, match="sha256"):
        SlideIndex.open(index["out"])


def test_an_api_add_after_a_file_was_damaged_since_the_open_refuses_it(index) -> None:
    """What this object hashed at its open is trusted on reload only while its size, mtime and inode hold: a
    file damaged in place after the open (same size) is hashed again and refused, naming it."""
    opened = SlideIndex.open(index["out"])
    part = next(
        rel for rel in sorted(opened.manifest["files"]) if rel.startswith("barcodes.")
    )  # kept by an add
    data = bytearray((index["out"] / part).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (index["out"] / part).write_bytes(bytes(data))
    shutil.move(index["aside"], index["store"] / "slides" / "s3")
    with pytest.raises(InputFileError, match="sha256") as refused:
        opened.add(TileStore.open(index["store"]), progress=False)
    assert part in str(refused.value)


def test_a_chunk_damaged_in_place_is_found_by_the_quick_check(index, decodes, caplog) -> None:
    _damage(_chunk(index["out"], "s1"), keep_times=False)
    with caplog.at_level(logging.WARNING, logger="search.features"):
        result = _index(index)
    rows = _rows(result)
    assert rows["s1"]["status"] == "done" and rows["s0"]["status"] == rows["s2"]["status"] == "skipped"
    assert "s1" in caplog.text and "crc32c checksum; extracting it again" in caplog.text
    assert decodes.count("s0") == decodes.count("s2") == 0


def test_a_chunk_damaged_with_its_size_and_mtime_put_back_is_found_only_by_verify(
    index, decodes, caplog
) -> None:
    root = index["out"] / ROOT
    before = feats_io.read_slide(root, "s1")[1]
    _damage(_chunk(index["out"], "s1"), keep_times=True)
    decodes.clear()
    with caplog.at_level(logging.WARNING, logger="search.features"):
        quick = _index(index)
    assert quick.exit_code == 0 and {r["status"] for r in _rows(quick).values()} == {"skipped"}
    assert "crc32c" not in caplog.text and decodes == []  # the limit: same size, mtime and inode
    with pytest.raises(InputFileError, match="crc32c checksum"):
        feats_io.read_slide(root, "s1")  # any read of the features finds it
    with caplog.at_level(logging.WARNING, logger="search.features"):
        full = _index(index, "--verify")
    assert full.exit_code == 0, full.output
    rows = _rows(full)
    assert rows["s1"]["status"] == "done" and rows["s0"]["status"] == rows["s2"]["status"] == "skipped"
    assert "crc32c checksum; extracting it again" in caplog.text
    assert {"s0", "s1", "s2"} <= set(decodes)
    np.testing.assert_allclose(feats_io.read_slide(root, "s1")[1], before, rtol=1e-5, atol=1e-6)


def test_a_slide_without_a_stamp_is_decoded_once_and_stamped(index, decodes) -> None:
    stamp = index["out"] / ROOT / "slides" / "s0" / feats_io.STAMP
    stamp.unlink()  # as the code before stamps wrote it
    assert _index(index).exit_code == 0
    assert decodes == ["s0"] and stamp.is_file()
    decodes.clear()
    assert _index(index).exit_code == 0
    assert decodes == []
    SlideIndex.open(index["out"])  # the stamp is no file of the manifest: full verify passes


def test_a_label_change_is_copied_without_decoding(index, decodes) -> None:
    TileStore.open(index["store"]).update_record("s0", {"label": "class9"})
    result = _index(index)
    assert result.exit_code == 0, result.output
    assert _rows(result)["s0"]["detail"]["updated"] == {"label": ["class0", "class9"]}
    assert "updated: s0: label class0 -> class9" in result.stderr
    assert decodes == []
    opened = SlideIndex.open(index["out"])
    assert opened.catalog.labels[opened.catalog.slide_ids.index("s0")] == "class9"


def test_the_stamp_is_written_with_the_slide_and_survives_its_rename(tmp_path) -> None:
    root = feats_io.open_features(tmp_path, {"hash": "h", "feature_definition": {}, "feature_dim": 4}, {})
    record = {"slide_id": "a", "n_tiles": 2}
    feats_io.write_slide(root, record, np.ones((2, 4), np.float32), np.ones((2, 2), np.int64))
    where = root / "slides" / "a"
    files = json.loads((where / feats_io.STAMP).read_text())["files"]
    assert {"features/c/0/0", "coords/c/0/0", "features/zarr.json"} <= set(files)
    for rel, (size, mtime_ns, inode) in files.items():
        st = (where / rel).stat()
        assert (st.st_size, st.st_mtime_ns, st.st_ino) == (size, mtime_ns, inode)
    assert feats_io.verified_record(root, "a") == record
    assert feats_io.stamp_matches(root, "a")
    (where / feats_io.STAMP).write_text(json.dumps({"files": {}}))  # a stamp that vouches for no file
    assert not feats_io.stamp_matches(root, "a")


def test_a_stamped_chunk_file_that_is_gone_fails_the_slide(tmp_path) -> None:
    root = feats_io.open_features(tmp_path, {"hash": "h", "feature_definition": {}, "feature_dim": 4}, {})
    feats_io.write_slide(root, {"slide_id": "a", "n_tiles": 2}, np.ones((2, 4), np.float32), np.ones((2, 2)))
    (root / "slides" / "a" / "coords" / "c" / "0" / "0").unlink()  # zarr alone would read fill values
    for verify in ("quick", "full"):
        with pytest.raises(InputFileError, match="chunk file written with the slide is missing"):
            feats_io.verified_record(root, "a", verify)


def test_verify_without_tiles_is_refused_in_one_line(index) -> None:
    result = CliRunner().invoke(main, ["index", "--out", str(index["out"]), "--drift", "--verify"])
    assert result.exit_code == 2
    assert (
        result.output.strip()
        == "error: --verify checks the stored features of a --tiles run (no --tiles given)"
    )


def test_the_rerun_benchmark_times_both_checks_side_by_side(tmp_path) -> None:
    out = tmp_path / "bench.json"
    args = ["--slides", "6", "--tiles", "4", "--dim", "16", "--work", str(tmp_path / "w"), "--out", str(out)]
    done = subprocess.run(
        [sys.executable, str(REPO / "scripts/bench_index_rerun.py"), *args],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    (row,) = json.loads(out.read_text())["rows"]
    assert row["slides"] == 6 and row["tiles"] == 24 and row["quick_s"] > 0 and row["full_s"] > 0
    assert "full/quick" in done.stdout
