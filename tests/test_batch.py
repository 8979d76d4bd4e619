"""histo.batch: the outcome record, the shared runner (shards, resume, the exception policy, worker
processes) and the one JSON shape, summary line and exit codes of every batch command."""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest

from histo.batch import (
    ALREADY_DONE,
    STATUSES,
    WORKER_DIED,
    BatchSummary,
    Outcome,
    reason_of,
    run_batch,
    select_shard,
)
from histo.errors import HistoError, InputFileError


@dataclass(frozen=True)
class It:
    id: str
    path: str | None = None


def _items(n: int) -> list[It]:
    return [It(f"i{k}", f"/data/i{k}.svs") for k in range(n)]


def _ok(item: It) -> Outcome:
    return Outcome.done(item.id, item.path, size=len(item.id))


# ---- the record ---------------------------------------------------------------------------------------


def test_outcome_rules_and_shape() -> None:
    done = Outcome.done("a", Path("/x/a.svs"), n=3)
    assert done.to_dict() == {
        "id": "a",
        "path": "/x/a.svs",
        "status": "done",
        "reason": None,
        "detail": {"n": 3},
    }
    assert Outcome.failed("b", None, "unreadable").to_dict()["reason"] == "unreadable"
    with pytest.raises(ValueError, match="needs a reason"):
        Outcome.failed("b", None, "  ")
    with pytest.raises(ValueError, match="needs a reason"):
        Outcome("b", None, "skipped")
    with pytest.raises(ValueError, match="no reason"):
        Outcome("a", None, "done", "why")
    with pytest.raises(ValueError, match="status must be one of"):
        Outcome("a", None, "ok")  # type: ignore[arg-type]


def test_summary_counts_line_exit_code_and_json() -> None:
    outcomes = [
        Outcome.done("a", None),
        Outcome.skipped("b", None, ALREADY_DONE),
        Outcome.failed("c", None, "bad"),
    ]
    batch = BatchSummary(tuple(outcomes), out="S.zarr", shard=(1, 4), extra={"model": "m.pt"})
    assert batch.counts == {"done": 1, "skipped": 1, "failed": 1}
    assert batch.summary_line() == "1 done, 1 skipped, 1 failed -> S.zarr"
    assert batch.exit_code() == 1 and BatchSummary(tuple(outcomes[:2])).exit_code() == 0
    assert BatchSummary(()).summary_line() == "0 done, 0 skipped, 0 failed"
    d = batch.to_dict()
    assert list(d) == ["out", "shard", "counts", "model", "outcomes"] and d["shard"] == [1, 4]
    assert json.loads(json.dumps(d))["outcomes"][2] == outcomes[2].to_dict()
    with pytest.raises(ValueError, match="hide"):
        BatchSummary((), extra={"counts": 1})


def test_reason_is_one_line_without_the_items_own_path() -> None:
    assert (
        reason_of(InputFileError("/data/a.svs", "empty file (0 bytes)"), "/data/a.svs")
        == "empty file (0 bytes)"
    )
    other = InputFileError("/data/labels.csv", "no row")
    assert reason_of(other, "/data/a.svs") == "/data/labels.csv: no row"  # another file stays named
    assert (
        reason_of(PermissionError(13, "Permission denied"), None)
        == "PermissionError: [Errno 13] Permission denied"
    )
    assert reason_of(HistoError("first line\nsecond line")) == "first line"


# ---- the runner ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 3, 4, 11])
def test_shards_partition_the_items_exactly(n: int) -> None:
    items = _items(10)
    shares = [select_shard(items, (i, n)) for i in range(n)]
    assert sorted((it for share in shares for it in share), key=items.index) == items
    assert sum(map(len, shares)) == len(items)  # disjoint: each item in exactly one share
    assert shares == [items[i::n] for i in range(n)]  # position k goes to share k % n, in order
    seen: list[str] = []
    out = run_batch(items, lambda it: seen.append(it.id) or _ok(it), shard=(n - 1, n), progress=False)
    assert [o.id for o in out] == seen == [it.id for it in shares[n - 1]]
    with pytest.raises(HistoError, match="need 0 <= I < N"):
        select_shard(items, (n, n))


def test_resume_skips_what_is_done() -> None:
    items, seen, reported = _items(4), [], []
    finished = {"i1": {"size": 2}, "i3": {}}
    out = run_batch(
        items,
        lambda it: seen.append(it.id) or _ok(it),
        is_done=lambda it: finished.get(it.id),
        on_outcome=lambda it, o: reported.append((it.id, o.status)),
        progress=False,
    )
    assert seen == ["i0", "i2"]
    assert [(o.id, o.status, o.reason) for o in out] == [
        ("i0", "done", None),
        ("i1", "skipped", ALREADY_DONE),
        ("i2", "done", None),
        ("i3", "skipped", ALREADY_DONE),
    ]
    assert out[1].detail == {"size": 2} and out[1].path == "/data/i1.svs"
    assert reported == [("i1", "skipped"), ("i3", "skipped"), ("i0", "done"), ("i2", "done")]  # skipped first


def _faulty(item: It) -> Outcome:
    if item.id == "i1":
        raise InputFileError(item.path, "not a slide format OpenSlide can read")
    if item.id == "i2":
        raise PermissionError(13, "Permission denied", item.path)
    return _ok(item)


def test_a_bad_item_is_recorded_the_rest_goes_on_and_its_traceback_is_debug_only(caplog, capfd) -> None:
    caplog.set_level(logging.DEBUG, logger="histo.batch")
    out = run_batch(_items(4), _faulty, desc="tile", progress=False)
    assert [o.status for o in out] == ["done", "failed", "failed", "done"]
    assert out[1].reason == "not a slide format OpenSlide can read" and out[1].path == "/data/i1.svs"
    assert out[2].reason.startswith("PermissionError: [Errno 13] Permission denied")
    traces = [r for r in caplog.records if "Traceback" in r.getMessage()]
    assert len(traces) == 2 and {r.levelno for r in traces} == {logging.DEBUG}
    assert "in _faulty" in traces[0].getMessage()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [
        "tile: i1 failed: not a slide format OpenSlide can read",
        f"tile: i2 failed: {out[2].reason}",
    ]
    assert "Traceback" not in capfd.readouterr().err


@pytest.mark.parametrize("bug", [TypeError, AttributeError, AssertionError, KeyError, ValueError])
def test_a_programming_error_surfaces_and_nothing_is_recorded_for_it(bug: type[Exception]) -> None:
    seen, reported = [], []

    def process(item: It) -> Outcome:
        seen.append(item.id)
        if item.id == "i2":
            raise bug("a bug, not bad data")
        return _ok(item)

    with pytest.raises(bug):
        run_batch(_items(5), process, on_outcome=lambda it, o: reported.append(o.id), progress=False)
    assert seen == ["i0", "i1", "i2"] and reported == ["i0", "i1"]


def test_process_must_return_an_outcome() -> None:
    with pytest.raises(TypeError, match="must return an Outcome"):
        run_batch(_items(1), lambda it: {"status": "ok"}, progress=False)


# worker processes: module-level functions, so the spawned workers can import them


def _in_worker(item: It) -> Outcome:
    if item.id == "bad":
        raise InputFileError(item.path, "truncated")
    if item.id == "dies":
        os._exit(3)  # a crash in a C library: the process is gone without a Python exception
    if item.id == "bug":
        raise KeyError("tile_px")
    return Outcome.done(item.id, item.path, pid=os.getpid())


def test_workers_record_bad_items_and_a_dead_worker_fails_only_its_item(caplog) -> None:
    caplog.set_level(logging.DEBUG, logger="histo.batch")
    items = [It("a", "/d/a"), It("bad", "/d/bad"), It("dies", "/d/dies"), It("b", "/d/b")]
    out = run_batch(items, _in_worker, workers=2, progress=False)
    assert [(o.id, o.status) for o in out] == [
        ("a", "done"),
        ("bad", "failed"),
        ("dies", "failed"),
        ("b", "done"),
    ]
    assert out[1].reason == "truncated" and out[2].reason == WORKER_DIED
    assert out[0].detail["pid"] != os.getpid()  # processed in a worker
    assert any("Traceback" in r.getMessage() and r.levelno == logging.DEBUG for r in caplog.records)
    with pytest.raises(KeyError, match="tile_px"):
        run_batch([It("a"), It("bug"), It("b")], _in_worker, workers=2, progress=False)


# ---- every batch command: one JSON shape, one summary line, the exit codes ------------------------------


def assert_one_shape(payload: dict, counts: dict[str, int]) -> list[dict]:
    """The batch JSON every command prints; returns its failed outcomes (what `jq 'select(.status ==
    "failed")'` selects)."""
    assert {"out", "shard", "counts", "outcomes"} <= set(payload)
    assert payload["counts"] == counts
    for o in payload["outcomes"]:
        assert set(o) == {"id", "path", "status", "reason", "detail"}, o
        assert o["status"] in STATUSES and (o["reason"] is None) == (o["status"] == "done"), o
    assert Counter(o["status"] for o in payload["outcomes"]) == Counter(
        {k: v for k, v in counts.items() if v}
    )
    return [o for o in payload["outcomes"] if o["status"] == "failed"]


def _invoke(args: list) -> tuple[int, str, str]:
    from click.testing import CliRunner

    from histo.cli import main

    result = CliRunner().invoke(main, [str(a) for a in args])
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout, result.stderr


@pytest.fixture(scope="module")
def slides(tmp_path_factory) -> dict:
    """Three small synthetic slides and an empty file among them; a tiling config for 32 px tiles."""
    from pathology.synthetic import write_synthetic_slide

    root = tmp_path_factory.mktemp("slides")
    folder = root / "slides"
    folder.mkdir()
    for c in range(3):
        write_synthetic_slide(folder / f"syn{c}.svs", 1280, 1024, c % 2, seed=c)
    (folder / "empty.svs").write_bytes(b"")
    config = root / "tile.yaml"
    config.write_text("tile: {px: 32, um: 64.0}\nmosaic: {percent: 50.0}\ncellularity: {top_fraction: 1.0}\n")
    return {"root": root, "folder": folder, "config": config}


def test_tile_json_summary_line_and_exit_code(slides: dict, tmp_path: Path) -> None:
    out = tmp_path / "s.zarr"
    code, stdout, stderr = _invoke(
        ["tile", slides["folder"], "--out", out, "--config", slides["config"], "--json"]
    )
    assert code == 1
    failed = assert_one_shape(json.loads(stdout), {"done": 3, "skipped": 0, "failed": 1})
    assert [(o["id"], o["reason"]) for o in failed] == [("empty", "empty file (0 bytes)")]
    assert stderr.strip().splitlines()[-1] == f"3 done, 0 skipped, 1 failed -> {out}"
    code, stdout, _ = _invoke(
        ["tile", slides["folder"] / "syn0.svs", "--out", out, "--config", slides["config"], "--json"]
    )
    assert code == 0  # done or skipped only
    assert assert_one_shape(json.loads(stdout), {"done": 0, "skipped": 1, "failed": 0}) == []


def test_empty_inputs_are_a_user_mistake_and_create_nothing(slides: dict, tmp_path: Path) -> None:
    empty = tmp_path / "nothing"
    empty.mkdir()
    (empty / "notes.txt").write_text("no slide here")
    code, stdout, stderr = _invoke(
        ["tile", empty, "--out", tmp_path / "s.zarr", "--config", slides["config"]]
    )
    assert code == 2 and stdout == "" and stderr.count("\n") == 1 and "no slide files found" in stderr
    assert not (tmp_path / "s.zarr").exists()
    # a store whose every slide failed has nothing to index
    failed_only = tmp_path / "failed.zarr"
    code, _, _ = _invoke(
        ["tile", slides["folder"] / "empty.svs", "--out", failed_only, "--config", slides["config"]]
    )
    assert code == 1
    from pathology.kimianet import random_init_checkpoint

    model = random_init_checkpoint(tmp_path / "m.pt", input_px=32)
    index = tmp_path / "index"
    code, _, stderr = _invoke(
        ["index", "--tiles", failed_only, "--model", model, "--out", index, "--device", "cpu"]
    )
    assert code == 2 and stderr.count("\n") == 1 and "no tiled slide" in stderr and not index.exists()
    # no case folder: segment predict and eval
    ckpt = _unet(tmp_path / "unet.pt")
    args = ["segment", "predict", "--model", ckpt, empty, "--out", tmp_path / "pred", "--roi", "16,16,16"]
    code, _, stderr = _invoke([*args, "--device", "cpu"])
    assert (
        code == 2
        and stderr.count("\n") == 1
        and "no case folders" in stderr
        and not (tmp_path / "pred").exists()
    )
    code, _, stderr = _invoke(["segment", "eval", "--pred", empty, "--data", empty])
    assert code == 2 and stderr.count("\n") == 1 and "no case folders" in stderr
    assert sorted(p.name for p in empty.iterdir()) == ["notes.txt"]


def test_index_json_with_a_slide_that_cannot_be_read(slides: dict, tmp_path: Path) -> None:
    from pathology.kimianet import random_init_checkpoint

    moved = tmp_path / "slides"
    shutil.copytree(slides["folder"], moved)
    (moved / "empty.svs").unlink()
    store = tmp_path / "s.zarr"
    assert _invoke(["tile", moved, "--out", store, "--config", slides["config"]])[0] == 0
    (moved / "syn1.svs").unlink()  # no saved pixels: its tiles are read from the (now missing) file
    model = random_init_checkpoint(tmp_path / "m.pt", input_px=32)
    args = [
        "index",
        "--tiles",
        store,
        "--model",
        model,
        "--out",
        tmp_path / "index",
        "--device",
        "cpu",
        "--json",
    ]
    code, stdout, stderr = _invoke(args)
    assert code == 1, stderr
    report = json.loads(stdout)
    failed = assert_one_shape(report, {"done": 2, "skipped": 0, "failed": 1})
    assert failed[0]["id"] == "syn1" and "has moved or is missing" in failed[0]["reason"]
    assert report["index"]["counts"]["slides"] == 2
    assert [f["slide_id"] for f in report["index"]["failed_slides"]] == ["syn1"]
    assert "failed: syn1: " in stderr
    assert stderr.strip().splitlines()[-1] == f"2 done, 0 skipped, 1 failed -> {tmp_path / 'index'}"


def _unet(path: Path) -> Path:
    import torch

    from segmentation.infer import save_model
    from segmentation.unet import UNet3D

    torch.manual_seed(0)
    net = UNet3D(channels=(4, 8), blocks_per_level=1, expansion=1, norm="batch")
    save_model(path, net, {})
    return path


@pytest.fixture(scope="module")
def cases(tmp_path_factory) -> dict:
    """Two good synthetic BraTS cases, one whose T2 is missing, and a tiny U-Net checkpoint."""
    from segmentation.synthetic import make_cases

    root = tmp_path_factory.mktemp("cases")
    folders = make_cases(root / "data", 3, shape=(16, 16, 16), seed=4)
    next(folders[1].glob("*_t2.nii.gz")).unlink()
    return {"root": root, "data": root / "data", "bad": folders[1].name, "model": _unet(root / "unet.pt")}


def test_segment_predict_and_eval_json_with_a_bad_case(cases: dict, tmp_path: Path) -> None:
    pred = tmp_path / "pred"
    args = [
        "segment",
        "predict",
        "--model",
        cases["model"],
        cases["data"],
        "--out",
        pred,
        "--roi",
        "16,16,16",
    ]
    code, stdout, stderr = _invoke([*args, "--device", "cpu", "--json"])
    assert code == 1, stderr
    failed = assert_one_shape(json.loads(stdout), {"done": 2, "skipped": 0, "failed": 1})
    assert failed[0]["id"] == cases["bad"] and "missing modality t2" in failed[0]["reason"]
    assert json.loads((pred / "predictions.json").read_text()) == json.loads(stdout)
    assert stderr.strip().splitlines()[-1] == f"2 done, 0 skipped, 1 failed -> {pred}"

    code, stdout, stderr = _invoke(["segment", "eval", "--pred", pred, "--data", cases["data"], "--json"])
    assert code == 1, stderr
    report = json.loads(stdout)
    failed = assert_one_shape(report, {"done": 2, "skipped": 0, "failed": 1})
    assert failed[0]["id"] == cases["bad"] and "legacy_dice_WT" in report["outcomes"][0]["detail"]
    assert 0.0 <= report["metrics"]["legacy_dice_WT"]["mean"] <= 1.0
    assert stderr.strip().splitlines()[-1] == f"2 done, 0 skipped, 1 failed -> {pred}"


def test_robustness_json_with_a_failing_cell(cases: dict, tmp_path: Path, monkeypatch) -> None:
    import dataclasses

    from segmentation.corruptions import CORRUPTIONS

    bias = CORRUPTIONS["bias_field"]

    def flaky(x, magnitude, rng):
        if magnitude == bias.severities[1]:  # severity 2
            raise InputFileError("case.nii.gz", "volume became unreadable")
        return bias.fn(x, magnitude, rng)

    monkeypatch.setitem(CORRUPTIONS, "bias_field", dataclasses.replace(bias, fn=flaky))
    good = tmp_path / "data"
    shutil.copytree(cases["data"] / "synth_000", good / "synth_000")
    (tmp_path / "cfg.yaml").write_text("segment:\n  roi: [16, 16, 16]\n")
    args = ["robustness", "segment", "--model", cases["model"], "--data", good, "--out", tmp_path / "out"]
    args += ["--corruptions", "bias_field", "--severities", "1,2", "--config", tmp_path / "cfg.yaml"]
    code, stdout, stderr = _invoke([*args, "--device", "cpu", "--json"])
    assert code == 1, stderr
    failed = assert_one_shape(json.loads(stdout), {"done": 2, "skipped": 0, "failed": 1})
    assert failed[0]["id"] == "unet:bias_field:2" and "volume became unreadable" in failed[0]["reason"]
    code, stdout, _ = _invoke([*args, "--device", "cpu", "--json"])  # resumes: the failed cell runs again
    assert code == 1 and json.loads(stdout)["counts"] == {"done": 0, "skipped": 2, "failed": 1}


def test_two_case_folders_with_one_id_do_not_share_an_output(cases: dict, tmp_path: Path) -> None:
    other = tmp_path / "site_b" / "synth_000"
    shutil.copytree(cases["data"] / "synth_000", other)
    pred = tmp_path / "pred"
    args = ["segment", "predict", "--model", cases["model"], cases["data"] / "synth_000", other]
    code, stdout, _ = _invoke([*args, "--out", pred, "--roi", "16,16,16", "--device", "cpu", "--json"])
    failed = assert_one_shape(json.loads(stdout), {"done": 1, "skipped": 0, "failed": 1})
    assert code == 1 and failed[0]["path"] == str(other) and "duplicate case ID" in failed[0]["reason"]
