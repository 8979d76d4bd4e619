"""One slide -> TileSet: tissue mask, Yottixel mosaic, cellularity and the high-cellularity subset."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from histo.batch import ALREADY_DONE, ITEM_ERRORS, BatchSummary, Outcome, reason_of, run_batch, select_shard
from histo.errors import HistoError, InputFileError
from histo.identity import SourceIdentity, source_change
from pathology.cellularity import keep_most_cellular, tile_scorer
from pathology.config import StainConfig, TileConfig
from pathology.geometry import RESOLVED, TileGeometry
from pathology.mosaic import (
    box_means,
    colour_features,
    grid_hint,
    select_mosaic,
    tile_grid,
    tile_means,
    tissue_fractions,
)
from pathology.slide import SLIDE_EXTENSIONS, Slide, open_slide, recorded_reader, slide_id_of
from pathology.slide.ngff import identity_files, is_ngff
from pathology.slide_labels import SlideMeta, resolve_meta
from pathology.stain import fit_config, normalize_tiles
from pathology.store import METADATA, SlideRecord, read_tiles, slide_id_problem, tiles_digest
from pathology.tissue import brightfield_problem, tissue_mask

log = logging.getLogger(__name__)

MAX_MASK_PX = 8192  # long side of the tissue-mask image; coarser µm/px beyond (bounded memory)
NO_CLUSTER = -1  # cluster of a given patch kept without the colour mosaic


def store_params(cfg: TileConfig) -> dict:
    """The parameters recorded in a store: the recorded config plus its resolved tile geometry."""
    return {**cfg.recorded(), RESOLVED: cfg.geometry.record()}


def tiling_config(params: Mapping[str, Any], source: str) -> TileConfig:
    """The TileConfig recorded in a store (or an index manifest's `tiling`), validated; `source` names it."""
    return TileConfig.coerce({k: v for k, v in params.items() if k != RESOLVED}, source)


@dataclass
class TileSet:
    """The mosaic of one slide: level-0 coords, colour cluster, cellularity and the selected subset."""

    record: SlideRecord
    coords: np.ndarray
    cluster: np.ndarray
    cellularity: np.ndarray
    selected: np.ndarray
    thumbnail: np.ndarray | None = None  # the tissue-mask image (for QC pictures)
    mask: np.ndarray | None = None
    stain: StainConfig | None = None  # the normalization of the tiles read for the encoder

    def arrays(self) -> dict[str, np.ndarray]:
        return {
            "coords": self.coords.astype(np.int64),
            "cluster": self.cluster.astype(np.int32),
            "cellularity": self.cellularity.astype(np.float32),
            "selected": self.selected.astype(bool),
        }

    def read_tiles(self, which: str = "selected") -> np.ndarray:
        """Tiles (M, tile_px, tile_px, 3) uint8 at the target resolution: "selected" or "mosaic" (all),
        stain-normalized when the tiling says so."""
        if which not in ("selected", "mosaic"):
            raise ValueError(f"which must be 'selected' or 'mosaic', got {which!r}")
        coords = self.coords[self.selected] if which == "selected" else self.coords
        rec = self.record
        with open_slide(rec.source_path, mpp_override=rec.mpp, reader=recorded_reader(rec.reader)) as slide:
            tiles = read_tiles(slide, coords, rec.tile_size_level0, rec.tile_px)
        return tiles if self.stain is None else normalize_tiles(tiles, self.stain, rec.source_path)


class EmptyMosaicError(InputFileError):
    """The slide was read but gives no mosaic (no tissue, not brightfield); keeps what was computed."""

    def __init__(self, path: object, reason: str, tileset: TileSet) -> None:
        super().__init__(path, reason)
        self.tileset = tileset


def _identity(path: str | os.PathLike) -> SourceIdentity:
    """A slide file's identity (an OME-Zarr folder's: its metadata and level 0's first and last chunk
    files'); only its path when it cannot be read (the slide then fails on its own)."""
    try:
        if is_ngff(Path(path)):
            return SourceIdentity.of_files(path, identity_files(Path(path)))
        return SourceIdentity.of(path)
    except (OSError, InputFileError):
        return SourceIdentity(os.path.realpath(path))


def _base_record(slide: Slide, geometry: TileGeometry, meta: SlideMeta) -> SlideRecord:
    source = _identity(slide.path)
    return SlideRecord(
        slide_id=slide.slide_id,
        source_path=source.path,
        source_size=source.bytes,
        source_fingerprint=source.fingerprint,
        label=meta.label,
        patient=meta.patient,
        site=meta.site,
        project=meta.project,
        width=slide.width,
        height=slide.height,
        vendor=slide.vendor,
        mpp=slide.mpp,
        mpp_source=slide.mpp_source,
        objective_power=slide.objective_power,
        reader=slide.reader,
        tile_size_level0=geometry.level0_px(slide.mpp),
        tile_px=geometry.px,
    )


def _empty(record: SlideRecord, thumb: np.ndarray | None, mask: np.ndarray | None) -> TileSet:
    return TileSet(
        record, np.zeros((0, 2), np.int64), np.zeros(0, np.int32), np.zeros(0, np.float32),
        np.zeros(0, bool), thumb, mask,
    )  # fmt: skip


def slide_tissue(
    slide: Slide, cfg: TileConfig, roi: Path | None = None
) -> tuple[np.ndarray, np.ndarray, float]:
    """(RGB image, tissue mask, their µm/px) of the whole slide at the tissue resolution; with `roi` (a
    QuPath GeoJSON file) the mask is restricted or replaced by its regions."""
    mask_mpp = max(cfg.tissue.mpp, max(slide.width, slide.height) * slide.mpp / MAX_MASK_PX)
    thumb = slide.read_at_mpp(mask_mpp)
    mask = tissue_mask(thumb, cfg.tissue, mask_mpp)
    if roi is not None:
        from pathology.interop.roi import apply_roi

        mask = apply_roi(mask, roi, slide.width, slide.height, cfg.roi)
    return thumb, mask, mask_mpp


def tile_open_slide(
    slide: Slide,
    cfg: TileConfig,
    meta: SlideMeta | None = None,
    given: Path | None = None,
    roi: Path | None = None,
) -> TileSet:
    """Compute the high-cellularity mosaic of an open slide; EmptyMosaicError when there is none.

    With `given` (a CLAM/TRIDENT coordinate file) its patches are the candidate tiles instead of the
    tissue grid, and `cfg.from_coords.select` says what is applied on top (none, cellularity,
    mosaic: the Yottixel mosaic, then the cellularity selection). With `roi` (a QuPath GeoJSON file) its
    regions restrict or replace the tissue mask (pathology/interop/roi.py)."""
    geometry = cfg.geometry
    record = _base_record(slide, geometry, resolve_meta(meta, slide.slide_id))
    problem = slide_id_problem(slide.slide_id)
    if problem:
        raise InputFileError(slide.path, problem)
    patches = None
    if given is not None:
        from pathology.interop.tiles import read_given_tiles

        patches = read_given_tiles(given, slide, geometry)
        record.tile_size_level0, record.given_coords = patches.size_level0, str(patches.path)
    size0 = record.tile_size_level0
    record.roi = None if roi is None else str(roi)
    thumb, mask, _ = slide_tissue(slide, cfg, roi)

    def fail(reason: str, mask: np.ndarray | None = None) -> EmptyMosaicError:
        record.status, record.reason = "failed", reason
        return EmptyMosaicError(slide.path, reason, _empty(record, thumb, mask))

    dark = brightfield_problem(thumb, cfg.tissue.min_brightness)
    if dark:
        raise fail(dark)
    if patches is None:
        cand, features = _grid_candidates(slide, thumb, mask, size0, cfg, fail)
        select = "mosaic"
    else:
        if len(patches.coords) == 0:
            raise fail(f"no patches in {patches.path}")
        cand, select = patches.coords, cfg.from_coords.select
        features = tile_means(thumb, cand, size0, slide.width, slide.height)
    if select == "mosaic":
        pick, cluster = select_mosaic(
            features, cand[:, ::-1], cfg.mosaic.n_clusters, cfg.mosaic.percent, cfg.seed
        )
        coords = cand[pick]
    else:  # every given patch is a mosaic tile; no colour clusters
        coords, cluster = cand, np.full(len(cand), NO_CLUSTER, np.int32)
    cell = cfg.cellularity
    cell_px = max(8, round(geometry.um / cell.mpp))
    score = tile_scorer(cell, geometry.um / cell_px, cfg.tissue.ink)
    scores = np.array([score(slide.read_tile(x, y, size0, cell_px)) for x, y in coords], np.float32)
    selected = np.ones(len(coords), bool) if select == "none" else keep_most_cellular(scores, cell)
    record.n_mosaic, record.n_selected = len(coords), int(selected.sum())
    tileset = TileSet(record, coords, cluster, scores, selected, thumb, mask, cfg.stain)
    if not selected.any():  # only the min_score rule can keep nothing: a visible outcome, not a success
        record.status = "failed"
        record.reason = (
            f"no high-cellularity tile: none of {len(coords)} mosaic tiles reaches cellularity.min_score "
            f"{cell.min_score} (best {scores.max():.3g})"
        )
        raise EmptyMosaicError(slide.path, record.reason, tileset)
    return tileset


def _grid_candidates(
    slide: Slide, thumb: np.ndarray, mask: np.ndarray, size0: float, cfg: TileConfig, fail: Callable
) -> tuple[np.ndarray, np.ndarray]:
    """Level-0 corners of the grid tiles with enough tissue, and their colour features."""
    grid = tile_grid(slide.width, slide.height, size0, mask, cfg.mosaic)
    hint = grid_hint(cfg.mosaic)
    if grid.n_cols * grid.n_rows == 0 and mask.any():
        raise fail(
            f"slide {slide.width}x{slide.height} px has no whole tile of {size0:.0f} px (level 0); {hint}",
            mask,
        )
    origins = grid.origins()
    fractions = tissue_fractions(mask, grid, slide.width, slide.height)
    threshold = cfg.mosaic.min_tissue_fraction
    candidates = np.flatnonzero(fractions >= threshold)
    if len(candidates) == 0:
        raise fail(
            f"no tissue: none of {len(origins)} grid tiles is >= {threshold:.0%} tissue "
            f"(mask covers {mask.mean():.1%} of the slide); {hint}",
            mask,
        )
    cand = origins[candidates]
    colour_mpp = cfg.mosaic.colour_mpp
    if colour_mpp is None:
        features = box_means(thumb, grid, slide.width, slide.height)[candidates]
    else:
        features = colour_features(slide, cand, grid, colour_mpp)
    return cand, features


def tile_slide(
    path: str | os.PathLike,
    config: TileConfig | Mapping[str, Any] | None = None,
    mpp_override: float | None = None,
    meta: SlideMeta | None = None,
    given: str | os.PathLike | None = None,
    roi: str | os.PathLike | None = None,
) -> TileSet:
    """Open a slide and tile it (API used by `histo tile` and by `histo search` for query slides).

    `config`: a TileConfig, None (the defaults) or a mapping of keys over the defaults (validated);
    its `run.reader` opens the slide. The scale override (argument, else the labels' mpp) is used only when the slide has no scale.
    `given`: a CLAM/TRIDENT coordinate file whose patches are the candidate tiles; `roi`: a QuPath
    GeoJSON file whose regions restrict or replace the tissue mask.
    Raises InputFileError (EmptyMosaicError for an empty mosaic) naming the file and the reason.
    """
    config = fit_config(TileConfig.coerce(config))
    if mpp_override is None and meta is not None:
        mpp_override = meta.mpp
    with open_slide(path, mpp_override, config.run.reader) as slide:
        return tile_open_slide(
            slide, config, meta, None if given is None else Path(given), None if roi is None else Path(roi)
        )


# ---- many slides -> tile store -------------------------------------------------------------------


def _files_under(folder: Path, unreadable: list[tuple[Path, str]]) -> list[Path]:
    """Every file under `folder` and every OME-Zarr image folder (not searched inside), sorted (links to
    folders are not followed, as in Path.rglob); a folder that cannot be listed is appended to
    `unreadable` as (folder, reason)."""
    files: list[Path] = []

    def refused(e: OSError) -> None:
        unreadable.append((Path(e.filename), f"folder not searched for slides: {e.strerror}"))

    for root, dirs, names in os.walk(folder, onerror=refused):
        images = {d for d in dirs if not d.startswith(".") and is_ngff(Path(root) / d)}
        dirs[:] = [d for d in dirs if d not in images]
        files += [Path(root) / name for name in (*images, *names)]
    return sorted(files)


def find_slides(
    paths: list[str | os.PathLike], unreadable: list[tuple[Path, str]] | None = None
) -> list[Path]:
    """Slide files and OME-Zarr image folders named or found (recursively) in folders, sorted and
    de-duplicated; a DICOM series counts once per folder. Named files are kept whatever their extension
    (bad ones fail later), and so are links with a slide extension that lead nowhere. A folder that
    cannot be listed is appended to `unreadable` as (folder, reason)."""
    found: set[Path] = set()
    for p in map(Path, paths):
        if not p.is_dir() or is_ngff(p):
            found.add(p.absolute())
            continue
        dicom_dirs: set[Path] = set()
        for f in _files_under(p, unreadable if unreadable is not None else []):
            if f.is_dir():  # an OME-Zarr image
                found.add(f.absolute())
                continue
            suffix = f.suffix.lower()
            if suffix not in SLIDE_EXTENSIONS or f.name.startswith("."):
                continue
            if not (f.is_file() or f.is_symlink()):  # a broken link or a link loop fails as an item
                continue
            if suffix == ".dcm":
                if f.parent in dicom_dirs:
                    continue
                dicom_dirs.add(f.parent)
            found.add(f.absolute())
    return sorted(found)


@dataclass(frozen=True)
class _Job:
    """One slide of a `tile_slides` run (an item of `histo.batch.run_batch`)."""

    id: str
    path: Path
    meta: SlideMeta | None
    duplicate_of: Path | None
    given: Path | None = None  # its CLAM/TRIDENT coordinate file (`--from-coords`)
    roi: Path | None = None  # its QuPath GeoJSON regions (`--roi`)
    problem: str | None = None  # a folder that could not be searched: failed with this reason


def _detail(rec: SlideRecord) -> dict:
    """The command-specific fields of a slide's outcome."""
    return {
        "n_mosaic": rec.n_mosaic, "n_selected": rec.n_selected, "mpp": rec.mpp,
        "mpp_source": rec.mpp_source, "label": rec.label,
    }  # fmt: skip


def _failed(job: _Job, reason: str) -> SlideRecord:
    source = _identity(job.path)
    return SlideRecord(
        job.id, source.path, status="failed", reason=reason, source_size=source.bytes,
        source_fingerprint=source.fingerprint,
    )  # fmt: skip


def _stored(store: Any, job: _Job) -> SlideRecord | None:
    """The store's record under the job's slide ID; None when there is none (or it is damaged: tiling
    the slide again replaces it)."""
    if job.duplicate_of is not None or slide_id_problem(job.id) is not None or not store.has_slide(job.id):
        return None
    try:
        return store.record(job.id)
    except InputFileError:
        return None


def _metadata_changes(rec: SlideRecord, job: _Job, source: SourceIdentity) -> dict[str, list]:
    """{field: [stored, new]} that a re-run changes in a done record without tiling again: label,
    patient, site and project from the labels CSV (when it has the slide's row), and the path of a
    slide file that moved."""
    changes = {}
    if job.meta is not None:
        meta = resolve_meta(job.meta, job.id)
        for key in METADATA:
            if getattr(rec, key) != getattr(meta, key):
                changes[key] = [getattr(rec, key), getattr(meta, key)]
    if rec.source_path != source.path:
        changes["source_path"] = [rec.source_path, source.path]
    return changes


def _inputs_changed(rec: SlideRecord, job: _Job) -> bool:
    """Whether the slide is tiled from other coordinate or ROI files than its stored record was."""
    return rec.given_coords != (None if job.given is None else str(job.given)) or rec.roi != (
        None if job.roi is None else str(job.roi)
    )


def _reuse(store: Any, rec: SlideRecord, job: _Job, replace: bool) -> Outcome | None:
    """The outcome of a slide already done in the store: its metadata updated when it changed, or
    refused when the file is another source than the stored slide's (unless `replace`); None when the
    slide is to be tiled."""
    if _inputs_changed(rec, job):
        return None
    source = _identity(job.path)
    change = source_change(rec.identity(), source)
    if change is not None:
        if replace:
            return None
        return Outcome.failed(
            job.id, job.path,
            f"slide ID {job.id!r} is already in the store: {change}; pass --replace to tile this file in its place",
        )  # fmt: skip
    changes = _metadata_changes(rec, job, source)
    if not changes:
        return Outcome.skipped(job.id, job.path, ALREADY_DONE, **_detail(rec))
    rec = store.update_record(job.id, {key: new for key, (_, new) in changes.items()})
    return Outcome.done(job.id, job.path, **_detail(rec), updated=changes)


def _tile_one(
    job: _Job,
    out: str,
    config: TileConfig,
    save_pixels: bool,
    qc_dir: str | None,
    mpp: float | None,
    from_coords: str | None = None,
    roi: str | None = None,
    replace: bool = False,
) -> Outcome:
    """Tile one slide into the store (or, done there from the same file, update its metadata). A fault
    of the slide's data is written there as a failed record before it goes on to the runner, which
    reports it (histo.batch's exception policy)."""
    from pathology.store import TileStore

    if job.problem is not None:
        return Outcome.failed(job.id, job.path, job.problem)
    if job.duplicate_of is not None:  # not written: the store's record belongs to the other file
        return Outcome.failed(job.id, job.path, f"duplicate slide ID (also {job.duplicate_of})")
    store = TileStore.open(out)
    stored = _stored(store, job)
    if stored is not None and stored.status == "done":
        reused = _reuse(store, stored, job, replace)
        if reused is not None:
            return reused
    safe = slide_id_problem(job.id) is None
    if safe:
        store.clean_partial(job.id)
    try:
        if from_coords is not None and job.given is None:
            raise InputFileError(job.path, f"no coordinate file for this slide in {from_coords}")
        if roi is not None and job.roi is None:
            raise InputFileError(job.path, f"no GeoJSON file <slide id>.geojson for this slide in {roi}")
        tileset = tile_slide(job.path, config, mpp_override=mpp, meta=job.meta, given=job.given, roi=job.roi)
        pixels = tileset.read_tiles("selected") if save_pixels else None
    except EmptyMosaicError as e:
        tileset, pixels = e.tileset, None
    except ITEM_ERRORS as e:
        if safe:
            store.write_slide(_failed(job, reason_of(e, job.path)))
        raise
    rec = tileset.record
    done = rec.status == "done"
    if done:
        rec.tiles_digest = tiles_digest(rec, tileset.coords[tileset.selected])
    if qc_dir is not None and safe:  # first: a QC folder that cannot be written leaves no slide without one
        from pathology.qc import has_picture, write_qc

        if has_picture(tileset):
            write_qc(tileset, Path(qc_dir) / f"{job.id}.png")
    if safe:
        store.write_slide(rec, tileset.arrays() if done else None, pixels)
    if done:
        return Outcome.done(job.id, job.path, **_detail(rec))
    return Outcome.failed(job.id, job.path, rec.reason, **_detail(rec))


def _jobs(
    paths: list[str | os.PathLike], labels: dict, given: dict[str, Path], roi: Path | dict[str, Path] | None
) -> list[_Job]:
    """Every slide found, sorted by path, then every folder that could not be searched (an item that
    fails, named `<folder>/`); a slide ID seen before is a duplicate of its first file; `given`: slide
    ID -> its coordinate file; `roi`: one GeoJSON file for all, or slide ID -> file."""
    from pathology.slide_labels import find_meta

    unreadable: list[tuple[Path, str]] = []
    everything = find_slides(paths, unreadable)
    if not everything:
        shown = ", ".join(map(str, paths))
        refused = "".join(f"; {folder}: {reason}" for folder, reason in unreadable)
        raise HistoError(
            f"no slide files found in {shown} (extensions: {', '.join(sorted(SLIDE_EXTENSIONS))}; "
            f"OME-Zarr folders){refused}"
        )
    first_of: dict[str, Path] = {}
    jobs = []
    for path in everything:
        slide_id = slide_id_of(path)
        first = first_of.setdefault(slide_id, path)
        meta = find_meta(labels, path, slide_id) if labels else None
        regions = roi.get(slide_id) if isinstance(roi, dict) else roi
        jobs.append(
            _Job(slide_id, path, meta, None if first == path else first, given.get(slide_id), regions)
        )
    return jobs + [_Job(f"{folder.name}/", folder, None, None, problem=why) for folder, why in unreadable]


def tile_slides(
    paths: list[str | os.PathLike],
    out: str | os.PathLike,
    config: TileConfig | Mapping[str, Any] | None = None,
    labels_csv: str | os.PathLike | None = None,
    shard: tuple[int, int] = (0, 1),
    save_pixels: bool = False,
    qc_dir: str | os.PathLike | None = None,
    mpp_override: float | None = None,
    progress: bool = True,
    from_coords: str | os.PathLike | None = None,
    roi: str | os.PathLike | None = None,
    replace: bool = False,
) -> BatchSummary:
    """Tile the shard `shard` = (i, n) of the slides into the store `out` (created if absent).

    `config` as for `tile_slide`. `from_coords`: a folder of CLAM/TRIDENT coordinate files (pathology/interop/coords.py) whose patches
    are the tiles (`from_coords.select` says what selection runs on top); a slide without one fails.
    `roi`: a QuPath GeoJSON file, or a folder of `<slide id>.geojson`, whose annotations restrict or
    replace the tissue mask (`roi.*` settings); a slide without its file fails. `config.run.reader`: the
    slide reader (auto: OpenSlide, then tiatoolbox for formats OpenSlide does not read), recorded per slide.

    Slides done in the store from the same source (same content, even moved) and the same coordinate
    and ROI files are skipped, or, when the labels CSV or their path changed, done with only their
    record updated (detail `updated`: {field: [old, new]}). A different source under a done slide ID is
    failed and not written, unless `replace`. A bad slide is failed (in the store and the summary) and
    the rest goes on; a folder that cannot be searched is a failed item `<folder>/`. `config.run.workers`
    > 1 tiles slides in parallel processes. One unsharded writer at a time (histo.lock); shards run
    together. No slide found is a HistoError, raised before the store is created.
    Returns the BatchSummary: one Outcome per slide of this shard (detail: n_mosaic, n_selected, mpp,
    mpp_source, label).
    """
    from histo.lock import writer_lock
    from pathology.slide_labels import read_labels
    from pathology.store import TileStore

    config = fit_config(TileConfig.coerce(config))  # config errors (and the stain fit) before any work
    given: dict[str, Path] = {}
    if from_coords is not None:
        from pathology.interop.coords import find_coords_files

        given = find_coords_files(from_coords)
    regions = None
    if roi is not None:
        from pathology.interop.roi import roi_files

        if from_coords is not None:
            raise HistoError("--roi and --from-coords exclude each other (given patches are not masked)")
        regions = roi_files(roi)
    labels = read_labels(labels_csv) if labels_csv is not None else {}
    jobs = _jobs(paths, labels, given, regions)
    unlabelled = [job.id for job in select_shard(jobs, shard) if labels and job.meta is None]
    if unlabelled:
        shown = ", ".join(unlabelled[:5]) + (" ..." if len(unlabelled) > 5 else "")
        log.warning("%d slide(s) have no row in %s: %s", len(unlabelled), labels_csv, shown)
    # A store of an earlier release lacks the keys added since; their defaults reproduce what it did
    # (its recorded geometry is kept as it is, so the comparison resolves no second geometry).
    store = TileStore.create_or_open(
        out,
        store_params(config),
        complete=lambda old: {**tiling_config(old, str(out)).recorded(), RESOLVED: old.get(RESOLVED)},
    )

    def finished(job: _Job) -> dict | None:
        """The stored detail of a slide already done from the same source with the same metadata,
        else None (tiled, updated or refused by `_tile_one`)."""
        rec = _stored(store, job)
        if rec is None or rec.status != "done":
            return None
        source = _identity(job.path)
        if (
            _inputs_changed(rec, job)
            or source_change(rec.identity(), source)
            or _metadata_changes(rec, job, source)
        ):
            return None
        store.clean_partial(job.id)
        return _detail(rec)

    process = partial(
        _tile_one, out=str(out), config=config, save_pixels=save_pixels,
        qc_dir=None if qc_dir is None else str(qc_dir), mpp=mpp_override,
        from_coords=None if from_coords is None else str(from_coords),
        roi=None if roi is None else str(roi), replace=replace,
    )  # fmt: skip
    with writer_lock(store.path, "histo tile", shared=shard[1] > 1):
        outcomes = run_batch(
            jobs, process, shard=shard, is_done=finished, workers=config.run.workers, desc="tile", unit="slide",
            progress=progress, outputs=(out, qc_dir),
        )  # fmt: skip
    return BatchSummary(tuple(outcomes), out=str(out), shard=shard)
