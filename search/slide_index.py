"""`SlideIndex`: build, open, search, grow and evaluate a slide index directory.

Index dir (DESIGN.md "Index dir"; version v is the manifest's `version`)::

    manifest.json           format version, model (hash, feature definition, dim; a registry encoder's
                            weight file: path, sha256, layout), tiling config, index type and parameters
                            (requested and effective), counts, the files of version v and their sha256,
                            what the quantizers were trained on (`training`), the growth since (`growth`),
                            every change (`history`); replaced atomically by each update
    features.zarr/          per-slide tile features and coordinates (search/features.py)
    catalog.<v>.json        slides in row order (slide ID order): slide_id, label, patient, site, project,
                            n_tiles, tile_size_level0 (the tiles' side in level-0 px, to draw hits on the
                            slide; null in older indexes), first (storage id of its first row)
    coords.<v>.npy          parts: (n, 2) int64 level-0 x, y of the rows a version added
    barcodes.<v>.faissb     parts of the FAISS binary index over the packed MinMax barcodes (Hamming):
                            IndexBinaryFlat for a flat index, IndexBinaryIVF otherwise (search/barcodes.py)
    float.<v>.faiss         parts of the FAISS float index of the chosen type (search/index.py)
    trained.<v>.faiss(b)    the trained, empty float / barcode IVF indexes new parts are made from
    model.pt                copy of the feature extractor checkpoint (when built from a histo checkpoint;
                            an encoder's weight file is recorded in the manifest, not copied)
    .lock                   the writer lock (histo/lock.py)

A build trains and calibrates every structure (search/growth.py); adding slides later appends parts to the
trained structures and removing slides drops them from the catalog, each as a new version, so searches of
an opened index never see half an update. Opened, the parts are assembled in slide-ID order
(search/storage.py): a grown flat index equals a fresh build on the same slides.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from histo.batch import BatchSummary
from histo.errors import HistoError, InputFileError
from histo.io import atomic_path, file_sha256
from histo.lock import writer_lock
from search import features as feats_io
from search.barcodes import BarcodeIndex, minmax_barcode, stored_codes
from search.config import IndexConfig, SearchConfig
from search.drift import Drift, check_drift
from search.engine import Catalog, SearchEngine, SearchResult
from search.filters import recorded_where, where_of
from search.growth import (
    MODEL,
    Update,
    add_extracted,
    build_version,
    last_update,
    read_catalog,
    remove_slides,
    retrain,
    structure_kind,
    writing,
)
from search.index import FloatIndex, IndexParameters, new_faiss_index, set_search_parameter
from search.manifest import MANIFEST, Verified, read_manifest
from search.queries import PatchQuery, SlideQuery, as_query, file_query, patch_query, slide_query
from search.storage import BARCODES, COORDS, FLOAT, assemble, parts_of, read_coords, row_map

logger = logging.getLogger(__name__)

OPEN_ATTEMPTS = 3  # an update switching versions while an index opens makes it start over, this often


def _open_store(store: Any) -> Any:
    from pathology.store import TileStore

    return store if isinstance(store, TileStore) else TileStore.open(store)


def load_extractor(
    model: Any,
    device: str,
    encoder: str | None = None,
    weights: str | os.PathLike | None = None,
    rule: dict[str, Any] | None = None,
    tiling: dict[str, Any] | None = None,
) -> Any:
    """The feature extractor of a histo checkpoint (`model`), of a registry encoder with its weight file,
    or an extractor passed as is: the one place that builds it. `rule`: tile_rule, grid, precision,
    input_px (None: the defaults); `tiling`: the tile store's parameters (for the grid rule)."""
    from pathology.encoders import FeatureExtractor, open_extractor
    from pathology.kimianet import FeatureExtractor as CheckpointExtractor

    rule = {k: v for k, v in (rule or {}).items() if v is not None}
    if encoder is not None:
        if model is not None:
            raise HistoError("give a histo checkpoint (--model) or an encoder with its weights, not both")
        if weights is None:
            raise HistoError(
                f"encoder {encoder!r} needs its weight file (--weights FILE; see `histo encoders`)"
            )
        return open_extractor(encoder, weights, device, tiling=tiling, **rule)
    if weights is not None:
        raise HistoError("--weights goes with --encoder NAME; a histo checkpoint is given as --model")
    if model is None:
        raise HistoError("no feature extractor: give --model CKPT or --encoder NAME --weights FILE")
    if isinstance(model, FeatureExtractor):
        return model
    if "input_px" in rule:
        raise HistoError("input_px applies to registry encoders; a histo checkpoint has its own")
    return CheckpointExtractor.from_checkpoint(model, device=device, **rule)


def _checkpoint_rule(definition: dict[str, Any]) -> dict[str, Any]:
    """The tile rule and precision of a checkpoint extractor, from the feature definition it recorded."""
    rule = definition.get("tile_rule", {"rule": "resize"})
    grid = rule.get("crops_per_side") if rule["rule"] == "grid" else None
    return {"tile_rule": rule["rule"], "grid": grid, "precision": definition.get("precision", "float32")}


def _encoder_label(model: dict[str, Any]) -> str:
    """'encoder uni, weights 1a2b3c4d5e6f' (or the arch of a histo checkpoint) for messages."""
    definition = model["feature_definition"]
    name = definition.get("encoder") or f"histo {definition.get('arch')} checkpoint"
    return f"{name}, weights {model['hash'][:12]}"


def config_extractor(model: Any, config: IndexConfig, tiling: dict[str, Any] | None = None) -> Any:
    """The extractor an IndexConfig names: `model`, or its registry `encoder` and `weights`, with its rule."""
    rule = {k: getattr(config, k) for k in ("tile_rule", "grid", "precision", "input_px")}
    return load_extractor(model, config.run.device, config.encoder, config.weights, rule, tiling)


def recorded_config(path: Path, manifest: Mapping[str, Any]) -> IndexConfig:
    """The IndexConfig an index was built with (type, requested params, search defaults), validated."""
    index = manifest["index"]
    recorded = {
        "type": index["type"],
        "params": index["params_requested"],
        "search": manifest.get("search", {}),
    }
    return IndexConfig.coerce(recorded, source=str(path / MANIFEST))


def check_request(path: Path, manifest: Mapping[str, Any], config: IndexConfig) -> None:
    """Refuse a config that asks for another index than the one `path` holds (type, params and search
    values set away from the defaults and different from the recorded ones): slides are added to the index
    as it was built."""
    have = recorded_config(path, manifest)
    defaults = IndexConfig.coerce()
    for section in ("type", "params", "search"):
        asked, default, held = (_flat(getattr(c, section), section) for c in (config, defaults, have))
        for key, value in asked.items():
            if value != default[key] and value != held[key]:
                raise HistoError(
                    f"{path}: an existing index with {key}={held[key]!r}; adding slides keeps it, so "
                    f"{key}={value!r} needs a new --out"
                )


def _flat(value: Any, prefix: str) -> dict[str, Any]:
    if not hasattr(value, "model_dump"):
        return {prefix: value}
    return {f"{prefix}.{k}": v for k, v in value.model_dump(mode="json").items()}


class SlideIndex:
    """A searchable slide index directory (see the module docstring for its files)."""

    def __init__(
        self,
        path: Path,
        manifest: dict[str, Any],
        config: SearchConfig,
        model: Any = None,
        verified: Verified | None = None,
    ) -> None:
        self.path = path
        self._verified: Verified = {} if verified is None else verified  # files hashed (read_manifest)
        self.config = config
        self._extractor = None
        self.extraction: BatchSummary | None = None  # the feature extraction of `build`, when built here
        self.update: Update | None = None  # the last change this object made (build, add, remove, retrain)
        self._load(manifest)
        if model is not None:
            self._extractor = check_model(path, manifest, load_extractor(model, config.run.device))

    def _load(self, manifest: dict[str, Any]) -> None:
        """Assemble the catalog, coordinates, barcodes and float index of the manifest's version in memory
        (so later updates never change what this object searches), and the search engine."""
        path = self.path
        self.manifest = manifest
        slides = read_catalog(path, manifest)
        rows = row_map(slides, manifest["storage_rows"])
        parts = {role: parts_of(manifest["parts"][role]) for role in (COORDS, BARCODES, FLOAT)}
        self.catalog = Catalog(
            slide_ids=[s["slide_id"] for s in slides],
            labels=[s["label"] for s in slides],
            patients=[s["patient"] for s in slides],
            sites=[s["site"] for s in slides],
            offsets=np.concatenate([[0], np.cumsum([s["n_tiles"] for s in slides])]),
            coords=read_coords(path, parts[COORDS], rows),
            projects=[s.get("project") for s in slides],
            tile_sides=[s.get("tile_size_level0") for s in slides],
        )
        barcode_kind, binary, _ = self._structure(BARCODES, parts, rows)
        if barcode_kind.tunes is not None:
            value = manifest["barcode"]["index"][barcode_kind.tunes.key]
            set_search_parameter(binary, barcode_kind.tunes, value)
        self.barcodes = BarcodeIndex(barcode_kind, binary, stored_codes(binary))
        recorded = recorded_config(path, manifest)
        kind, index, tombstones = self._structure(FLOAT, parts, rows)
        parameters = IndexParameters.recorded(manifest["index"], str(path / MANIFEST))
        self.float_index = FloatIndex(kind, index, parameters, tombstones=tombstones)
        self.float_index.vectors = lambda rows: self._features()[rows]
        self.float_index.base = self._features
        self.float_index.to_device(self.config.run.device)
        # Kinds that store lossy codes read their features now: a later removal deletes the files.
        self._feature_array: np.ndarray | None = None
        if not kind.exact and self.float_index.row_vectors() is None:
            self._feature_array = self._stored_features()
        # The index's search defaults, unless the search config sets tile_k / stage1_tiles.
        first_stage = {f"search.{k}": getattr(self.config, k) for k in ("tile_k", "stage1_tiles")}
        self.engine = SearchEngine(
            self.catalog,
            knn={"barcode": self.barcodes.search, "float": self.float_index.search},
            tiles={"barcode": lambda: self.barcodes.codes, "float": self._features},
            settings=recorded.updated(first_stage, source="search config").search,
        )

    def _structure(self, role: str, parts: Mapping[str, Any], rows: Any) -> tuple[Any, Any, int]:
        """(kind, canonical FAISS index, tombstones) of the barcode or float structure."""
        kind, params, dim = structure_kind(self.manifest, role)
        index, tombstones = assemble(
            self.path, parts[role], rows, kind.binary, lambda: new_faiss_index(kind, params, dim)
        )
        return kind, index, tombstones

    @property
    def codes(self) -> np.ndarray:
        """Every row's packed barcode (row order)."""
        return self.barcodes.codes

    # ---- construction -------------------------------------------------------------------------------
    @classmethod
    def build(
        cls,
        store: Any,
        model: Any,
        out: str | os.PathLike,
        config: IndexConfig | Mapping[str, Any] | None = None,
        shard: tuple[int, int] = (0, 1),
        progress: bool = True,
    ) -> SlideIndex | None:
        """Extract features (resumable) and build the index in `out`; with shard (i, n > 1) only extract.

        `model` is a checkpoint path (copied into the index as model.pt) or a FeatureExtractor; None with
        the config's registry `encoder` and its `weights` file (recorded by path and sha256, not copied).
        `config`: an IndexConfig, None (the defaults) or a mapping over the defaults, e.g. {"type": "ivf",
        "encoder": "uni", "weights": "pytorch_model.bin"}; its type, params, search and the encoder's tile
        rule, grid, precision and input_px (pathology.encoders.preprocess) define the features. When `out`
        already holds an index, the store's new slides are added to it without retraining (`grow`; `model`
        None then means the index's own extractor, and a config asking for another type or parameters is
        refused). Returns the opened index, its `extraction` the BatchSummary of the feature extraction
        and `update` what changed, or None for a shard job (run once more without a shard to
        assemble; `extract` returns the shard's summary).
        """
        config = IndexConfig.coerce(config)
        out = Path(out)
        store = _open_store(store)
        if shard[1] > 1:
            cls.extract(store, model, out, config, shard, progress)
            return None
        with writing(out, "histo index"):
            extractor = index_extractor(out, model, config, store.params)
            if (out / MANIFEST).exists():
                batch, update = grow(store, extractor, out, config, progress)
            else:
                batch = feats_io.extract_features(
                    store, extractor, out, shard, config.run.batch_size, progress, config.run.verify_features
                )
                built_with = {"feature_device": str(extractor.device)}
                update = _first_version(out, model, extractor, batch, config, built_with)
        index = cls.open(out, {"run": {"device": config.run.device}}, model=extractor)
        index.extraction, index.update = batch, update
        return index

    @classmethod
    def build_from_features(
        cls,
        folder: str | os.PathLike,
        out: str | os.PathLike,
        config: IndexConfig | Mapping[str, Any] | None = None,
        labels_csv: str | os.PathLike | None = None,
        encoder: str | None = None,
        model: Any = None,
        progress: bool = True,
    ) -> SlideIndex:
        """Build the index from per-slide CLAM/TRIDENT feature files (search/feature_files.py), or add the
        folder's new slides to the index already in `out` (without retraining, as `build` does).

        `config` as for `build`; `encoder`: the name the files must carry (needed when they carry none);
        `model`: the checkpoint that made histo's files (its hash must match theirs), so the index can
        featurise new queries.
        """
        from search.feature_files import import_feature_files

        config = IndexConfig.coerce(config)
        out = Path(out)
        with writing(out, "histo index"):
            existing = (out / MANIFEST).exists()
            if existing:
                check_request(out, read_manifest(out, "none"), config)
            batch, info = import_feature_files(folder, out, labels_csv, encoder, progress)
            extractor = None
            if model is not None:
                extractor = load_extractor(model, config.run.device)
                if extractor.model_hash != info["hash"]:
                    raise HistoError(
                        f"{folder}: features were made by model {info['hash'][:12]}, "
                        f"not by {model} ({extractor.model_hash[:12]})"
                    )
            if existing:
                update = add_extracted(out, config.update, _failed_slides(batch), **_refreshed(batch))
            else:
                built_with = {"features_from": str(Path(folder).resolve())}
                update = _first_version(out, model, extractor, batch, config, built_with)
        index = cls.open(out, {"run": {"device": config.run.device}}, model=extractor)
        index.extraction, index.update = batch, update
        return index

    @classmethod
    def extract(
        cls,
        store: Any,
        model: Any,
        out: str | os.PathLike,
        config: IndexConfig | Mapping[str, Any] | None = None,
        shard: tuple[int, int] = (0, 1),
        progress: bool = True,
    ) -> BatchSummary:
        """Extract the features of the shard's slides into `out` (resumable) without building the index
        (`model` None on an existing index: its own extractor). --shard runs share the writer lock."""
        config = IndexConfig.coerce(config)
        store = _open_store(store)
        extractor = index_extractor(Path(out), model, config, store.params)
        with writer_lock(out, "histo index", shared=shard[1] > 1):
            return feats_io.extract_features(
                store,
                extractor,
                Path(out),
                shard,
                config.run.batch_size,
                progress,
                config.run.verify_features,
            )

    @classmethod
    def open(
        cls,
        path: str | os.PathLike,
        config: SearchConfig | Mapping[str, Any] | None = None,
        model: Any = None,
    ) -> SlideIndex:
        """Open an index dir for searching per `config` (a SearchConfig, None for the defaults, or a mapping
        over them), verifying its manifest and the checksums of its files (`config.run.verify`). The
        opened object keeps the version it read, whatever updates come later; an update switching versions
        while it opens makes it read the new version."""
        path = Path(path)
        config = SearchConfig.coerce(config)
        for attempt in range(OPEN_ATTEMPTS):
            version = _current_version(path)
            verified: Verified = {}
            try:
                return cls(path, read_manifest(path, config.run.verify, verified), config, model, verified)
            except (InputFileError, FileNotFoundError) as e:
                if attempt + 1 == OPEN_ATTEMPTS or _current_version(path) in (None, version):
                    if isinstance(e, FileNotFoundError):  # not an update under way: the index is broken
                        raise InputFileError(e.filename, "index file missing") from None
                    raise
                logger.info("%s: updated while opening; reading the new version", path)
        raise AssertionError("unreachable")

    def add(
        self,
        store: Any,
        batch_size: int | None = None,
        progress: bool = True,
        verify_features: str | None = None,
    ) -> BatchSummary:
        """Extract the slides of `store` not in the index yet and add them to the trained structures
        (no retraining; `batch_size` and `verify_features` (quick | full) None: the index config's `run`
        values); returns the extraction summary, and `update` says what changed. This object then
        searches the new version."""
        store = _open_store(store)
        overrides = {"run.batch_size": batch_size, "run.verify_features": verify_features}
        run = IndexConfig.coerce().updated(overrides, source="SlideIndex.add").run
        with writing(self.path, "SlideIndex.add"):
            batch = feats_io.extract_features(
                store, self.extractor, self.path, (0, 1), run.batch_size, progress, run.verify_features
            )
            self.update = add_extracted(self.path, failed=_failed_slides(batch), **_refreshed(batch))
        self._reload()
        return batch

    def remove(self, slide_ids: Sequence[str]) -> Update:
        """Remove slides from the index (all IDs must be indexed; nothing changes otherwise); this object
        then searches the new version."""
        self.update = remove_slides(self.path, list(slide_ids))
        self._reload()
        return self.update

    def retrain(self) -> Update:
        """Rebuild every structure from the stored features (training, calibration) as a new version."""
        self.update = retrain(self.path)
        self._reload()
        return self.update

    def drift(self, update: Mapping[str, Any] | None = None) -> Drift:
        """The drift check (search/drift.py): recall on the held-out calibration slides, list imbalance,
        tombstones, and whether to retrain; `update`: the index config's `update` section over defaults."""
        return check_drift(self, IndexConfig.section("update", update))

    def _reload(self) -> None:
        """Load the index's current version, hashing only the files this object has not verified yet."""
        self._load(read_manifest(self.path, self.config.run.verify, self._verified))

    # ---- model --------------------------------------------------------------------------------------
    @property
    def extractor(self) -> Any:
        """The index's feature extractor, loaded on first use: model.pt of the index, or the registry
        encoder and weight file the manifest records (`weights` of `open` if the file moved)."""
        if self._extractor is None:
            self._extractor = recorded_extractor(
                self.path, self.manifest, self.config.run.device, self.config.run.weights
            )
        return self._extractor

    @property
    def model_hash(self) -> str:
        return self.manifest["model"]["hash"]

    def _features(self) -> np.ndarray:
        """All rows' float features: the flat index's own storage, else read back from the index once
        (IVF-Flat, HNSW-Flat), else read from features.zarr when the index opened (lossy codes)."""
        if self.float_index.kind.exact:
            return self.float_index.stored_vectors()
        if self._feature_array is None:
            self._feature_array = self.float_index.row_vectors()
        return self._feature_array

    def _stored_features(self) -> np.ndarray:
        root = self.path / feats_io.FEATURES_DIR
        return np.concatenate([feats_io.read_slide(root, sid)[1] for sid in self.catalog.slide_ids])

    # ---- search -------------------------------------------------------------------------------------
    def search(
        self,
        query: Any,
        k: int | None = None,
        *,
        mode: str | None = None,
        exclude_patient: str | bool | None = None,
        tile_k: int | None = None,
        stage1_tiles: int | None = None,
        exhaustive: bool | None = None,
        name: str | None = None,
        where: Mapping[str, Any] | Sequence[str] | None = None,
    ) -> SearchResult:
        """Search the index with a slide or a patch (search/queries.py decides which).

        A slide (a slide file path or a TileSet) is tiled and featurised like the index and ranks indexed
        slides by the two-stage search; a patch (an image file path or an RGB uint8 (H, W, 3) array at
        the index's tile resolution) returns its nearest indexed tiles. Arguments left None take the
        search config's value (`k`, `mode`, or `patch_k`, `patch_mode` for a patch; `exclude_same_patient`,
        `tile_k`, `stage1_tiles`, `exhaustive`), and given ones are validated like it. `exclude_patient`:
        a patient ID, or True for the query's own patient (TCGA: first 12 characters). `tile_k`,
        `stage1_tiles`: the first stage (see SearchEngine; the index's defaults unless set); `exhaustive`:
        skip it and compare every indexed slide (exact, slower). These four apply to slides only.
        `name`: what the result calls the query (default: its path, its slide ID, or "patch"). `where`:
        only slides passing this filter are returned (search/filters.py: {"site": ["A", "B"], "label":
        "X"} or clauses ["site=A,B", "label=X"]); the search stays exact within it.

        A query file goes through `search.queries.file_query`, as in `histo search`: a patch file is
        checked against the index's tile (declared pixels, field of view) before it is decoded, a slide
        without a scale is tiled at the config's `query.mpp`; `info["query"]` records what was applied.
        """
        options = {
            "exclude_patient": exclude_patient,
            "tile_k": tile_k,
            "stage1_tiles": stage1_tiles,
            "exhaustive": exhaustive,
        }
        checked = None
        if isinstance(query, (str, os.PathLike)):
            name = name or os.fspath(query)
            query, checked = file_query(self, os.fspath(query), self.config.query)
        q = as_query(query, name)
        if isinstance(q, SlideQuery):
            result = self._search_slide(q, k, mode, "search", **options, where=where)
        else:
            given = [key for key, value in options.items() if value is not None]
            if given:
                raise HistoError(f"{q.name}: {', '.join(given)} apply to slide queries, not to a patch")
            result = self._search_patch(q, k, mode, "search", where)
        if checked is not None:
            result.info["query"] = checked
        return result

    def search_slide(
        self,
        query: Any,
        k: int | None = None,
        mode: str | None = None,
        exclude_patient: str | bool | None = None,
        exhaustive: bool | None = None,
        where: Mapping[str, Any] | Sequence[str] | None = None,
    ) -> SearchResult:
        """`search` for a slide (path or TileSet), never read as a patch; a path is tiled as `search`
        tiles a query slide (the config's `query.mpp` where it has no scale of its own)."""
        if isinstance(query, (str, os.PathLike)):
            q = slide_query(self.tile_query(query, self.config.query.mpp), os.fspath(query))
        else:
            q = slide_query(query)
        return self._search_slide(
            q, k, mode, "search_slide", exclude_patient, exhaustive=exhaustive, where=where
        )

    def search_patch(self, rgb: np.ndarray, k: int | None = None, mode: str | None = None) -> SearchResult:
        """`search` for an RGB patch array: a one-line wrapper."""
        return self._search_patch(patch_query(rgb), k, mode, "search_patch")

    def _search_slide(
        self,
        q: SlideQuery,
        k: int | None,
        mode: str | None,
        source: str,
        exclude_patient: str | bool | None = None,
        tile_k: int | None = None,
        stage1_tiles: int | None = None,
        exhaustive: bool | None = None,
        where: Mapping[str, Any] | Sequence[str] | None = None,
    ) -> SearchResult:
        """The two-stage slide search with the config's values for the arguments left None."""
        first_stage = {"tile_k": tile_k, "stage1_tiles": stage1_tiles}
        s = self.config.updated(
            {"k": k, "mode": mode, "exhaustive": exhaustive, **first_stage}, source=source
        )
        settings = self.engine.settings.model_copy(
            update={key: value for key, value in first_stage.items() if value is not None}
        )
        if exclude_patient is None:
            exclude_patient = s.exclude_same_patient or None
        f, xy, record = self.query_features(q.source)
        if exclude_patient is True:
            exclude_patient = self.query_patient(record)
            if exclude_patient is None:
                raise HistoError(f"{q.name}: patient of the query is unknown; cannot exclude it")
        filter_ = where_of(where)
        allowed = self.catalog.allowed(exclude_patient or None, filter_)
        codes = minmax_barcode(f) if s.mode == "barcode" else f
        result = self.engine.search(q.name, codes, s.mode, s.k, allowed, xy, s.exhaustive, settings)
        result.info.update(self.float_index.device_info() if s.mode == "float" else {"device": "cpu"})
        result.query_slide_id, result.query_tile_size_level0 = record.slide_id, record.tile_size_level0
        return _with_filter(result, filter_, allowed)

    def _search_patch(
        self, q: PatchQuery, k: int | None, mode: str | None, source: str, where: Any = None
    ) -> SearchResult:
        """The k nearest indexed tiles of a patch, with the config's patch_k / patch_mode for None."""
        from pathology.stain import normalize_tiles

        s = self.config.updated({"patch_k": k, "patch_mode": mode}, source=source)
        filter_ = where_of(where)
        allowed = self.catalog.allowed(None, filter_)
        f = self.extractor.extract(normalize_tiles(q.rgb[None], self.query_stain(), q.name))
        codes = minmax_barcode(f) if s.patch_mode == "barcode" else f
        result = self.engine.nearest_tiles(q.name, codes, s.patch_mode, s.patch_k, allowed)
        return _with_filter(result, filter_, allowed)

    def tile_query(self, path: str | os.PathLike, mpp: float | None = None) -> Any:
        """A query slide's TileSet, tiled as the index's slides were (its manifest's tiling); `mpp` is used
        only when the file has no scale of its own."""
        from pathology.tiler import tile_slide, tiling_config

        tiling = tiling_config(self.manifest["tiling"], str(self.path / MANIFEST))
        return tile_slide(path, tiling, mpp_override=mpp)

    def query_features(self, tiles: Any) -> tuple[np.ndarray, np.ndarray, Any]:
        """(features, level-0 coords, slide record) of a query slide's selected tiles (its TileSet)."""
        pixels = tiles.read_tiles("selected")
        if len(pixels) == 0:
            raise InputFileError(tiles.record.source_path, "no selected tiles in the query slide")
        return self.extractor.extract(pixels), tiles.coords[tiles.selected], tiles.record

    def query_stain(self) -> Any:
        """The stain normalization of the archive's tiles (its tiling's `stain`), which queries get too."""
        from pathology.tiler import tiling_config

        return tiling_config(self.manifest["tiling"], str(self.path / MANIFEST)).stain

    def query_patient(self, record: Any) -> str | None:
        """The query's patient: the index's record when the same slide ID is indexed, else the tiler's
        (TCGA barcode -> first 12 characters; otherwise the slide is its own patient)."""
        pos = self.catalog.position.get(record.slide_id)
        return (
            self.catalog.patients[pos] if pos is not None and self.catalog.patients[pos] else record.patient
        )

    def evaluate(
        self,
        k: tuple[int, ...] | None = None,
        mode: str | None = None,
        out_dir: str | os.PathLike | None = None,
        strategy: str | None = None,
    ) -> Any:
        """Leave-one-patient-out evaluation (search/evaluate.py: every slide ranked unless `strategy` is
        two-stage; an exhaustive run counts where the two-stage differs); PNGs and JSON in `out_dir`.
        `k`, `mode`, `strategy` None: the index config's `evaluate` section."""
        from search.evaluate import evaluate_engine

        overrides = {"evaluate.k": k, "evaluate.mode": mode, "evaluate.strategy": strategy}
        ev = IndexConfig.coerce().updated(overrides, source="evaluate").evaluate
        return evaluate_engine(self.engine, ks=ev.k, mode=ev.mode, out_dir=out_dir, strategy=ev.strategy)

    def __len__(self) -> int:
        return len(self.catalog)


def grow(
    store: Any,
    model: Any,
    out: str | os.PathLike,
    config: IndexConfig | Mapping[str, Any] | None = None,
    progress: bool = True,
) -> tuple[BatchSummary, Update | None]:
    """Add the slides of `store` that the index in `out` lacks, and the changes of those it has (new
    labels, patient or site; features extracted anew for a slide tiled anew), to the trained structures
    (search/growth.py) without opening the index. `model`: a checkpoint path or a FeatureExtractor (its
    hash must be the index's), None for the index's own; a `config` asking for another index type or other
    parameters than `out` was built with is refused. Returns (extraction summary, the update or None)."""
    config = IndexConfig.coerce(config)
    out, store = Path(out), _open_store(store)
    with writing(out, "histo index"):
        check_request(out, read_manifest(out, "none"), config)
        extractor = index_extractor(out, model, config, store.params)
        batch = feats_io.extract_features(
            store, extractor, out, (0, 1), config.run.batch_size, progress, config.run.verify_features
        )
        return batch, add_extracted(out, config.update, _failed_slides(batch), **_refreshed(batch))


def index_extractor(out: Path, model: Any, config: IndexConfig, tiling: dict[str, Any]) -> Any:
    """The extractor that adds slides to `out`: `model` or the config's encoder (the stored features'
    model must be the same: search/features.py refuses another), else the index's own."""
    if not (out / MANIFEST).exists() or model is not None or config.encoder is not None:
        return config_extractor(model, config, tiling)
    return recorded_extractor(out, read_manifest(out, "none"), config.run.device, config.weights)


def recorded_extractor(path: Path, manifest: Mapping[str, Any], device: str, weights: Any = None) -> Any:
    """The extractor an index records: its model.pt, or its registry encoder's weight file (`weights`:
    where that file is now, if it moved)."""
    model = manifest["model"]
    if (path / MODEL).exists():
        rule = _checkpoint_rule(model["feature_definition"])
        extractor = load_extractor(path / MODEL, device, rule=rule)
    elif model.get("weights"):
        from pathology.encoders import reopen_extractor

        extractor = reopen_extractor(model, device, weights)
    else:
        raise HistoError(
            f"{path}: built with an in-memory model (hash {model['hash'][:12]}); give the same model "
            "(--model, or SlideIndex.open(..., model=...))"
        )
    return check_model(path, manifest, extractor)


def check_model(path: Path, manifest: Mapping[str, Any], extractor: Any) -> Any:
    """The extractor, if it has the index's weights and feature definition; HistoError otherwise."""
    built = manifest["model"]
    got = feats_io.model_info(extractor)
    if got["hash"] != built["hash"]:
        raise HistoError(
            f"{path}: index was built with model {built['hash'][:12]} ({_encoder_label(built)}), "
            f"refusing to search with a different model ({got['hash'][:12]}, {_encoder_label(got)})"
        )
    if got["feature_definition"] != built["feature_definition"]:
        old, new = built["feature_definition"], got["feature_definition"]
        differ = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
        raise HistoError(
            f"{path}: index features were made by {_encoder_label(built)} under another feature "
            f"definition (differs in {', '.join(differ)}); refusing to search with it"
        )
    return extractor


def _refreshed(batch: BatchSummary) -> dict[str, list[str]]:
    """The slides whose stored features this run wrote (`extracted`) or relabelled (`relabelled`): the
    indexed ones among them get their new rows or their new labels in the next version."""
    done = [o for o in batch.outcomes if o.status == "done"]
    return {
        "extracted": [o.id for o in done if not o.detail.get("updated")],
        "relabelled": [o.id for o in done if o.detail.get("updated")],
    }


def _failed_slides(batch: BatchSummary) -> list[dict[str, Any]]:
    """The manifest's record of the slides whose features failed: slide_id, status, reason."""
    return [{"slide_id": o.id, "status": o.status, "reason": o.reason} for o in batch.failed()]


def _with_filter(result: SearchResult, where: Mapping[str, Any], allowed: np.ndarray | None) -> SearchResult:
    """Record a filtered search's filter and how many slides it allowed in the result's `search` info."""
    if where:
        result.info.update(where=recorded_where(where), allowed_slides=int(np.count_nonzero(allowed)))
    return result


def _first_version(
    out: Path,
    model: Any,
    extractor: Any,
    batch: BatchSummary,
    config: IndexConfig,
    built_with: dict[str, Any],
) -> Update:
    """Copy the model file into the index (when one is a file) and build version 1 from every slide with
    stored features."""
    _copy_model(model, extractor, out)
    content = {
        "index": {"type": config.type, "params_requested": config.params.model_dump(mode="json")},
        "search": config.search.model_dump(mode="json"),
        "failed_slides": _failed_slides(batch),
        "built_with": built_with,
    }
    slides = feats_io.done_slides(out / feats_io.FEATURES_DIR)
    if not slides:
        raise HistoError(f"{out}: no slide has features; nothing to index")
    return last_update(build_version(out, content, slides, None))


def _copy_model(model: Any, extractor: Any, out: Path) -> None:
    """Copy a checkpoint file into the index as model.pt (an in-memory model or an encoder leaves none)."""
    if not isinstance(model, (str, os.PathLike)):
        (out / MODEL).unlink(missing_ok=True)
    elif not (out / MODEL).exists() or feats_io.model_info(extractor)["hash"] != file_sha256(out / MODEL):
        with atomic_path(out / MODEL) as tmp:
            shutil.copyfile(model, tmp)


def _current_version(path: Path) -> int | None:
    """The version the index's manifest names now (None when unreadable)."""
    try:
        return json.loads((path / MANIFEST).read_text()).get("version")
    except (OSError, ValueError):
        return None
