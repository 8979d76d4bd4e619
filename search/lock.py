"""One writer per index directory: an advisory `flock` on INDEX/.lock, held while an update runs.

A second writer (another `histo index` on the same --out, an `add` from Python) is refused at once with a
one-line `IndexLockedError` naming the holder; nothing waits. The kernel drops the lock when its holder
dies (even by `kill -9`), so a killed writer never blocks the next one. Readers take no lock: they see a
consistent version through the manifest (search/manifest.py). The lock is re-entrant within a process, so
`SlideIndex.add` can hold it across the feature extraction and the update it triggers.

This is the index's only lock; `writer_lock` is its one entry point (the same `.lock` file and `flock` as a
project-wide writer lock would use, so the two exclude each other).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

from histo.errors import HistoError

LOCK = ".lock"
_held: dict[Path, int] = {}  # index dirs this process holds -> nesting depth


class IndexLockedError(HistoError):
    """Another writer is updating the index directory."""


@contextlib.contextmanager
def writer_lock(index_dir: str | os.PathLike, command: str) -> Iterator[bool]:
    """Hold the index's writer lock while the block runs; IndexLockedError if another process holds it.
    Yields True for the outermost holder in this process (False when nested in another write)."""
    folder = Path(index_dir).resolve()
    if folder in _held:
        _held[folder] += 1
        try:
            yield False
        finally:
            _held[folder] -= 1
        return
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / LOCK, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise IndexLockedError(
                f"{index_dir}: {_holder(fd)} is updating this index; wait for it to end"
            ) from None
        record = {"pid": os.getpid(), "host": socket.gethostname(), "command": command,
                  "started": datetime.now(timezone.utc).isoformat(timespec="seconds")}  # fmt: skip
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode(), 0)
        _held[folder] = 1
        try:
            yield True
        finally:
            del _held[folder]
            os.ftruncate(fd, 0)
    finally:
        os.close(fd)  # releases the flock


def _holder(fd: int) -> str:
    """`PID 123 on host-a (histo index --remove, since 2025-01-01T10:00:00+00:00)`, from the lock file."""
    try:
        r = json.loads(os.pread(fd, 1 << 16, 0).decode() or "{}")
    except ValueError:
        r = {}
    if not r:
        return "another writer"
    return f"PID {r.get('pid')} on {r.get('host')} ({r.get('command')}, since {r.get('started')})"
