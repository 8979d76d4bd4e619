"""Issue 20, item 5: one writer at a time per tile store and index; --shard runs stay concurrent."""

from __future__ import annotations

import json
import logging
import os
import socket

import pytest
from click.testing import CliRunner
from faults_support import TILE, paused_run, write_slides

from histo.cli import main
from histo.lock import LOCK, LockedError, writer_lock
from pathology.store import PARTIAL, TileStore


@pytest.fixture(scope="module")
def slides(tmp_path_factory):
    return write_slides(tmp_path_factory.mktemp("slides"), 3)


def _tile(slides, out, *extra):
    return CliRunner().invoke(main, ["tile", *map(str, slides), "--out", str(out), *TILE, *extra])


def test_a_second_unsharded_tile_run_is_refused_in_one_line(slides, tmp_path):
    out = tmp_path / "s.zarr"
    args = ["tile", *map(str, slides), "--out", str(out), *TILE]
    with paused_run(tmp_path / "gate", "pathology.tiler.tile_slide", args) as first:
        second = _tile(slides, out)
        assert second.exit_code == 2, second.output
        lines = second.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"error: {out}: PID {first.pid} on ")
        assert "histo tile" in lines[0] and "--shard" in lines[0]
    assert first.returncode == 0, first.stderr
    store = TileStore.open(out)
    assert store.slide_ids() == ["s0", "s1", "s2"] and not any((out / PARTIAL).iterdir())
    assert (out / LOCK).read_text() == ""  # released: the next writer finds no holder
    again = _tile(slides, out, "--json")
    assert again.exit_code == 0 and json.loads(again.stdout)["counts"]["skipped"] == 3


def test_shard_runs_run_together_but_never_beside_an_unsharded_one(slides, tmp_path):
    out = tmp_path / "s.zarr"
    assert _tile(slides[:1], out).exit_code == 0
    with writer_lock(out, "histo tile", shared=True):  # a running --shard 0/2
        other_shard = _tile(slides, out, "--shard", "1/2")
        assert other_shard.exit_code == 0, other_shard.output
        unsharded = _tile(slides, out)
        assert unsharded.exit_code == 2
        assert "another run is writing here (--shard runs, or a run just starting)" in unsharded.stderr
    with writer_lock(out, "histo tile"):
        shard = _tile(slides, out, "--shard", "0/2")
        assert shard.exit_code == 2 and "a --shard run can start when it ends" in shard.stderr
    assert TileStore.open(out).slide_ids() == ["s0", "s1"]


def test_a_stale_lock_is_detected_taken_and_named(slides, tmp_path, caplog):
    out = tmp_path / "s.zarr"
    assert _tile(slides[:1], out).exit_code == 0
    dead = {"pid": 2**22 + 17, "host": socket.gethostname(), "command": "histo tile", "started": "then"}
    (out / LOCK).write_text(json.dumps(dead))  # its holder was killed: the file stays, its flock went
    with caplog.at_level(logging.WARNING, logger="histo.lock"):
        result = _tile(slides[:2], out)
    assert result.exit_code == 0, result.output
    assert f"ended without releasing its lock: PID {dead['pid']} on {dead['host']}" in caplog.text
    assert (out / LOCK).read_text() == ""


def test_a_lock_of_another_host_is_refused_with_the_file_to_delete(tmp_path):
    (tmp_path / LOCK).write_text(json.dumps({"pid": 5, "host": "node-07", "command": "histo index"}))
    with (
        pytest.raises(
            LockedError, match=f"cannot be checked from .*; if that run has ended, delete {tmp_path / LOCK}"
        ),
        writer_lock(tmp_path, "histo index"),
    ):
        pass


def test_the_holder_record_names_pid_host_and_command(tmp_path):
    with writer_lock(tmp_path, "histo index"):
        record = json.loads((tmp_path / LOCK).read_text())
        assert (record["pid"], record["host"], record["command"]) == (
            os.getpid(),
            socket.gethostname(),
            "histo index",
        )
        with pytest.raises(LockedError, match=f"PID {os.getpid()} on "), writer_lock(tmp_path, "histo index"):
            pass


def test_a_second_unsharded_index_run_is_refused(tile_store, tmp_path):
    from pathology.kimianet import random_init_checkpoint

    model = random_init_checkpoint(tmp_path / "m.pt", input_px=32)
    out = tmp_path / "index"
    args = ["index", "--tiles", str(tile_store), "--model", str(model), "--out", str(out), "--device", "cpu"]
    with paused_run(tmp_path / "gate", "search.features.extract_features", args) as first:
        second = CliRunner().invoke(main, args)
        assert second.exit_code == 2, second.output
        assert f"error: {out}: PID {first.pid} on " in second.stderr and "histo index" in second.stderr
    assert first.returncode == 0, first.stderr


def test_a_lock_file_removed_before_it_is_locked_is_not_held_in_vain(tmp_path, monkeypatch):
    """A run ending removes the folder it created (and its .lock) while another run has opened .lock but
    not yet locked it: that run must lock the file the path names now, or a third writer would run beside it."""
    import fcntl

    import histo.lock as lock

    out = tmp_path / "index"
    real_flock, calls = fcntl.flock, []

    def flock_after_removal(fd, op):
        calls.append(op)
        if len(calls) == 1:  # the ending run's cleanup wins the race: .lock and its folder are gone
            (out / LOCK).unlink()
            out.rmdir()
        return real_flock(fd, op)

    out.mkdir()
    monkeypatch.setattr(lock.fcntl, "flock", flock_after_removal)
    with writer_lock(out, "histo index"):
        monkeypatch.setattr(lock.fcntl, "flock", real_flock)
        with pytest.raises(LockedError, match="is writing here"), writer_lock(out, "histo index"):
            pass
    assert len(calls) == 2  # locked once in vain, then the file the path names


def test_a_folder_the_lock_created_is_removed_when_the_run_leaves_nothing(tmp_path):
    with writer_lock(tmp_path / "new", "histo index"):
        assert (tmp_path / "new" / LOCK).exists()
    assert not (tmp_path / "new").exists()
    with writer_lock(tmp_path / "kept", "histo index"):
        (tmp_path / "kept" / "manifest.json").write_text("{}")
    assert (tmp_path / "kept" / LOCK).exists()
