"""Issue 20, item 7: a checksum per stored chunk (tile pixels, mosaic arrays, index features), verified
on read; a damaged chunk fails its slide with the reason. Stores written without checksums still open."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr
from click.testing import CliRunner

from histo.cli import main
from histo.errors import InputFileError
from pathology.store import TileStore
from search import features as feats_io


def _zero_64_bytes(chunk: Path) -> None:
    data = bytearray(chunk.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 64] = bytes(64)
    chunk.write_bytes(bytes(data))


def _chunks(array_dir: Path) -> list[Path]:
    return sorted(p for p in (array_dir / "c").rglob("*") if p.is_file())


@pytest.fixture
def store(tile_store, tmp_path) -> Path:
    copy = tmp_path / "tiles.zarr"
    shutil.copytree(tile_store, copy)
    return copy


def test_a_damaged_pixel_chunk_fails_reading_with_the_reason(store) -> None:
    tiles = TileStore.open(store)
    good = tiles.read_selected("s1")
    _zero_64_bytes(_chunks(store / "slides" / "s1" / "pixels")[1])
    with pytest.raises(InputFileError, match="crc32c checksum") as e:
        tiles.read_selected("s1")
    assert "s1" in str(e.value) and "pixels" in str(e.value)
    np.testing.assert_array_equal(tiles.read_selected("s1", [0]), good[:1])  # the sound chunks still read
    _zero_64_bytes(_chunks(store / "slides" / "s2" / "cellularity")[0])
    with pytest.raises(InputFileError, match="crc32c checksum"):
        tiles.cellularity("s2")


def test_index_fails_the_slide_with_a_damaged_chunk_and_rebuilds_damaged_features(
    store, tmp_path, caplog
) -> None:
    from pathology.kimianet import random_init_checkpoint

    _zero_64_bytes(_chunks(store / "slides" / "s1" / "pixels")[0])
    model = random_init_checkpoint(tmp_path / "m.pt", input_px=32)
    out = tmp_path / "index"
    args = [
        "index",
        "--tiles",
        str(store),
        "--model",
        str(model),
        "--out",
        str(out),
        "--device",
        "cpu",
        "--json",
    ]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1, result.output
    rows = {r["id"]: r for r in json.loads(result.stdout)["outcomes"]}
    assert rows["s1"]["status"] == "failed" and "crc32c checksum" in rows["s1"]["reason"]
    assert [rows[s]["status"] for s in ("s0", "s2", "s3")] == ["done"] * 3
    # A damaged features chunk inside the index is found on the next run and extracted again.
    root = out / feats_io.FEATURES_DIR
    before = feats_io.read_slide(root, "s2")[1]
    _zero_64_bytes(_chunks(root / "slides" / "s2" / "features")[0])
    with pytest.raises(InputFileError, match="crc32c checksum"):
        feats_io.read_slide(root, "s2")
    with caplog.at_level(logging.WARNING, logger="search.features"):
        again = CliRunner().invoke(main, args)
    rows = {r["id"]: r for r in json.loads(again.stdout)["outcomes"]}
    assert rows["s2"]["status"] == "done" and rows["s0"]["status"] == "skipped"
    assert "crc32c checksum; extracting it again" in caplog.text
    np.testing.assert_allclose(feats_io.read_slide(root, "s2")[1], before, rtol=1e-5, atol=1e-6)


def test_a_store_written_without_checksums_still_reads(store) -> None:
    """Arrays as the code before checksums wrote them (zarr's default codecs): read as they are."""
    pixels = np.random.default_rng(0).integers(0, 255, (3, 32, 32, 3), dtype=np.uint8)
    group = zarr.open_group(store / "slides" / "s0", mode="a")
    del group["pixels"]
    group.create_array("pixels", data=pixels, chunks=(1, 32, 32, 3))
    assert "crc32c" not in (store / "slides" / "s0" / "pixels" / "zarr.json").read_text()
    np.testing.assert_array_equal(TileStore.open(store).read_selected("s0"), pixels)
