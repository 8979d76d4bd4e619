"""Issue 20, item 10: messages that say what happened (permission denied, truncated, an unreadable
folder recorded, `case..1` accepted, `X.svs` and `X` with different labels refused, the wrong delimiter)."""

from __future__ import annotations

import json
import os
import re
import shutil

import pytest
from click.testing import CliRunner
from conftest import SHARED_DATA
from faults_support import TILE, run_unprivileged, write_slides

from histo.cli import main
from histo.errors import InputFileError
from pathology.slide import open_slide
from pathology.slide_labels import read_labels
from pathology.store import TileStore

CMU = SHARED_DATA / "wsi" / "CMU-1-Small-Region.svs"


@pytest.fixture(scope="module")
def slides(tmp_path_factory):
    return write_slides(tmp_path_factory.mktemp("slides"), 2)


def _rows(result) -> dict:
    return {r["id"]: r for r in json.loads(result.stdout)["outcomes"]}


def test_an_unreadable_slide_and_folder_say_permission_denied(slides, tmp_path) -> None:
    cohort = tmp_path / "cohort"
    locked = cohort / "locked"
    locked.mkdir(parents=True)
    shutil.copy(slides[0], cohort / "s0.svs")
    shutil.copy(slides[1], cohort / "secret.svs")
    shutil.copy(slides[1], locked / "hidden_away.svs")
    (cohort / "secret.svs").chmod(0o000)
    locked.chmod(0o000)
    try:
        result = run_unprivileged(["tile", str(cohort), "--out", str(tmp_path / "s.zarr"), *TILE, "--json"])
    finally:
        locked.chmod(0o755)
    assert result.returncode == 1, result.stderr
    rows = _rows(result)
    assert rows["s0"]["status"] == "done"
    assert rows["secret"]["status"] == "failed" and "permission denied" in rows["secret"]["reason"]
    assert rows["locked/"]["status"] == "failed" and rows["locked/"]["path"] == str(locked)
    assert "folder not searched for slides: Permission denied" in rows["locked/"]["reason"]
    assert "hidden_away" not in rows


def test_a_truncated_slide_says_truncated(slides, tmp_path) -> None:
    size = CMU.stat().st_size
    for name, keep in (("head.svs", 40_000), ("tail.svs", size - 1000)):
        (tmp_path / name).write_bytes(CMU.read_bytes()[:keep])
        with pytest.raises(
            InputFileError, match=f"truncated: the file is {keep} bytes but its TIFF directory"
        ):
            open_slide(tmp_path / name)
    whole = slides[1].read_bytes()  # OpenSlide opens this one, and reads its missing tiles as blank
    (tmp_path / "half.svs").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(InputFileError, match=f"truncated: the file is {len(whole) // 2} bytes"):
        open_slide(tmp_path / "half.svs")
    (tmp_path / "notes.svs").write_text("not a slide at all\n" * 50)
    with pytest.raises(InputFileError, match="not a slide format OpenSlide can read"):
        open_slide(tmp_path / "notes.svs")


def test_an_id_with_dots_inside_is_accepted(slides, tmp_path) -> None:
    shutil.copy(slides[0], tmp_path / "case..1.svs")
    result = CliRunner().invoke(
        main, ["tile", str(tmp_path / "case..1.svs"), "--out", str(tmp_path / "s.zarr"), *TILE, "--json"]
    )
    assert result.exit_code == 0, result.output
    assert TileStore.open(tmp_path / "s.zarr").slide_ids() == ["case..1"]


def test_a_slide_listed_with_and_without_its_extension_must_agree(tmp_path) -> None:
    csv = tmp_path / "labels.csv"
    csv.write_text("slide,label\nX.svs,LUAD\nY,LUSC\nX,LUSC\n")
    with pytest.raises(
        InputFileError, match=r"lines 4 and 2: slide 'X' is listed as 'X' and 'X.svs' with different values"
    ):
        read_labels(csv)
    csv.write_text("slide,label\nX.svs,LUAD\nX,LUAD\n")
    assert read_labels(csv)["X"].label == "LUAD"  # the same row twice is no conflict


@pytest.mark.parametrize("delimiter", [";", "\t"])
def test_a_csv_with_another_delimiter_is_told_so(tmp_path, delimiter) -> None:
    csv = tmp_path / "labels.csv"
    csv.write_text(f"slide{delimiter}label\nX{delimiter}LUAD\n")
    with pytest.raises(
        InputFileError, match=re.escape(f"looks {delimiter!r}-separated, and the file must use commas")
    ):
        read_labels(csv)


def test_empty_and_missing_files_keep_their_messages(tmp_path) -> None:
    (tmp_path / "empty.svs").write_bytes(b"")
    with pytest.raises(InputFileError, match="empty file"):
        open_slide(tmp_path / "empty.svs")
    with pytest.raises(InputFileError, match="file not found"):
        open_slide(tmp_path / "gone.svs")
    os.symlink(tmp_path / "loop.svs", tmp_path / "loop.svs")
    with pytest.raises(InputFileError, match="symbolic link loop"):
        open_slide(tmp_path / "loop.svs")
