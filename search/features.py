"""Features of every selected tile of a tile store, in a zarr group inside the index dir.

Layout::

    INDEX/features.zarr/zarr.json        root; attributes: format, version, model (hash, feature
                                         definition, dim), tiling (the tile store's parameters)
    INDEX/features.zarr/slides/<id>/     per slide: attributes record (slide_id, label, patient, site,
                                         n_tiles, source store, the store record's tiles_digest);
                                         arrays features (n, D) float32, coords (n, 2) int64 level-0
                                         x, y of the selected tiles (each chunk with a crc32c);
                                         .stamp.json: size, mtime and inode of each array file
    INDEX/features.zarr/.partial/        slides being written (renamed into slides/ when complete)

Extraction is resumable per slide (a slide's group appears only when complete) and shardable
(`shard=(i, n)` takes every n-th slide of the sorted list, starting at i), through `histo.batch`.

The quick check (rsync's): a re-run decides that a stored slide is done from its record alone when the
array files its stamp lists still have the size, mtime and inode recorded when it was written (or last
verified), so adding 100 slides to 10,000 reads no stored features. A slide whose files differ from their
stamp, or without one (written before stamps), is decoded, every chunk's crc32c verified, and stamped
anew; `verify="full"` (`histo index --verify`) decodes every slide. A chunk changed in place with its size
and mtime put back (bit rot below the file system, a tool restoring times; a rewrite within the file
system's timestamp granularity of the original write) passes the quick check: `--verify`, any read of that
slide's features (`--retrain`, an IVF-PQ index opening) or a rebuild finds it. The stamp is hidden, so it
is no file of the index's manifest (search/manifest.py).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import zarr

from histo.batch import BatchSummary, Outcome, run_batch
from histo.errors import HistoError, InputFileError
from histo.io import atomic_write_json, stat_stamp
from pathology.store import CHUNK_CODECS, DAMAGED, METADATA, decoded

log = logging.getLogger(__name__)

FORMAT = "histo-features"
VERSION = 1
FEATURES_DIR = "features.zarr"
SLIDES = "slides"
PARTIAL = ".partial"
ARRAYS = ("features", "coords")
STAMP = ".stamp.json"  # hidden: not one of the files the index manifest checksums
Verify = Literal["quick", "full"]


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=str))


def model_info(extractor: Any) -> dict[str, Any]:
    """What identifies the feature extractor: weights hash, feature definition and dimension, and the
    weight file of a registry encoder (None for a histo checkpoint, which the index copies)."""
    return _jsonable(
        {
            "hash": extractor.model_hash,
            "feature_definition": extractor.feature_definition,
            "feature_dim": int(extractor.feature_dim),
            "weights": extractor.weights,
        }
    )


def open_features(index_dir: str | Path, model: dict[str, Any], tiling: dict[str, Any]) -> Path:
    """Create (atomically) or reopen the features group; refuse one made by another model or tiling."""
    root = Path(index_dir) / FEATURES_DIR
    if not (root / "zarr.json").exists():
        root.parent.mkdir(parents=True, exist_ok=True)
        tmp = root.parent / f".{FEATURES_DIR}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        group = zarr.open_group(tmp, mode="w")
        group.attrs.update(
            _jsonable({"format": FORMAT, "version": VERSION, "model": model, "tiling": tiling})
        )
        group.create_group(SLIDES)
        try:
            os.rename(tmp, root)  # another shard may have created it first: then use theirs
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
    attrs = read_attrs(root)
    if attrs["model"]["hash"] != model["hash"]:
        raise HistoError(
            f"{root}: features were extracted with model {attrs['model']['hash'][:12]}, not "
            f"{model['hash'][:12]}; use another --out or the same model"
        )
    if attrs["model"]["feature_definition"] != model["feature_definition"]:
        old, new = attrs["model"]["feature_definition"], model["feature_definition"]
        differ = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
        raise HistoError(
            f"{root}: features were extracted under another feature definition (differs in "
            f"{', '.join(differ)}); use another --out or the same encoder settings"
        )
    if attrs["tiling"] != _jsonable(tiling):
        raise HistoError(f"{root}: features were extracted from tiles with other tiling parameters")
    return root


def read_attrs(root: Path) -> dict[str, Any]:
    """Root attributes of a features group, checked for format and version."""
    try:
        attrs = json.loads((root / "zarr.json").read_text())["attributes"]
    except (OSError, ValueError, KeyError):
        raise InputFileError(root, "not a features group (no readable zarr.json)") from None
    if attrs.get("format") != FORMAT or attrs.get("version") != VERSION:
        raise InputFileError(root, f"not a {FORMAT} v{VERSION} group")
    return attrs


def done_slides(root: Path) -> list[str]:
    """Sorted IDs of the slides whose features are complete."""
    slides = root / SLIDES
    return sorted(d.name for d in slides.iterdir() if (d / "zarr.json").exists()) if slides.exists() else []


def _tmp(root: Path, slide_id: str) -> Path:
    return root / PARTIAL / f"{slide_id}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def write_slide(root: Path, record: dict[str, Any], features: np.ndarray, coords: np.ndarray) -> None:
    """Write one slide under .partial/ and rename it into slides/ (so it appears only when complete),
    replacing an older version of it; every chunk carries a crc32c checksum (pathology.store)."""
    (root / PARTIAL).mkdir(exist_ok=True)
    tmp, final = _tmp(root, record["slide_id"]), root / SLIDES / record["slide_id"]
    group = zarr.open_group(tmp, mode="w")
    group.attrs["record"] = _jsonable(record)
    for name, data in zip(
        ARRAYS,
        (np.ascontiguousarray(features, np.float32), np.ascontiguousarray(coords, np.int64)),
        strict=True,
    ):
        group.create_array(name, data=data, chunks=data.shape, compressors=CHUNK_CODECS)
    _write_stamp(tmp, _stamp_of(tmp))  # times and inodes survive the rename
    old = None
    if final.exists():
        old = _tmp(root, record["slide_id"])
        os.rename(final, old)
    os.rename(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def read_slide(root: Path, slide_id: str) -> tuple[dict[str, Any], np.ndarray, np.ndarray]:
    """(record, features (n, D) float32, coords (n, 2) int64) of one slide; InputFileError naming it
    when its metadata is unreadable or a chunk is damaged."""
    where = root / SLIDES / slide_id
    try:
        group = zarr.open_group(where, mode="r")
        record, arrays = dict(group.attrs["record"]), [group[name] for name in ARRAYS]
    except Exception as e:  # zarr raises many types for damaged metadata
        raise InputFileError(where, f"unreadable features ({type(e).__name__})") from None
    features, coords = (decoded(where / n, lambda a=a: a[...]) for n, a in zip(ARRAYS, arrays, strict=True))
    return record, features, coords


def read_record(root: Path, slide_id: str) -> dict[str, Any] | None:
    """A slide's features record (its zarr.json only, no arrays); None when unreadable."""
    try:
        return dict(json.loads((root / SLIDES / slide_id / "zarr.json").read_text())["attributes"]["record"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _stamp_of(where: Path) -> dict[str, list[int]]:
    """{array file of a slide (relative path): [bytes, mtime_ns, inode]}: what the quick check compares."""
    files = (p for name in ARRAYS for p in sorted((where / name).rglob("*")) if p.is_file())
    return {p.relative_to(where).as_posix(): list(stat_stamp(p.stat())) for p in files}


def _write_stamp(where: Path, files: dict[str, list[int]]) -> None:
    atomic_write_json(where / STAMP, {"files": files})


def _read_stamp(where: Path) -> dict[str, list[int]] | None:
    """A slide's stamp; None when it has none (written before stamps) or it is unreadable."""
    try:
        files = json.loads((where / STAMP).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return files if isinstance(files, dict) else None


def stamp_matches(root: Path, slide_id: str) -> bool:
    """True when a stored slide has a stamp and every file it lists still has its size, mtime and inode
    (the quick check: nothing decoded, no folder walked)."""
    where = root / SLIDES / slide_id
    stamp = _read_stamp(where)
    if not stamp or not all(any(rel.startswith(f"{name}/") for rel in stamp) for name in ARRAYS):
        return False  # none, or one that lists no file of an array: nothing it vouches for
    for rel, recorded in stamp.items():
        try:
            st = os.stat(where / rel)
        except OSError:
            return False
        if list(stat_stamp(st)) != recorded:
            return False
    return True


def verified_record(root: Path, slide_id: str, verify: Verify = "quick") -> dict[str, Any]:
    """The record of a stored slide whose features are sound. Quick: from its zarr.json alone when its
    stamp matches (`stamp_matches`); otherwise (and always for "full") after decoding its arrays (every
    chunk's crc32c verified) and checking that no stamped file is gone, then stamped anew when the stamp
    differs. InputFileError naming the slide (or its file) when it is damaged."""
    if verify == "quick" and stamp_matches(root, slide_id):
        record = read_record(root, slide_id)
        if record is not None:
            return record
    where = root / SLIDES / slide_id
    stamp, now = _read_stamp(where), _stamp_of(where)  # before decoding: a change during it shows next time
    gone = sorted(set(stamp or ()) - set(now))
    if gone:
        raise InputFileError(where / gone[0], "damaged data: a chunk file written with the slide is missing")
    record = read_slide(root, slide_id)[0]
    if stamp != now:
        _write_stamp(where, now)
    return record


def update_record(root: Path, slide_id: str, changes: dict[str, Any]) -> None:
    """Change fields of a slide's features record (labels, patient, site) without rewriting its arrays."""
    meta = root / SLIDES / slide_id / "zarr.json"
    doc = json.loads(meta.read_text())
    doc["attributes"]["record"] = _jsonable({**doc["attributes"]["record"], **changes})
    atomic_write_json(meta, doc)


def remove_slides(root: Path, slide_ids: list[str]) -> list[str]:
    """Delete slides' features (renamed away first, so a kill never leaves half a slide); returns unknown IDs."""
    missing = []
    for sid in slide_ids:
        src = root / SLIDES / sid
        if not (src / "zarr.json").exists():
            missing.append(sid)
            continue
        dead = root / PARTIAL / f"{sid}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        dead.parent.mkdir(exist_ok=True)
        os.rename(src, dead)
        shutil.rmtree(dead)
    return missing


@dataclass(frozen=True)
class _Slide:
    """One done slide of the tile store (an item of `histo.batch.run_batch`): its ID and source file."""

    id: str
    path: str | None


def extract_features(
    store: Any,
    extractor: Any,
    index_dir: str | Path,
    shard: tuple[int, int],
    batch_size: int,
    progress: bool = True,
    verify: Verify = "quick",
) -> BatchSummary:
    """Extract the features of every done slide of `store` in this shard that is not extracted yet.

    Slides already extracted are skipped, unless the store's record changed since: new labels,
    patient or site are copied into the features record without extracting again (done, detail
    `updated`: {field: [old, new]}); a slide tiled anew (another `tiles_digest`) or whose stored
    features are damaged is extracted again; `verify` says how stored features are checked
    (`verified_record`: "quick" decodes only the slides whose files changed since their stamp, "full"
    every one). A slide that fails (tiles unreadable or damaged, no selected tile, a damaged store
    record) is recorded with its reason and the rest goes on. A store without a done slide is a
    HistoError, raised before anything is created. Returns the BatchSummary (done detail: n_tiles).
    """
    slide_ids = store.slide_ids()
    damaged = store.slide_ids(DAMAGED)  # listed so that each fails with its reason
    if not slide_ids:
        raise HistoError(f"{store.path}: no tiled slide (status done) in the store; nothing to index")
    root = open_features(index_dir, model_info(extractor), store.params)
    existing = set(done_slides(root))

    checked: dict[str, dict[str, list] | None] = {}  # is_done's answer, reused by extract

    def changes_of(item: _Slide) -> dict[str, list] | None:
        """{field: [indexed, stored]} of an extracted slide whose features still fit its tiles ({}
        when nothing changed); None when it is to be extracted. Each slide is checked once per run."""
        if item.id not in checked:
            checked[item.id] = _changes(item)
        return checked[item.id]

    def _changes(item: _Slide) -> dict[str, list] | None:
        if item.id not in existing or item.path is None:
            return None
        try:
            indexed = verified_record(root, item.id, verify)
        except InputFileError as e:
            log.warning("%s; extracting it again", e)
            return None
        rec = store.record(item.id)
        if (
            None not in (indexed.get("tiles_digest"), rec.tiles_digest)
            and indexed["tiles_digest"] != rec.tiles_digest
        ):
            return None
        return {k: [indexed.get(k), getattr(rec, k)] for k in METADATA if indexed.get(k) != getattr(rec, k)}

    def extract(item: _Slide) -> Outcome:
        changes = changes_of(item)
        if changes:
            update_record(root, item.id, {key: new for key, (_, new) in changes.items()})
            n_tiles = read_record(root, item.id)["n_tiles"]
            return Outcome.done(item.id, item.path, n_tiles=n_tiles, updated=changes)
        rec = store.record(item.id)
        coords = store.coords(item.id)[store.selected(item.id)]
        if len(coords) == 0:
            return Outcome.failed(item.id, item.path, "no selected tiles")
        feats = extractor.extract_store(store, item.id, batch_size=batch_size)
        record = {
            "slide_id": item.id,
            "label": rec.label,
            "patient": rec.patient,
            "site": rec.site,
            "project": rec.project,
            "n_tiles": len(coords),
            "tile_size_level0": rec.tile_size_level0,
            "store": str(Path(store.path).resolve()),
            "tiles_digest": rec.tiles_digest,
        }
        write_slide(root, record, feats, coords)
        return Outcome.done(item.id, item.path, n_tiles=len(coords))

    items = [_Slide(sid, store.record(sid).source_path) for sid in slide_ids]
    items = sorted(items + [_Slide(sid, None) for sid in damaged], key=lambda item: item.id)
    outcomes = run_batch(
        items, extract, shard=shard, is_done=lambda item: {} if changes_of(item) == {} else None,
        desc="features", unit="slide", progress=progress, outputs=(index_dir,),
    )  # fmt: skip
    return BatchSummary(tuple(outcomes), out=str(index_dir), shard=shard)
