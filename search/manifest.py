"""The index manifest: what built the index, which files make up its current version, and their sha256.

`manifest.json` is written last, atomically: an index dir without it is incomplete (an interrupted
`histo index`; re-running resumes). Opening checks the format version, then every listed file's size and
sha256, so a truncated or corrupted file is refused with one line naming it.

Versions: every update (search/growth.py) writes its new files under new names (`catalog.000004.json`,
`float.000004.faiss`, ...; search/storage.py) and then replaces the manifest, which names the files of the
version (`version`). Replacing it is the switch: an index opened before holds the previous version in
memory, one opened after sees the whole update, one opening during the switch finds its files gone and
reads the new version again (`SlideIndex.open`), and a writer killed before the switch leaves the previous
version as it was. Files no version names are deleted right after the switch (`collect_garbage`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from histo.errors import HistoError, InputFileError
from histo.io import atomic_write_json, file_sha256, stat_stamp

FORMAT = "histo-slide-index"
VERSION = 2  # 2: versioned parts (catalog.<v>.json, coords/barcodes/float parts, trained indexes)
MANIFEST = "manifest.json"
VERSIONED = re.compile(r"^(catalog|coords|barcodes|float|trained)\.\d{6}\.(json|npy|faissb?)$")


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


def checksums(
    index_dir: Path, entries: list[str], known: Mapping[str, dict[str, Any]] | None = None
) -> dict[str, dict[str, Any]]:
    """{relative path: {"bytes", "sha256"}} of every index file under `entries`. An entry with files in
    `known` (the previous version's checksums, less those of slides whose features were written again or
    relabelled since; versioned files are never rewritten) keeps their records without reading the disk,
    so an update hashes only new files."""
    under: dict[str, list[str]] = {}
    for rel in known or {}:
        parent = rel
        while parent:
            under.setdefault(parent, []).append(rel)
            parent = parent.rpartition("/")[0]
    out = {}
    for entry in entries:
        if entry in under:
            out.update({rel: known[rel] for rel in under[entry]})
            continue
        for rel in list_files(index_dir, [entry]):
            out[rel] = {"bytes": (index_dir / rel).stat().st_size, "sha256": file_sha256(index_dir / rel)}
    return out


def write_manifest(
    index_dir: Path,
    content: dict[str, Any],
    entries: list[str],
    known: Mapping[str, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Add format, version and the checksums of the files under `entries` (`known`: see `checksums`);
    write manifest.json atomically: the switch to the version it describes."""
    manifest = {
        "format": FORMAT,
        "format_version": VERSION,
        **content,
        "files": checksums(index_dir, entries, known),
    }
    atomic_write_json(index_dir / MANIFEST, manifest)
    return manifest


def collect_garbage(index_dir: Path, manifest: Mapping[str, Any]) -> list[str]:
    """Delete the versioned files the manifest does not name and the temporary files of killed writes;
    returns their names. Run under the writer lock only."""
    named = set(manifest["files"])
    gone = []
    for p in sorted(index_dir.iterdir()):
        stale_tmp = p.name.startswith(".") and p.name.endswith(".tmp")
        if p.is_file() and (stale_tmp or (VERSIONED.match(p.name) and p.name not in named)):
            p.unlink()
            gone.append(p.name)
    return gone


Verified = dict[str, tuple[int, int, int, str]]  # file -> size, mtime_ns, inode and sha256 when it verified


def read_manifest(index_dir: Path, verify: str = "full", verified: Verified | None = None) -> dict[str, Any]:
    """Read and verify the manifest. verify: "full" (size + sha256 of every file), "size", or "none".
    `verified`: a reader's record of the files it hashed (`verify_files`), so that reloading after its own
    update hashes only the files the update wrote, not 4 GiB of unchanged features."""
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
            path,
            f"index format version {manifest.get('format_version')} (this code reads {VERSION}); build it "
            "again into a new --out from the same tile store",
        )
    if verify not in ("full", "size", "none"):
        raise HistoError(f"unknown verify mode {verify!r} (full, size, none)")
    if verify != "none":
        verify_files(index_dir, manifest["files"], full=verify == "full", verified=verified)
    return manifest


def verify_files(
    index_dir: Path, files: dict[str, dict[str, Any]], full: bool, verified: Verified | None = None
) -> None:
    """Raise InputFileError for the first missing, resized or (full) altered file. `verified` (full only):
    a file it records with the same size, mtime, inode and expected sha256 is not hashed again (a change in
    place moves its mtime), and every file hashed here is recorded."""
    for rel, meta in files.items():
        p = index_dir / rel
        if not p.is_file():
            raise InputFileError(p, "index file missing")
        st = p.stat()
        size = st.st_size
        if size != meta["bytes"]:
            raise InputFileError(
                p, f"index file truncated or altered ({size} bytes, manifest says {meta['bytes']})"
            )
        stamp = (*stat_stamp(st), meta["sha256"])
        if not full or (verified is not None and verified.get(rel) == stamp):
            continue
        if file_sha256(p) != meta["sha256"]:
            raise InputFileError(p, "index file corrupted (sha256 differs from the manifest)")
        if verified is not None:
            verified[rel] = stamp
