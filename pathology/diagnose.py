"""Why a slide file cannot be used, in words a user can act on: missing, a symbolic-link loop, permission
denied, empty, or truncated (its TIFF directory or its last tile reaches past the end of the file).

Both are asked before a reader sees the file: OpenSlide reads past the end of a truncated TIFF without a
word (the missing tiles come back as whatever libtiff returns), and its own messages ("Unsupported or
missing image file") do not say which fault it met. `describe` adds the truncation to a reader's error.
"""

from __future__ import annotations

import errno
import os
import struct
from pathlib import Path
from typing import BinaryIO

ERRNO_REASONS = {
    errno.ENOENT: "file not found",
    errno.ELOOP: "symbolic link loop (the link points back to itself)",
    errno.EACCES: "permission denied (this user cannot read the file)",
    errno.EPERM: "permission denied (this user cannot read the file)",
    errno.ENOTDIR: "file not found (a folder in its path is a file)",
}
# TIFF tags whose values are the byte offsets and counts of the image data (strips or tiles).
DATA_TAGS = {273: "offsets", 279: "counts", 324: "offsets", 325: "counts"}
TYPE_SIZES = {3: ("H", 2), 4: ("I", 4), 16: ("Q", 8)}  # SHORT, LONG, LONG8: the data tags' types
# Bytes per value of every TIFF field type (BYTE, ASCII, SHORT, LONG, RATIONAL, ..., IFD8).
TYPE_BYTES = {
    1: 1,
    2: 1,
    3: 2,
    4: 4,
    5: 8,
    6: 1,
    7: 1,
    8: 2,
    9: 4,
    10: 8,
    11: 4,
    12: 8,
    13: 4,
    16: 8,
    17: 8,
    18: 8,
}


def os_reason(e: OSError) -> str:
    """A file-system error in words: file not found, symbolic link loop, permission denied, ..."""
    return ERRNO_REASONS.get(e.errno, e.strerror or type(e).__name__)


def access_problem(path: Path) -> str | None:
    """Why `path` cannot be read at all (missing, a link loop, permission denied, empty), or None."""
    try:
        size = path.stat().st_size
        if path.is_file():
            with open(path, "rb") as f:
                f.read(1)
    except OSError as e:
        return os_reason(e)
    return "empty file (0 bytes)" if path.is_file() and size == 0 else None


def truncation_problem(path: Path) -> str | None:
    """'truncated: ...' when a TIFF-based file (SVS, NDPI, generic TIFF, ...) is shorter than its own
    directory says, else None (also for other formats and for unreadable files)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            needed = _tiff_extent(f, size)
    except (OSError, struct.error):
        return None
    if needed is None or needed <= size:
        return None
    return f"truncated: the file is {size} bytes but its TIFF directory refers to byte {needed}"


def _tiff_extent(f: BinaryIO, size: int) -> int | None:
    """The end of the last byte the TIFF structure refers to (directories and image data), walking the
    directory chain until it leaves the file; None when `f` is not a TIFF."""
    head = f.read(16)
    order = {b"II": "<", b"MM": ">"}.get(head[:2])
    if order is None or len(head) < 8:
        return None
    magic = struct.unpack(order + "H", head[2:4])[0]
    if magic == 42:
        word, count_fmt, entry_size, first = "I", "H", 12, struct.unpack(order + "I", head[4:8])[0]
    elif magic == 43 and len(head) == 16:
        word, count_fmt, entry_size, first = "Q", "Q", 20, struct.unpack(order + "Q", head[8:16])[0]
    else:
        return None
    word_size, count_size = struct.calcsize(word), struct.calcsize(count_fmt)
    needed, offset, seen = 0, first, set()
    while offset and offset not in seen:
        seen.add(offset)
        if offset + count_size > size:
            return offset + count_size
        f.seek(offset)
        n = struct.unpack(order + count_fmt, f.read(count_size))[0]
        end = offset + count_size + n * entry_size + word_size
        if end > size:
            return end
        entries = f.read(n * entry_size)
        data: dict[str, list[int]] = {}
        for k in range(n):
            entry = entries[k * entry_size : (k + 1) * entry_size]
            tag, kind = struct.unpack(order + "HH", entry[:4])
            count = struct.unpack(order + word, entry[4 : 4 + word_size])[0]
            raw = entry[4 + word_size :]
            length = count * TYPE_BYTES.get(kind, 1)
            if length > word_size:  # the value lies elsewhere in the file
                at = struct.unpack(order + word, raw)[0]
                if at + length > size:
                    return at + length
            if tag not in DATA_TAGS or kind not in TYPE_SIZES:
                continue
            fmt, item = TYPE_SIZES[kind]
            if length > word_size:
                f.seek(at)
                raw = f.read(length)
            data.setdefault(DATA_TAGS[tag], []).extend(
                struct.unpack(f"{order}{count}{fmt}", raw[: count * item])
            )
        if data.get("offsets") and len(data["offsets"]) == len(data.get("counts", [])):
            needed = max(needed, *(o + c for o, c in zip(data["offsets"], data["counts"], strict=True)))
        f.seek(end - word_size)
        offset = struct.unpack(order + word, f.read(word_size))[0]
    return needed


def describe(path: str | os.PathLike, fallback: str) -> str:
    """The reason a slide file failed: truncation when the file shows it, else `fallback`."""
    return truncation_problem(Path(path)) or fallback
