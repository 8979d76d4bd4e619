"""Crash-safe file writing: everything is written to a temporary sibling and renamed into place."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from histo.errors import HistoError


def _new_file(folder: Path, name: str) -> Path:
    """Create an empty, hidden temporary file `.NAME.<random>.tmp` in `folder` with the mode every new
    file gets (0666 less the umask; mkstemp's 0600 would keep colleagues out of an index)."""
    while True:
        tmp = folder / f".{name}.{uuid.uuid4().hex[:12]}.tmp"
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except FileExistsError:
            continue
        return tmp


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success rename it over `path`, on failure delete it.
    The file follows the umask like any other new file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = _new_file(path.parent, path.name)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write bytes so that a reader sees the old file or the whole new one, never a partial file."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Atomic text write (UTF-8)."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """Atomic JSON write, pretty-printed with sorted keys so files diff cleanly."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """`torch.save` through a temporary file, so a kill mid-save never leaves a truncated checkpoint."""
    import torch

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def stat_stamp(st: os.stat_result) -> tuple[int, int, int]:
    """Size, mtime (ns) and inode of a file: what tells it unchanged without reading it (rsync's quick check;
    a write in place moves the mtime, a replacement the inode)."""
    return st.st_size, st.st_mtime_ns, st.st_ino


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 hex digest of a file, read in 1 MiB chunks (identifies checkpoints and index files)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def check_run_settings(
    out: str | os.PathLike, settings: Mapping[str, Any], remedy: str = "use a new --out"
) -> bool:
    """Record `settings` in out/settings.json, or check an earlier run there used the same ones.

    Returns True when `out` holds an earlier run to resume; a run of other settings is refused with a
    HistoError naming the settings that differ, so results of two configurations are never mixed.
    """
    out = Path(out)
    settings = json.loads(json.dumps(settings, default=str))
    path = out / "settings.json"
    if not path.exists():
        atomic_write_json(path, settings)
        return False
    previous = json.loads(path.read_text())
    if previous != settings:
        differ = sorted(k for k in set(settings) | set(previous) if previous.get(k) != settings.get(k))
        raise HistoError(f"{out}: holds results of other settings ({', '.join(differ)}); {remedy}")
    return True
