"""Every change to an index dir as a new version: a fresh build, an add, a removal, a compaction, a retrain.

- `build_version`: every structure built from the stored features of the given slides (training and
  calibration included): `histo index` on a new --out, and `--retrain`.
- `add_extracted`: the slides whose features are stored but not indexed join the trained structures
  without retraining: one new part per structure holding only their rows (search/storage.py; a kind that
  cannot merge parts rewrites its one part with them), the catalog and the coordinates. Adding 100 slides to
  10,000 costs their rows' assignment to the trained lists and the files of the new part.
- `remove_slides`: the slides leave the catalog (their rows are dropped when the index is opened, or stay
  as filtered tombstones in an HNSW graph); their features are deleted after the switch.
- `compact`: the parts of each structure merged into one file (after `update.max_parts` parts, or when
  more than `update.max_removed_fraction` of the stored rows belong to removed slides).

Each runs under the index's writer lock (histo/lock.py, through `writing`), writes its files under names of the new version
and switches by replacing the manifest (search/manifest.py), so readers see the previous version or the
whole new one (one opening during the switch reads the new one again) and a writer killed at any point
leaves the previous version intact; the next writer first
deletes what a killed one left. The manifest records what the quantizers were trained on (`training`), how
far the index has grown since (`growth`) and every change (`history`); search/drift.py says when to retrain.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from histo.errors import HistoError, InputFileError
from histo.io import atomic_write_json
from histo.lock import writer_lock
from pathology.store import METADATA
from search import features as feats_io
from search.barcodes import BITORDER, build_binary_index, code_bits, empty_copy, minmax_barcode
from search.config import UpdateConfig, index_params
from search.drift import imbalance
from search.index import build_float_index, new_faiss_index
from search.kinds import IndexKind, barcode_kind, float_kind
from search.manifest import MANIFEST, collect_garbage, read_manifest, write_manifest
from search.storage import (
    BARCODES,
    COORDS,
    FLOAT,
    Part,
    assemble,
    parts_of,
    read_coords,
    read_faiss,
    row_map,
    versioned,
    write_coords,
    write_faiss,
)

logger = logging.getLogger(__name__)

MODEL = "model.pt"
CATALOG_KEYS = ("slide_id", "label", "patient", "site", "project", "n_tiles", "tile_size_level0")
BARCODE_DEFINITION = "MinMax: bit i = f[i+1] < f[i] for i < D-1, zero-padded to a multiple of 8 bits"
METRIC = "Euclidean (L2) on float features; Hamming on barcodes"


@dataclass(frozen=True)
class Update:
    """What one change did: the operation, the version it made, the slides and rows it added or removed."""

    op: str
    version: int
    slide_ids: tuple[str, ...]
    tiles: int
    compacted: bool = False
    relabelled: tuple[str, ...] = ()  # indexed slides whose label, patient, site or project changed

    def record(self) -> dict[str, Any]:
        return {"op": self.op, "version": self.version, "slide_ids": list(self.slide_ids), "tiles": self.tiles,
                "compacted": self.compacted, "relabelled": list(self.relabelled)}  # fmt: skip


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def read_catalog(index_dir: Path, manifest: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The slides of the manifest's version, in row order (slide ID order), each with `first`."""
    return json.loads((index_dir / manifest["catalog"]).read_text())["slides"]


def _read_slides(root: Path, slide_ids: Sequence[str]) -> tuple[list[dict], np.ndarray, np.ndarray]:
    """(catalog records, features, coords) of stored slides, rows of each slide contiguous in that order,
    read into arrays sized from the slides' records (one slide at a time in memory besides them)."""
    stored = [_stored_record(root, sid) for sid in slide_ids]
    n, dim = sum(int(r["n_tiles"]) for r in stored), int(feats_io.read_attrs(root)["model"]["feature_dim"])
    features, coords = np.empty((n, dim), dtype=np.float32), np.empty((n, 2), dtype=np.int64)
    row, records = 0, []
    for sid in slide_ids:
        rec, f, xy = feats_io.read_slide(root, sid)
        features[row : row + len(f)], coords[row : row + len(f)] = f, xy
        records.append({key: rec.get(key) for key in CATALOG_KEYS} | {"n_tiles": len(f)})
        row += len(f)
    if row != n:
        raise HistoError(f"{root}: slide records give {n} tiles, their features {row}")
    return records, features, coords


def _stored_record(root: Path, slide_id: str) -> dict[str, Any]:
    """A stored slide's record (its group's attributes), without reading its arrays."""
    try:
        return json.loads((root / feats_io.SLIDES / slide_id / "zarr.json").read_text())["attributes"][
            "record"
        ]
    except (OSError, ValueError, KeyError):
        raise InputFileError(root / feats_io.SLIDES / slide_id, "unreadable features record") from None


def _entries(slide_ids: Sequence[str], files: Sequence[str]) -> list[str]:
    """What a version's checksums cover: its files, the features of its slides and the model."""
    slides = f"{feats_io.FEATURES_DIR}/{feats_io.SLIDES}"
    groups = [f"{feats_io.FEATURES_DIR}/zarr.json", f"{slides}/zarr.json"]
    return [*groups, *(f"{slides}/{sid}" for sid in slide_ids), *files, MODEL]


def _version_files(manifest: Mapping[str, Any]) -> list[str]:
    """The versioned files a manifest names: catalog, parts and trained indexes."""
    parts = [p["file"] for role in (COORDS, BARCODES, FLOAT) for p in manifest["parts"][role]]
    trained = [f for f in manifest["training"]["files"].values() if f]
    return [manifest["catalog"], *parts, *trained]


def _growth(history: Sequence[Mapping[str, Any]], training: Mapping[str, Any], tiles: int) -> dict[str, Any]:
    """How far the index has grown since its structures were trained (from the history after training)."""
    since = [h for h in history if h["version"] > training["version"]]
    added = [h for h in since if h["op"] == "add"]
    removed = [h for h in since if h["op"] == "remove"]
    return {
        "since_version": training["version"],
        "added_slides": sum(len(h["slide_ids"]) for h in added),
        "added_tiles": sum(h["tiles"] for h in added),
        "removed_slides": sum(len(h["slide_ids"]) for h in removed),
        "removed_tiles": sum(h["tiles"] for h in removed),
        "tiles_vs_trained": round(tiles / max(1, training["tiles"]), 4),
    }


def _commit(
    index_dir: Path,
    content: dict[str, Any],
    slides: Sequence[Mapping[str, Any]],
    update: Update,
    known: Mapping[str, dict[str, Any]] | None,
) -> dict[str, Any]:
    """Write the version's catalog and manifest (the switch), then delete what no version names."""
    atomic_write_json(index_dir / content["catalog"], {"slides": list(slides)})
    history = [*content.get("history", []), {**update.record(), "at": now()}]
    retired = content.get("retired_features", []) if update.op == "remove" else []  # deleted after a removal
    tiles = sum(s["n_tiles"] for s in slides)
    counts = {"slides": len(slides), "tiles": tiles, "failed_slides": len(content.get("failed_slides", []))}
    content = {**content, "version": update.version, "updated": now(), "history": history, "counts": counts,
               "growth": _growth(history, content["training"], tiles), "retired_features": retired}  # fmt: skip
    entries = _entries([s["slide_id"] for s in slides], _version_files(content))
    manifest = write_manifest(index_dir, content, entries, known)
    collect_garbage(index_dir, manifest)
    return manifest


def _recorded(manifest: Mapping[str, Any]) -> dict[str, Any]:
    """A manifest's content without what each version recomputes (checksums)."""
    return {k: v for k, v in manifest.items() if k not in ("format", "format_version", "files")}


# ---- a fresh build (and --retrain) -------------------------------------------------------------------


def build_version(
    index_dir: Path, content: dict[str, Any], slide_ids: Sequence[str], previous: Mapping[str, Any] | None
) -> dict[str, Any]:
    """Build every structure from the stored features of `slide_ids` (training and calibration included) as
    the next version (1 without a `previous` one); `content`: index type, requested params, search, failed
    slides, built_with. Returns the manifest."""
    root = index_dir / feats_io.FEATURES_DIR
    attrs = feats_io.read_attrs(root)
    version = 1 if previous is None else previous["version"] + 1
    records, matrix, coords = _read_slides(root, sorted(slide_ids))
    logger.info("%s: indexing %d tiles of %d slides", index_dir, len(matrix), len(records))
    index_type = content["index"]["type"]
    requested = index_params(content["index"]["params_requested"], source=str(index_dir / "manifest.json"))
    counts = [r["n_tiles"] for r in records]
    groups = np.repeat(np.arange(len(records)), counts)
    kind_name = requested.barcode_index or float_kind(index_type).barcodes
    started = time.perf_counter()
    barcodes, barcode_params = build_binary_index(minmax_barcode(matrix), kind_name, requested, groups)
    seconds = {"barcodes": round(time.perf_counter() - started, 2)}
    float_index = build_float_index(matrix, index_type, requested, groups)
    seconds["float"] = round(time.perf_counter() - started - seconds["barcodes"], 2)
    n = len(matrix)
    files = {role: versioned(role, version) for role in (COORDS, BARCODES, FLOAT)}
    write_coords(index_dir / files[COORDS], coords)
    _write_part(index_dir / files[BARCODES], barcodes)
    write_faiss(index_dir / files[FLOAT], float_index.index)
    trained = {
        "float": _write_trained(index_dir, version, ".faiss", float_index.trained),
        "barcodes": _write_trained(index_dir, version, ".faissb", _trained_binary(barcodes, kind_name)),
    }
    held = [] if float_index.held_out is None else np.unique(groups[float_index.held_out]).tolist()
    firsts = np.concatenate([[0], np.cumsum(counts)])[:-1]
    slides = [{**r, "first": int(f)} for r, f in zip(records, firsts, strict=True)]
    content = {
        **(_recorded(previous) if previous is not None else {}),
        **content,
        "created": now() if previous is None else previous["created"],
        "model": attrs["model"] | {"file": MODEL if (index_dir / MODEL).exists() else None},
        "tiling": attrs["tiling"],
        "barcode": {
            "definition": BARCODE_DEFINITION,
            "bits": int(matrix.shape[1] - 1),
            "padded_bits": code_bits(matrix.shape[1]),
            "bitorder": BITORDER,
            "index": barcode_params,
        },
        "catalog": versioned("catalog", version),
        "parts": {role: [Part(f, 0, n).record()] for role, f in files.items()},
        "storage_rows": n,
        "training": {
            "version": version,
            "slides": len(records),
            "tiles": n,
            "held_out_slides": [records[i]["slide_id"] for i in held],
            "imbalance": {"float": imbalance(float_index.index), "barcodes": imbalance(barcodes)},
            "files": trained,
            "seconds": seconds,  # to build (train, add, calibrate) each structure
        },
    }
    content["index"] = {**content["index"], "params": dict(float_index.params), "metric": METRIC}
    op = "build" if previous is None else "retrain"
    update = Update(op, version, tuple(r["slide_id"] for r in records), n)
    return _commit(index_dir, content, slides, update, None if previous is None else previous["files"])


def _write_part(path: Path, index: Any) -> None:
    """Write a part of a binary or float structure (a binary IVF without its direct map: parts merge)."""
    import faiss

    if isinstance(index, faiss.IndexBinaryIVF) and index.direct_map.type != faiss.DirectMap.NoMap:
        index = faiss.clone_binary_index(index)
        index.set_direct_map_type(faiss.DirectMap.NoMap)
    write_faiss(path, index)


def _trained_binary(index: Any, kind_name: str) -> Any:
    return empty_copy(index) if barcode_kind(kind_name).trainable else None


def _write_trained(index_dir: Path, version: int, suffix: str, index: Any) -> str | None:
    """Write a trained, empty index (None for an untrained kind): every later part starts from it."""
    if index is None:
        return None
    name = versioned("trained", version, suffix)
    write_faiss(index_dir / name, index)
    return name


# ---- add ----------------------------------------------------------------------------------------------


def pending_slides(index_dir: Path, manifest: Mapping[str, Any]) -> list[str]:
    """Slides whose features are stored but not in the index's catalog (extracted since, or left by a
    writer killed before its switch)."""
    indexed = {s["slide_id"] for s in read_catalog(index_dir, manifest)}
    return [sid for sid in feats_io.done_slides(index_dir / feats_io.FEATURES_DIR) if sid not in indexed]


def add_extracted(
    index_dir: Path,
    update_config: UpdateConfig | None = None,
    failed: Sequence[Mapping[str, Any]] = (),
    extracted: Sequence[str] = (),
    relabelled: Sequence[str] = (),
) -> Update | None:
    """Add the slides whose features are stored but not indexed to the trained structures as new parts
    (no retraining), with what a re-run changed in indexed slides: the `extracted` ones (features written
    again: a slide tiled anew, damaged features) get their new rows, the old ones dropped as a removal's
    are; the `relabelled` ones their stored label, patient, site or project. None when nothing changed.
    `failed`: slides whose extraction failed (recorded with the index's failed slides). Compacts when the
    parts exceed `update.max_parts` or removed rows `update.max_removed_fraction`."""
    index_dir = Path(index_dir)
    root = index_dir / feats_io.FEATURES_DIR
    with writing(index_dir, "add slides"):
        manifest = read_manifest(index_dir, "none")  # trusted: readers verify
        catalog = read_catalog(index_dir, manifest)
        indexed = {s["slide_id"] for s in catalog}
        new_ids = sorted({*pending_slides(index_dir, manifest), *(set(extracted) & indexed)})
        relabel = _relabels(root, catalog, set(relabelled) - set(new_ids))
        if not new_ids and not relabel:
            return None
        failures = {f["slide_id"]: f for f in [*manifest.get("failed_slides", []), *failed]}
        version = manifest["version"] + 1
        first = int(manifest["storage_rows"])
        parts = {role: parts_of(manifest["parts"][role]) for role in (COORDS, BARCODES, FLOAT)}
        added = _add_parts(index_dir, manifest, parts, new_ids, version) if new_ids else []
        n = sum(s["n_tiles"] for s in added)
        replaced = set(new_ids)
        kept = [{**s, **relabel.get(s["slide_id"], {})} for s in catalog if s["slide_id"] not in replaced]
        slides = sorted([*kept, *added], key=lambda s: s["slide_id"])
        content = {**_recorded(manifest), "catalog": versioned("catalog", version),
                   "parts": {role: [p.record() for p in ps] for role, ps in parts.items()},
                   "storage_rows": first + n,
                   "failed_slides": [failures[k] for k in sorted(failures) if k not in replaced]}  # fmt: skip
        op, ids = ("add", tuple(new_ids)) if new_ids else ("relabel", ())
        update = Update(op, version, ids, n, relabelled=tuple(sorted(relabel)))
        known = _known_except(manifest["files"], {*new_ids, *relabel})
        manifest = _commit(index_dir, content, slides, update, known)
        config = update_config or _defaults()
        removed = 1 - manifest["counts"]["tiles"] / manifest["storage_rows"]
        if max(len(ps) for ps in parts.values()) > config.max_parts or removed > config.max_removed_fraction:
            compact(index_dir)
            return dataclasses.replace(update, compacted=True)
        return update


def _add_parts(
    index_dir: Path,
    manifest: Mapping[str, Any],
    parts: dict[str, list[Part]],
    slide_ids: list[str],
    version: int,
) -> list[dict[str, Any]]:
    """Write the rows of stored slides as the version's new part of each structure (`parts` updated) and
    return their catalog records, their rows after the last storage id."""
    records, matrix, coords = _read_slides(index_dir / feats_io.FEATURES_DIR, slide_ids)
    first = int(manifest["storage_rows"])
    ids = np.arange(first, first + len(matrix), dtype=np.int64)
    files = {role: versioned(role, version) for role in (COORDS, BARCODES, FLOAT)}
    write_coords(index_dir / files[COORDS], coords)
    parts[COORDS].append(Part(files[COORDS], first, len(matrix)))
    for role, x in ((BARCODES, minmax_barcode(matrix)), (FLOAT, matrix)):
        kind = structure_kind(manifest, role)[0]
        _write_part(index_dir / files[role], _grown_part(index_dir, manifest, kind, parts[role], x, ids))
        if kind.grows == "rewrite":  # the one part now holds every stored row
            parts[role] = [Part(files[role], 0, first + len(matrix))]
        else:
            parts[role].append(Part(files[role], first, len(matrix)))
    starts = first + np.concatenate([[0], np.cumsum([r["n_tiles"] for r in records])])[:-1]
    return [{**r, "first": int(f)} for r, f in zip(records, starts, strict=True)]


def _known_except(files: Mapping[str, dict], slide_ids: set[str]) -> dict[str, dict]:
    """The previous version's checksums without the features of `slide_ids` (written again or relabelled
    since, so hashed again)."""
    slides = f"{feats_io.FEATURES_DIR}/{feats_io.SLIDES}/"
    return {
        rel: meta
        for rel, meta in files.items()
        if not (rel.startswith(slides) and rel[len(slides) :].partition("/")[0] in slide_ids)
    }


def _relabels(root: Path, catalog: Sequence[Mapping[str, Any]], slide_ids: set[str]) -> dict[str, dict]:
    """{slide ID: {field: stored value}} of the catalog fields (METADATA) whose stored features record of
    the slide now says otherwise, for the indexed `slide_ids`."""
    out = {}
    for entry in catalog:
        if entry["slide_id"] in slide_ids:
            stored = _stored_record(root, entry["slide_id"])
            changed = {k: stored.get(k) for k in METADATA if stored.get(k) != entry.get(k)}
            if changed:
                out[entry["slide_id"]] = changed
    return out


def _grown_part(
    index_dir: Path,
    manifest: Mapping[str, Any],
    kind: IndexKind,
    parts: list[Part],
    x: np.ndarray,
    ids: np.ndarray,
) -> Any:
    """The new part holding rows `x` with storage ids `ids`: from the trained empty index (or a new empty
    one for an untrained kind); a `grows: rewrite` kind gets its one stored part with the rows added."""
    import faiss

    binary = kind.binary
    if kind.grows == "rewrite":
        index = read_faiss(index_dir / parts[-1].file, binary)
    elif kind.trainable:
        index = read_faiss(
            index_dir / manifest["training"]["files"]["barcodes" if binary else "float"], binary
        )
    else:
        params = manifest["barcode"]["index"] if binary else manifest["index"]["params"]
        index = new_faiss_index(kind, params, manifest["barcode"]["padded_bits"] if binary else x.shape[1])
    top = index if binary else faiss.downcast_index(index)
    if isinstance(top, (faiss.IndexIVF, faiss.IndexBinaryIVF, faiss.IndexIDMap)):
        index.add_with_ids(x, ids)
    else:
        index.add(x)
    return index


# ---- remove -------------------------------------------------------------------------------------------


def remove_slides(
    index_dir: Path, slide_ids: Sequence[str], update_config: UpdateConfig | None = None
) -> Update:
    """Remove slides (every ID must be indexed; nothing changes otherwise): a new version without them,
    then their features are deleted. Compacts when removed rows exceed `update.max_removed_fraction`."""
    index_dir = Path(index_dir)
    with writing(index_dir, "remove slides"):
        manifest = read_manifest(index_dir, "none")  # trusted: readers verify
        slides = read_catalog(index_dir, manifest)
        unknown = sorted(set(slide_ids) - {s["slide_id"] for s in slides})
        if unknown:
            raise HistoError(f"{index_dir}: not in the index: {', '.join(unknown)}")
        gone = set(slide_ids)
        kept = [s for s in slides if s["slide_id"] not in gone]
        if not kept:
            raise HistoError(f"{index_dir}: removing every slide would leave an empty index")
        version = manifest["version"] + 1
        tiles = sum(s["n_tiles"] for s in slides if s["slide_id"] in gone)
        content = {**_recorded(manifest), "catalog": versioned("catalog", version),
                   "retired_features": sorted(gone)}  # fmt: skip
        update = Update("remove", version, tuple(sorted(gone)), tiles)
        manifest = _commit(index_dir, content, kept, update, manifest["files"])
        _retire_features(index_dir, manifest)
        removed = 1 - manifest["counts"]["tiles"] / manifest["storage_rows"]
        if removed > (update_config or _defaults()).max_removed_fraction:
            compact(index_dir)
            return dataclasses.replace(update, compacted=True)
        return update


def _retire_features(index_dir: Path, manifest: Mapping[str, Any]) -> None:
    """Delete the features of the slides the manifest's version removed (unless indexed again since), then
    record that they are gone (the same version, the manifest rewritten), so features extracted for them
    later are never deleted."""
    if not manifest.get("retired_features"):
        return
    indexed = {s["slide_id"] for s in read_catalog(index_dir, manifest)}
    retired = [sid for sid in manifest["retired_features"] if sid not in indexed]
    root = index_dir / feats_io.FEATURES_DIR
    feats_io.remove_slides(root, [sid for sid in retired if (root / feats_io.SLIDES / sid).exists()])
    content = {**_recorded(manifest), "retired_features": []}
    write_manifest(index_dir, content, list(manifest["files"]), manifest["files"])


_writing: set[Path] = set()  # index dirs whose writer lock this process holds (through `writing`)


@contextlib.contextmanager
def writing(index_dir: str | Path, command: str) -> Iterator[None]:
    """Hold the index's writer lock (histo/lock.py) while the block runs; a write nested in one this
    process is doing (a build that grows, an add that compacts) runs under the outer lock. The outermost
    holder first deletes what a killed writer left (files no version names, features of removed slides),
    before anything new (features included) is written."""
    index_dir = Path(index_dir)
    key = index_dir.resolve()
    if key in _writing:
        yield
        return
    with writer_lock(index_dir, command):
        _writing.add(key)
        try:
            if (index_dir / MANIFEST).exists():
                manifest = read_manifest(index_dir, "none")
                collect_garbage(index_dir, manifest)
                _retire_features(index_dir, manifest)
            yield
        finally:
            _writing.discard(key)


def _defaults() -> UpdateConfig:
    from search.config import IndexConfig

    return IndexConfig.coerce().update


# ---- compact and retrain --------------------------------------------------------------------------------


def compact(index_dir: Path) -> Update:
    """Merge each structure's parts into one file in row order, dropping removed slides' rows (an HNSW
    graph keeps them as tombstones); results are unchanged."""
    index_dir = Path(index_dir)
    with writing(index_dir, "compact"):
        manifest = read_manifest(index_dir, "none")  # trusted: readers verify
        slides = read_catalog(index_dir, manifest)
        rows = row_map(slides, manifest["storage_rows"])
        version = manifest["version"] + 1
        n = len(rows.from_storage)
        files = {role: versioned(role, version) for role in (COORDS, BARCODES, FLOAT)}
        write_coords(
            index_dir / files[COORDS], read_coords(index_dir, parts_of(manifest["parts"][COORDS]), rows)
        )
        for role in (BARCODES, FLOAT):
            kind, params, dim = structure_kind(manifest, role)
            merged, _ = assemble(index_dir, parts_of(manifest["parts"][role]), rows, kind.binary,
                                 lambda kind=kind, params=params, dim=dim: new_faiss_index(kind, params, dim))  # fmt: skip
            _write_part(index_dir / files[role], merged)
            del merged
        offsets = np.concatenate([[0], np.cumsum([s["n_tiles"] for s in slides])])[:-1]
        slides = [{**s, "first": int(f)} for s, f in zip(slides, offsets, strict=True)]
        content = {**_recorded(manifest), "catalog": versioned("catalog", version),
                   "parts": {role: [Part(f, 0, n).record()] for role, f in files.items()}, "storage_rows": n}  # fmt: skip
        update = Update("compact", version, (), 0)
        _commit(index_dir, content, slides, update, manifest["files"])
        return update


def structure_kind(manifest: Mapping[str, Any], role: str) -> tuple[IndexKind, Mapping[str, Any], int]:
    """(kind row, effective parameters, dimension or bits) of the barcode or float structure."""
    if role == BARCODES:
        b = manifest["barcode"]
        return barcode_kind(b["index"]["kind"]), b["index"], int(b["padded_bits"])
    return (
        float_kind(manifest["index"]["type"]),
        manifest["index"]["params"],
        int(manifest["model"]["feature_dim"]),
    )


def retrain(index_dir: Path) -> Update:
    """Rebuild every structure from the stored features of the indexed slides (IVF training, nprobe
    calibration) as a new version: the index becomes what a fresh build on the same slides makes."""
    index_dir = Path(index_dir)
    with writing(index_dir, "retrain"):
        manifest = read_manifest(index_dir, "none")  # trusted: readers verify
        ids = [s["slide_id"] for s in read_catalog(index_dir, manifest)]
        keep = ("index", "search", "failed_slides", "built_with")
        content = {k: manifest[k] for k in keep if k in manifest}
        content["index"] = {k: content["index"][k] for k in ("type", "params_requested")}
        return last_update(build_version(index_dir, content, ids, manifest))


def last_update(manifest: Mapping[str, Any]) -> Update:
    """The change that made the manifest's version (its last history entry)."""
    h = manifest["history"][-1]
    return Update(
        h["op"],
        h["version"],
        tuple(h["slide_ids"]),
        h["tiles"],
        h["compacted"],
        tuple(h.get("relabelled", ())),
    )
