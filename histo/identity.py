"""Which source file an output came from: path, size and a cheap content fingerprint, recorded with each
output so a later run can tell a different file under the same ID from the same file, moved or not.

The fingerprint is the sha256 of the size and of the first and last 64 KiB of the file: it reads 128 KiB
whatever the file's size (a whole-slide image is gigabytes), and any two files that differ in size, in
their header (TIFF directory, NIfTI header) or in their last block differ in it. Outputs written before
identities were recorded have none: their identity is "unknown", and only their path is compared.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

FINGERPRINT_BYTES = 1 << 16
FINGERPRINT_DEFINITION = "sha256 of the size (8 bytes little-endian), the first 64 KiB and the last 64 KiB"


def fingerprint(path: str | os.PathLike) -> str:
    """The content fingerprint of a file (FINGERPRINT_DEFINITION), as 32 hex digits."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        h.update(size.to_bytes(8, "little"))
        h.update(f.read(FINGERPRINT_BYTES))
        if size > FINGERPRINT_BYTES:
            f.seek(max(FINGERPRINT_BYTES, size - FINGERPRINT_BYTES))
            h.update(f.read(FINGERPRINT_BYTES))
    return h.hexdigest()[:32]


@dataclass(frozen=True)
class SourceIdentity:
    """A source's real path, size in bytes and fingerprint (None where unknown: an old record)."""

    path: str
    bytes: int | None = None
    fingerprint: str | None = None

    @classmethod
    def of(cls, path: str | os.PathLike) -> SourceIdentity:
        """The identity of a file as it is now."""
        return cls(os.path.realpath(path), os.path.getsize(path), fingerprint(path))

    @classmethod
    def of_files(cls, folder: str | os.PathLike, files: Sequence[str | os.PathLike]) -> SourceIdentity:
        """The identity of a folder of input files (e.g. a BraTS case): their total size and one
        fingerprint over theirs, in the given order."""
        parts = [cls.of(f) for f in files]
        combined = hashlib.sha256("".join(str(p.fingerprint) for p in parts).encode()).hexdigest()[:32]
        return cls(os.path.realpath(folder), sum(int(p.bytes or 0) for p in parts), combined)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> SourceIdentity | None:
        if not d or not d.get("path"):
            return None
        return cls(str(d["path"]), d.get("bytes"), d.get("fingerprint"))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def known(self) -> bool:
        return self.bytes is not None and self.fingerprint is not None

    def describe(self) -> str:
        """`/data/a.svs (123456 bytes, fingerprint 0a1b2c3d4e5f)`, or the path alone when unknown."""
        if not self.known():
            return self.path
        return f"{self.path} ({self.bytes} bytes, fingerprint {str(self.fingerprint)[:12]})"


def source_change(recorded: SourceIdentity, current: SourceIdentity) -> str | None:
    """Why `current` is not the source `recorded` for an ID, or None when it is the same source: the same
    content wherever it lies now, or, with the recorded content unknown, the same path."""
    if recorded.known() and current.known():
        if (recorded.bytes, recorded.fingerprint) == (current.bytes, current.fingerprint):
            return None
        if recorded.path == current.path:
            return f"{current.path} changed since (was {recorded.bytes} bytes, now {current.bytes})"
        return f"it came from {recorded.describe()}, not {current.describe()}"
    if recorded.path == current.path:
        return None
    return f"it came from {recorded.path}, not {current.path}"
