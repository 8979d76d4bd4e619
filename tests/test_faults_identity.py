"""Issue 20, item 3: identity across runs. A different source under an ID already done is refused
(naming both files) unless --replace; the same file moved elsewhere is still the same source."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner
from faults_support import TILE, write_slides

from histo.cli import main
from histo.identity import SourceIdentity, fingerprint, source_change
from pathology.store import TileStore


@pytest.fixture(scope="module")
def sites(tmp_path_factory) -> dict[str, Path]:
    """Two sites whose slides share stems (s0, s1) but not content."""
    root = tmp_path_factory.mktemp("sites")
    write_slides(root / "a", 2)
    write_slides(root / "b", 2, first_seed=10)
    return {"a": root / "a", "b": root / "b"}


def _tile(out: Path, *inputs, extra=()):
    result = CliRunner().invoke(main, ["tile", *map(str, inputs), "--out", str(out), *TILE, *extra, "--json"])
    return result, {r["id"]: r for r in json.loads(result.stdout)["outcomes"]} if result.stdout else {}


def test_fingerprint_reads_head_and_tail_and_sees_size(tmp_path) -> None:
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    a.write_bytes(b"x" * 300_000)
    b.write_bytes(b"x" * 300_000)
    c.write_bytes(b"x" * 299_999 + b"y")
    assert fingerprint(a) == fingerprint(b) != fingerprint(c)
    same, moved = SourceIdentity.of(a), SourceIdentity.of(b)
    assert source_change(same, moved) is None  # same content elsewhere: the same source
    assert "came from" in source_change(same, SourceIdentity.of(c))
    old = SourceIdentity(str(a))  # an old record: content unknown, path compared
    assert source_change(old, SourceIdentity.of(a)) is None and source_change(old, moved) is not None


def test_a_different_slide_under_a_done_id_is_refused_unless_replaced(sites, tmp_path) -> None:
    out = tmp_path / "s.zarr"
    first, _ = _tile(out, sites["a"])
    assert first.exit_code == 0
    before = TileStore.open(out).record("s0")
    result, rows = _tile(out, sites["b"] / "s0.svs")
    assert result.exit_code == 1
    reason = rows["s0"]["reason"]
    assert rows["s0"]["status"] == "failed" and "--replace" in reason
    assert str(sites["a"] / "s0.svs") in reason and str(sites["b"] / "s0.svs") in reason
    assert TileStore.open(out).record("s0") == before  # the stored slide is untouched
    replaced, rows = _tile(out, sites["b"] / "s0.svs", extra=["--replace"])
    assert replaced.exit_code == 0 and rows["s0"]["status"] == "done"
    rec = TileStore.open(out).record("s0")
    assert rec.source_path == str(sites["b"] / "s0.svs")
    assert (rec.source_size, rec.source_fingerprint) == (
        (sites["b"] / "s0.svs").stat().st_size,
        fingerprint(sites["b"] / "s0.svs"),
    )


def test_a_slide_changed_in_place_is_refused(sites, tmp_path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(sites["a"] / "s1.svs", folder / "s1.svs")
    out = tmp_path / "s.zarr"
    assert _tile(out, folder)[0].exit_code == 0
    shutil.copy(sites["b"] / "s1.svs", folder / "s1.svs")  # rescanned under the same name
    result, rows = _tile(out, folder)
    assert result.exit_code == 1 and "changed since" in rows["s1"]["reason"]


def test_the_same_slide_moved_is_kept_and_its_new_path_recorded(sites, tmp_path) -> None:
    out = tmp_path / "s.zarr"
    assert _tile(out, sites["a"] / "s0.svs")[0].exit_code == 0
    moved = tmp_path / "archive" / "s0.svs"
    moved.parent.mkdir()
    shutil.copy(sites["a"] / "s0.svs", moved)
    result, rows = _tile(out, moved)
    assert result.exit_code == 0 and rows["s0"]["status"] == "done"
    assert rows["s0"]["detail"]["updated"] == {"source_path": [str(sites["a"] / "s0.svs"), str(moved)]}
    assert TileStore.open(out).record("s0").source_path == str(moved)
    _, rows = _tile(out, moved)
    assert rows["s0"]["status"] == "skipped"


def test_a_record_without_identity_counts_as_unknown(sites, tmp_path) -> None:
    """A store written before identities were recorded: same path is the same source; another is refused."""
    out = tmp_path / "s.zarr"
    assert _tile(out, sites["a"] / "s0.svs")[0].exit_code == 0
    meta = out / "slides" / "s0" / "zarr.json"
    doc = json.loads(meta.read_text())
    for key in ("source_size", "source_fingerprint", "tiles_digest"):
        doc["attributes"]["record"].pop(key)
    meta.write_text(json.dumps(doc))
    _, rows = _tile(out, sites["a"] / "s0.svs")
    assert rows["s0"]["status"] == "skipped"
    _, rows = _tile(out, sites["b"] / "s0.svs")
    assert rows["s0"]["status"] == "failed" and "--replace" in rows["s0"]["reason"]


def test_segment_predict_refuses_another_case_under_a_segmented_id(tmp_path) -> None:
    import nibabel as nib
    import numpy as np
    from test_batch import _unet

    from segmentation.synthetic import make_cases

    a = make_cases(tmp_path / "a", 1, shape=(16, 16, 16), seed=1)[0]
    b = make_cases(tmp_path / "b", 1, shape=(16, 16, 16), seed=2)[0]
    assert a.name == b.name
    model, pred = _unet(tmp_path / "unet.pt"), tmp_path / "pred"
    base = [
        "segment",
        "predict",
        "--model",
        str(model),
        "--out",
        str(pred),
        "--roi",
        "16,16,16",
        "--device",
        "cpu",
    ]

    def predict(case: Path, *extra: str) -> dict:
        result = CliRunner().invoke(main, [*base, str(case), *extra, "--json"])
        return json.loads(result.stdout)["outcomes"][0] | {"code": result.exit_code}

    assert predict(a)["status"] == "done"
    first = np.asarray(nib.load(pred / f"{a.name}.nii.gz").dataobj)
    assert predict(a)["status"] == "skipped"
    other = predict(b)
    assert other["code"] == 1 and other["status"] == "failed" and "--replace" in other["reason"]
    assert str(a) in other["reason"] and str(b) in other["reason"]
    np.testing.assert_array_equal(np.asarray(nib.load(pred / f"{a.name}.nii.gz").dataobj), first)
    assert predict(b, "--replace")["status"] == "done"
    assert predict(b)["status"] == "skipped"
