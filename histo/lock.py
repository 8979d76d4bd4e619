"""One writer at a time: an advisory lock per tile store, index directory or prediction folder.

`writer_lock(folder, command, shared=False)` holds `folder/.lock` with `flock` for the duration of a
run: exclusively for an unsharded writer, shared for `--shard I/N` runs (shards write different items,
so they run together, but never beside an unsharded writer). A second writer is refused at once with
a `LockedError` naming the holder; nothing waits.

The exclusive holder writes its PID, host, command and start time into the file and empties it on
release. The kernel drops a `flock` when its holder dies (even by `kill -9`), so a record found in a
file whose lock is free is stale: on the same host its holder is gone, the lock is taken and a warning
names the run that ended without releasing it (its half-written items are cleaned or redone by the
command). A record written on another host cannot be checked from here (some shared file systems do
not pass locks between hosts), so it is refused with the file to delete once that run has ended.
A folder the lock created is removed again when the run leaves nothing else in it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import socket
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from histo.errors import HistoError

log = logging.getLogger(__name__)

LOCK = ".lock"


class LockedError(HistoError):
    """Another run is writing into the same folder."""


def _holder(record: dict[str, Any]) -> str:
    """`PID 123 on host-a (histo tile, since 2025-01-01T10:00:00+00:00)`."""
    return (
        f"PID {record.get('pid')} on {record.get('host')} "
        f"({record.get('command')}, since {record.get('started')})"
    )


def _read_record(fd: int) -> dict[str, Any] | None:
    """The holder record in the lock file, None when empty (released) or unreadable."""
    os.lseek(fd, 0, os.SEEK_SET)
    text = os.read(fd, 1 << 16).decode("utf-8", "replace").strip()
    if not text:
        return None
    try:
        record = json.loads(text)
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


def _write_record(fd: int, record: dict[str, Any] | None) -> None:
    """Replace the holder record (written before the file is cut to it, so a reader never sees it empty)."""
    data = b"" if record is None else (json.dumps(record, sort_keys=True) + "\n").encode()
    os.pwrite(fd, data, 0)
    os.ftruncate(fd, len(data))
    os.fsync(fd)


def _refusal(folder: Path, command: str, shared: bool, record: dict[str, Any] | None) -> str:
    if record is None:
        return (
            f"{folder}: another run is writing here (--shard runs, or a run just starting); "
            f"an unsharded {command} can start when they end"
        )
    remedy = (
        "a --shard run can start when it ends"
        if shared
        else "wait for it, or split the work with --shard I/N"
    )
    return f"{folder}: {_holder(record)} is writing here; {remedy}"


@contextlib.contextmanager
def writer_lock(folder: str | os.PathLike, command: str, shared: bool = False) -> Iterator[None]:
    """Hold the writer lock of `folder` (created if absent) while the block runs; LockedError if taken."""
    folder = Path(folder)
    created = not folder.exists()
    path = folder / LOCK
    fd = _locked(folder, path, command, shared)
    try:
        stale = _read_record(fd)
        host = socket.gethostname()
        if stale is not None and stale.get("host") != host:
            raise LockedError(
                f"{folder}: the lock names {_holder(stale)}, which cannot be checked from {host}; "
                f"if that run has ended, delete {path}"
            )
        if stale is not None:
            log.warning("%s: a writer ended without releasing its lock: %s", folder, _holder(stale))
        mine = None if shared else {
            "pid": os.getpid(), "host": host, "command": command,
            "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }  # fmt: skip
        if mine is not None or stale is not None:
            _write_record(fd, mine)
        try:
            yield
        finally:
            if mine is not None:
                _write_record(fd, None)
            if created:
                _remove_if_unused(folder, fd)
    finally:
        os.close(fd)  # releases the flock


def _locked(folder: Path, path: Path, command: str, shared: bool, tries: int = 5) -> int:
    """A descriptor of `path` holding its flock. A lock file removed between our open and our flock (by
    a run that ends and removes the folder it created) is locked in vain: the lock must be on the file the
    path names now, so the open is retried until they are the same file."""
    for _ in range(tries):
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            record = _read_record(fd)
            os.close(fd)
            raise LockedError(_refusal(folder, command, shared, record)) from None
        except OSError as e:
            os.close(fd)
            raise HistoError(f"{path}: cannot take the writer lock ({e.strerror})") from None
        if _same_file(fd, path):
            return fd
        os.close(fd)
    raise HistoError(f"{path}: the lock file keeps being replaced; is another program removing it?")


def _same_file(fd: int, path: Path) -> bool:
    try:
        named, held = os.stat(path), os.fstat(fd)
    except FileNotFoundError:
        return False
    return (named.st_dev, named.st_ino) == (held.st_dev, held.st_ino)


def _remove_if_unused(folder: Path, fd: int) -> None:
    """Remove a folder this lock created when the run left nothing in it but the lock (a run refused
    before any work creates nothing), unless another writer holds the lock too."""
    if [p.name for p in folder.iterdir()] != [LOCK]:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return
    (folder / LOCK).unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        folder.rmdir()
