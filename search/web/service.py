"""What `histo serve` serves: the open index, its slides, their pictures and the query jobs.

`Service` is built once at start-up; the routes (search/web/app.py) only translate requests into its
calls. A query request is checked completely (source, k, mode, the upload) before a job is queued.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from histo.errors import HistoError
from search.config import SearchConfig
from search.web import query
from search.web.archive import Archive, NotFound
from search.web.images import SlideImages, display_copy, encode
from search.web.jobs import Job, JobQueue, QuerySource, QueryTiles
from search.web.render import label_hues
from search.web.uploads import UploadRejected, decode_patch

log = logging.getLogger("histo.serve")

CACHE_DIR = ".serve-cache"  # under the index dir by default: hidden, so never one of the index's files
MAX_K = 100
MODES = ("barcode", "float")
SOURCES = ("slide", "file", "patch")
DISPLAY_PX = 1024  # long side of the copy of an uploaded patch that the page shows


@dataclass(frozen=True)
class ServeConfig:
    """Everything `histo serve` is started with (the CLI builds it; tests build it directly)."""

    index_dir: Path
    slides_root: Path | None = None
    cache_dir: Path | None = None  # None: INDEX/.serve-cache
    token: str | None = None
    max_upload_bytes: int = 16 * 2**20
    max_pixels: int = 4096 * 4096
    search: SearchConfig | None = None  # `histo search` settings; None: the defaults (configs/search.yaml)


class Service:
    """The open index and everything the pages and the API read from it."""

    def __init__(self, config: ServeConfig) -> None:
        self.config = config
        self.search_cfg = SearchConfig.coerce(config.search)
        index = query.open_index(config.index_dir, self.search_cfg)
        self.archive = Archive(index, config.slides_root)
        self.cache_dir = (config.cache_dir or config.index_dir / CACHE_DIR).resolve()
        try:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise HistoError(
                f"{self.cache_dir}: cannot create the picture cache ({e.strerror}); pass --cache-dir"
            ) from None
        self.images = SlideImages(self.archive, self.cache_dir)
        self.jobs = JobQueue(self.run, self.public)
        self.manifest = index.manifest
        self.hues = label_hues([e.label for e in self.archive.slides.values()])
        self._private = _private_prefixes(config, self.archive, self.cache_dir)

    def close(self) -> None:
        self.jobs.close()
        self.images.close()

    def public(self, message: str) -> str:
        """A message with the server's own folders removed (a client sees IDs and keys, never paths)."""
        for prefix in self._private:
            message = message.replace(prefix, "")
        return message

    # ---- queries ----------------------------------------------------------------------------------
    def new_job(self, fields: Mapping[str, Any], upload: tuple[bytes, str, str | None] | None) -> Job:
        """A checked job from form or JSON fields (source, slide_id | file, k, mode, exclude_same_patient,
        exhaustive) and an uploaded image (bytes, file name, content type); HistoError if anything is off."""
        kind = str(fields.get("source") or ("patch" if upload else "file" if fields.get("file") else "slide"))
        if kind not in SOURCES:
            raise HistoError(f"source must be one of {', '.join(SOURCES)}, got {kind!r}")
        source = self._source(kind, fields, upload)
        cfg = self.search_cfg
        patch = kind == "patch"
        return Job(
            source=source,
            k=_int_field(fields, "k", cfg.patch_k if patch else cfg.k, 1, MAX_K),
            mode=_choice_field(fields, "mode", cfg.patch_mode if patch else cfg.mode, MODES),
            exclude_same_patient=not patch
            and _bool_field(fields, "exclude_same_patient", cfg.exclude_same_patient),
            exhaustive=not patch and _bool_field(fields, "exhaustive", cfg.exhaustive),
        )

    def _source(self, kind: str, fields: Mapping[str, Any], upload: Any) -> QuerySource:
        if kind == "slide":
            entry = self.archive.slide(str(fields.get("slide_id") or ""))
            return QuerySource("slide", entry.slide_id, self.archive.slide_file(entry), entry.mpp)
        if kind == "file":
            key = str(fields.get("file") or "")
            return QuerySource("file", key, self.archive.file(key))
        if upload is None:
            raise UploadRejected("no image uploaded (field `image`)")
        data, name, content_type = upload
        name = Path(name or "upload").name[:200]
        rgb = decode_patch(data, name, content_type, self.config.max_pixels)
        size = (rgb.shape[1], rgb.shape[0])
        return QuerySource(
            "patch", name, rgb=rgb, png=encode(display_copy(rgb, DISPLAY_PX), "PNG"), size=size
        )

    def run(self, job: Job) -> None:
        """Run one query (on the job thread): tile, featurise and search, then read the crops it shows."""
        index, src = self.archive.index, job.source
        job.progress("featurising and searching")
        if src.kind == "patch":
            job.result = query.search_rgb(index, src.rgb, src.name, job.k, job.mode)
            src.rgb = None  # kept jobs hold only the display copy
        else:
            job.progress("tiling the query slide")
            tileset = query.tile_query_slide(index, src.path, src.mpp)
            rec = tileset.record
            job.tiles = QueryTiles(src.path, rec.mpp, tileset.coords[tileset.selected], rec.tile_size_level0)
            job.progress(f"featurising {len(job.tiles.coords)} tiles and searching")
            job.result = query.search_tiles(
                index, tileset, job.k, job.mode, job.exclude_same_patient, job.exhaustive
            )
        self._read_crops(job)

    def _read_crops(self, job: Job) -> None:
        """Put every crop the results page shows into the cache, so the page loads from it."""
        hits = job.result["results"]
        pairs = [(h, m) for h in hits for m in h["matches"]]
        failed: set[str] = set()
        for i, (hit, match) in enumerate(pairs):
            job.progress("reading the matched tiles from the slides", (i, len(pairs)))
            try:
                self.images.tile_crop(self.archive.slide(hit["slide_id"]), match["tile"])
                if job.tiles is not None:
                    self.query_crop(job, match["query_tile"])
            except (HistoError, OSError) as e:
                if hit["slide_id"] not in failed:
                    failed.add(hit["slide_id"])
                    job.warnings.append(self.public(str(e)))

    def query_crop(self, job: Job, tile: int) -> bytes:
        """PNG of the query slide's `tile`-th searched tile."""
        tiles = job.tiles
        if tiles is None or not 0 <= tile < len(tiles.coords):
            raise NotFound(f"query {job.id} has no tile {tile}")
        xy = (int(tiles.coords[tile][0]), int(tiles.coords[tile][1]))
        return self.images.crop(tiles.path, xy, tiles.side, tiles.mpp)

    def job(self, job_id: str) -> Job:
        job = self.jobs.get(job_id)
        if job is None:
            raise NotFound(f"no query {job_id!r} (finished queries are kept while the server runs)")
        return job


def _private_prefixes(config: ServeConfig, archive: Archive, cache_dir: Path) -> list[str]:
    """Folders whose names the client is never told, longest first (so nested ones go first)."""
    folders = {config.index_dir.resolve(), cache_dir}
    if archive.slides_root is not None:
        folders.add(archive.slides_root)
    for entry in archive.slides.values():
        folders.update(p.parent for p in (entry.path, entry.store) if p is not None)
    return sorted((f"{f}/" for f in folders), key=len, reverse=True)


def _int_field(fields: Mapping[str, Any], name: str, default: int, lo: int, hi: int) -> int:
    raw = fields.get(name)
    if raw in (None, ""):
        return int(default)
    try:
        value = int(str(raw))
    except ValueError:
        raise HistoError(f"{name} must be a whole number, got {str(raw)[:40]!r}") from None
    if not lo <= value <= hi:
        raise HistoError(f"{name} must be between {lo} and {hi}, got {value}")
    return value


def _choice_field(fields: Mapping[str, Any], name: str, default: str, choices: tuple[str, ...]) -> str:
    value = str(fields.get(name) or default)
    if value not in choices:
        raise HistoError(f"{name} must be one of {', '.join(choices)}, got {value[:40]!r}")
    return value


def _bool_field(fields: Mapping[str, Any], name: str, default: bool) -> bool:
    raw = fields.get(name)
    if raw in (None, ""):
        return bool(default)
    if isinstance(raw, bool):
        return raw
    value = str(raw).lower()
    if value not in ("1", "true", "on", "yes", "0", "false", "off", "no"):
        raise HistoError(f"{name} must be true or false, got {value[:40]!r}")
    return value in ("1", "true", "on", "yes")
