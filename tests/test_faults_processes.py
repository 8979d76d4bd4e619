"""Issue 20, item 9: worker processes end with their killed parent, and atomically written files
follow the umask like any other file (an index is readable by a colleague)."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time

import pytest
from faults_support import ROOT

from histo.io import atomic_path, atomic_torch_save, atomic_write_json, atomic_write_text

# The parent: runs two sleepy items in two spawned workers (their PIDs land in the item paths).
PARENT = """
import sys
sys.path.insert(0, sys.argv[2])
from faults_support import Job, sleepy
from histo.batch import run_batch

if __name__ == "__main__":
    run_batch([Job(f"w{k}", f"{sys.argv[1]}/w{k}.pid") for k in range(2)], sleepy, workers=2, progress=False)
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie has ended; it only waits for its parent's reaper
        return f.read().rsplit(")", 1)[1].split()[0] != "Z"


def test_workers_end_when_their_parent_is_killed(tmp_path) -> None:
    parent = subprocess.Popen([sys.executable, "-c", PARENT, str(tmp_path), str(ROOT / "tests")], cwd=ROOT)
    try:
        deadline = time.monotonic() + 120
        while len(list(tmp_path.glob("*.pid"))) < 2 or not all(p.read_text() for p in tmp_path.glob("*.pid")):
            assert parent.poll() is None and time.monotonic() < deadline, "the workers never started"
            time.sleep(0.1)
        workers = [int(p.read_text()) for p in tmp_path.glob("*.pid")]
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        deadline = time.monotonic() + 15
        while any(_alive(pid) for pid in workers) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(_alive(pid) for pid in workers), "workers outlived their killed parent"
    finally:
        for pid in [int(p.read_text()) for p in tmp_path.glob("*.pid") if p.read_text()]:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_atomic_files_follow_the_umask(tmp_path, umask) -> None:
    old = os.umask(umask)
    try:
        atomic_write_json(tmp_path / "manifest.json", {"a": 1})
        atomic_write_text(tmp_path / "notes.txt", "x")
        atomic_torch_save({"w": 1}, tmp_path / "model.pt")
        with atomic_path(tmp_path / "index.faiss") as tmp:
            tmp.write_bytes(b"index")
        (tmp_path / "plain.txt").write_text("an ordinary file")
    finally:
        os.umask(old)
    expected = 0o666 & ~umask
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in tmp_path.iterdir()}
    assert modes == dict.fromkeys(
        ["manifest.json", "notes.txt", "model.pt", "index.faiss", "plain.txt"], expected
    )
    assert json.loads((tmp_path / "manifest.json").read_text()) == {"a": 1}


def test_an_atomic_write_that_fails_leaves_nothing(tmp_path) -> None:
    with pytest.raises(RuntimeError), atomic_path(tmp_path / "x.json") as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed mid-write")
    assert list(tmp_path.iterdir()) == []


def test_a_colleague_can_read_a_manifest_written_under_umask_022() -> None:
    from faults_support import as_nobody, shared_tmp

    folder = shared_tmp()
    old = os.umask(0o022)
    try:
        atomic_write_json(folder / "manifest.json", {"format": "histo-slide-index"})
    finally:
        os.umask(old)
    assert stat.S_IMODE((folder / "manifest.json").stat().st_mode) & (stat.S_IRGRP | stat.S_IROTH)
    if os.geteuid() == 0:  # the tests run as root: read it back as another user, as a colleague would
        result = subprocess.run(
            ["cat", str(folder / "manifest.json")], capture_output=True, text=True, preexec_fn=as_nobody
        )
        assert result.returncode == 0 and "histo-slide-index" in result.stdout, result.stderr
