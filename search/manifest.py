"""The index manifest: what built the index and the sha256 of every file, verified on open.

`manifest.json` is written last, atomically: an index dir without it is incomplete (an interrupted
`histo index`; re-running resumes). Opening checks the format version, then every listed file's size and
sha256, so a truncated or corrupted file is refused with one line naming it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from histo.errors import HistoError, InputFileError
from histo.io import atomic_write_json, file_sha256

FORMAT = "histo-slide-index"
VERSION = 1
MANIFEST = "manifest.json"


def list_files(index_dir: Path, entries: list[str]) -> list[str]:
    """Relative paths of the files under the top-level `entries` (files or folders; hidden parts skipped),
    so outputs written beside the index (evaluation reports) are not part of it."""
    out = []
    for entry in entries:
        top = index_dir / entry
        for p in sorted(top.rglob("*")) if top.is_dir() else [top] if top.is_file() else []:
            rel = p.relative_to(index_dir).as_posix()
            if p.is_file() and not any(part.startswith(".") for part in Path(rel).parts):
                out.append(rel)
    return out


def checksums(index_dir: Path, entries: list[str]) -> dict[str, dict[str, Any]]:
    """{relative path: {"bytes", "sha256"}} of every index file."""
    return {rel: {"bytes": (index_dir / rel).stat().st_size, "sha256": file_sha256(index_dir / rel)}
            for rel in list_files(index_dir, entries)}  # fmt: skip


def write_manifest(index_dir: Path, content: dict[str, Any], entries: list[str]) -> dict[str, Any]:
    """Add format, version and the checksums of the files under `entries`; write manifest.json atomically."""
    manifest = {
        "format": FORMAT,
        "format_version": VERSION,
        **content,
        "files": checksums(index_dir, entries),
    }
    atomic_write_json(index_dir / MANIFEST, manifest)
    return manifest


def read_manifest(index_dir: Path, verify: str = "full") -> dict[str, Any]:
    """Read and verify the manifest. verify: "full" (size + sha256 of every file), "size", or "none"."""
    path = index_dir / MANIFEST
    if not index_dir.is_dir():
        raise InputFileError(index_dir, "no such index directory")
    if not path.exists():
        raise InputFileError(
            index_dir, "not a complete index (no manifest.json; re-run `histo index` to finish it)"
        )
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError):
        raise InputFileError(path, "unreadable or truncated manifest (not valid JSON)") from None
    if manifest.get("format") != FORMAT:
        raise InputFileError(path, f"not a slide index manifest (format {manifest.get('format')!r})")
    if manifest.get("format_version") != VERSION:
        raise InputFileError(
            path, f"index format version {manifest.get('format_version')} (this code reads {VERSION})"
        )
    if verify not in ("full", "size", "none"):
        raise HistoError(f"unknown verify mode {verify!r} (full, size, none)")
    if verify != "none":
        verify_files(index_dir, manifest["files"], full=verify == "full")
    return manifest


def verify_files(index_dir: Path, files: dict[str, dict[str, Any]], full: bool) -> None:
    """Raise InputFileError for the first missing, resized or (full) altered file."""
    for rel, meta in files.items():
        p = index_dir / rel
        if not p.is_file():
            raise InputFileError(p, "index file missing")
        size = p.stat().st_size
        if size != meta["bytes"]:
            raise InputFileError(
                p, f"index file truncated or altered ({size} bytes, manifest says {meta['bytes']})"
            )
        if full and file_sha256(p) != meta["sha256"]:
            raise InputFileError(p, "index file corrupted (sha256 differs from the manifest)")
