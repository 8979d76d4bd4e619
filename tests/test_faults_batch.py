"""Issue 20, item 6: one bad item never ends the batch; one bad environment ends it cleanly, with the
summary of what finished (also under --json)."""

from __future__ import annotations

import errno
import json
import os
from dataclasses import dataclass

import pytest
from click.testing import CliRunner
from faults_support import DISK_FULL, TILE, write_slides

from histo.batch import BatchStopped, EnvironmentFault, Outcome, run_batch
from histo.cli import main
from pathology.store import TileStore


@dataclass(frozen=True)
class It:
    id: str
    path: str | None = None


@pytest.fixture(scope="module")
def slides(tmp_path_factory):
    return write_slides(tmp_path_factory.mktemp("slides"), 3)


def _tile(args, *inputs):
    return CliRunner().invoke(main, ["tile", *map(str, inputs), *map(str, args), *TILE])


# ---- the runner's policy ------------------------------------------------------------------------------


def _full_disk_at_i2(item: It) -> Outcome:
    """Writes item.path; the disk is full when i2 is written (module level: workers import it)."""
    if item.id == "i2":
        raise OSError(errno.ENOSPC, "No space left on device", item.path)
    return Outcome.done(item.id, item.path)


@pytest.mark.parametrize("workers", [1, 2])
def test_a_full_disk_stops_the_batch_with_what_finished(tmp_path, workers) -> None:
    items = [It(f"i{k}", str(tmp_path / f"i{k}")) for k in range(4)]
    with pytest.raises(BatchStopped) as stopped:
        run_batch(items, _full_disk_at_i2, outputs=[tmp_path], workers=workers, progress=False)
    summary = stopped.value.summary
    assert f"{tmp_path / 'i2'}: No space left on device" in str(stopped.value)
    assert summary.out == str(tmp_path) and summary.extra["stopped"] == stopped.value.reason
    done = [o.id for o in summary.outcomes]
    assert set(done) <= {"i0", "i1", "i3"} and "i0" in done and "i1" in done
    assert summary.counts["failed"] == 0 and summary.extra["not_processed"] == 4 - len(done)


def test_a_permission_fault_on_the_output_is_the_environment_on_an_input_the_item(tmp_path) -> None:
    def process(item: It) -> Outcome:
        raise PermissionError(errno.EACCES, "Permission denied", item.path)

    inputs = [It("a", "/data/a.svs"), It("b", "/data/b.svs")]
    out = run_batch(inputs, process, outputs=[tmp_path], progress=False)
    assert [o.status for o in out] == ["failed", "failed"]  # unreadable input: that item's fault
    outputs = [It("a", str(tmp_path / "sub" / "a")), It("b", str(tmp_path / "b"))]
    with pytest.raises(BatchStopped, match="Permission denied"):
        run_batch(outputs, process, outputs=[tmp_path], progress=False)


def test_an_environment_fault_raised_by_a_command_stops_the_batch(tmp_path) -> None:
    def process(item: It) -> Outcome:
        raise EnvironmentFault("GPU lost")

    with pytest.raises(BatchStopped, match="GPU lost") as stopped:
        run_batch([It("a"), It("b")], process, progress=False)
    assert stopped.value.summary.outcomes == ()


# ---- the commands -------------------------------------------------------------------------------------


def test_a_symlink_loop_on_the_command_line_fails_only_itself(slides, tmp_path) -> None:
    loop = tmp_path / "loop.svs"
    os.symlink(loop, loop)
    result = _tile(["--out", tmp_path / "s.zarr", "--json"], *slides[:2], loop)
    assert result.exit_code == 1, result.output
    rows = {r["id"]: r for r in json.loads(result.stdout)["outcomes"]}
    assert rows["loop"]["status"] == "failed" and "symbolic link loop" in rows["loop"]["reason"]
    assert [rows[s]["status"] for s in ("s0", "s1")] == ["done", "done"]


def test_dead_links_in_a_folder_are_failed_items_not_skipped(slides, tmp_path) -> None:
    folder = tmp_path / "cohort"
    folder.mkdir()
    os.symlink(slides[0], folder / "s0.svs")
    os.symlink(folder / "loop.svs", folder / "loop.svs")
    os.symlink(tmp_path / "unmounted" / "s7.svs", folder / "s7.svs")  # the archive it points to is gone
    result = _tile(["--out", tmp_path / "s.zarr", "--json"], folder)
    rows = {r["id"]: r for r in json.loads(result.stdout)["outcomes"]}
    assert result.exit_code == 1 and rows["s0"]["status"] == "done"
    assert "symbolic link loop" in rows["loop"]["reason"] and rows["s7"]["reason"] == "file not found"


def test_a_damaged_record_fails_that_slide_only(slides, tmp_path) -> None:
    from pathology.kimianet import random_init_checkpoint

    store = tmp_path / "s.zarr"
    assert _tile(["--out", store, "--save-pixels"], *slides).exit_code == 0
    (store / "slides" / "s1" / "zarr.json").write_text('{"attributes": {"record": {"slide_id": ')
    model = random_init_checkpoint(tmp_path / "m.pt", input_px=32)
    args = ["index", "--tiles", store, "--model", model, "--out", tmp_path / "index", "--device", "cpu"]
    result = CliRunner().invoke(main, [*map(str, args), "--json"])
    assert result.exit_code == 1, result.output
    report = json.loads(result.stdout)
    rows = {r["id"]: r for r in report["outcomes"]}
    assert rows["s1"]["status"] == "failed" and "damaged slide record" in rows["s1"]["reason"]
    assert report["index"]["counts"]["slides"] == 2
    # Tiling again repairs it: the damaged record is tiled anew, the others are kept.
    again = _tile(["--out", store, "--save-pixels", "--json"], *slides)
    assert again.exit_code == 0, again.output
    statuses = {r["id"]: r["status"] for r in json.loads(again.stdout)["outcomes"]}
    assert statuses == {"s0": "skipped", "s1": "done", "s2": "skipped"}
    assert TileStore.open(store).record("s1").status == "done"


def test_a_full_disk_stops_tile_with_one_line_and_the_json_summary(slides, tmp_path) -> None:
    import subprocess
    import sys

    from faults_support import ROOT

    out = tmp_path / "s.zarr"
    cmd = [
        sys.executable,
        "-c",
        DISK_FULL,
        "tile",
        *map(str, slides),
        "--out",
        str(out),
        *TILE,
        "--json",
    ]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 3, result.stderr
    assert "Traceback" not in result.stderr
    report = json.loads(result.stdout)
    assert report["counts"] == {"done": 1, "skipped": 0, "failed": 0} and report["not_processed"] == 2
    assert "No space left on device" in report["stopped"]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "No space left on device" in last and "re-run to resume" in last
    assert TileStore.open(out).slide_ids(None) == ["s0"]  # nothing half-written, no failed record


def test_an_unusable_qc_dir_stops_tile_cleanly(slides, tmp_path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    result = _tile(["--out", tmp_path / "s.zarr", "--qc-dir", blocker / "qc", "--json"], *slides)
    assert result.exit_code == 3, result.output
    report = json.loads(result.stdout)
    assert report["counts"]["done"] == 0 and str(blocker) in report["stopped"]
    assert result.stderr.strip().splitlines()[-1].startswith("error: ")
