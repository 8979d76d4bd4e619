"""`SlideIndex`: build, open, search, update and evaluate a slide index directory.

Index dir (DESIGN.md "Index dir")::

    manifest.json      format version, model (hash, feature definition, dim; a registry encoder's weight file:
                       path, sha256, layout), tiling config, index type and
                       parameters (requested and effective), counts, skipped slides, sha256 of every file
    features.zarr/     per-slide tile features and coordinates (search/features.py)
    catalog.json       slides in row order: slide_id, label, patient, site, n_tiles, tile_size_level0 (the
                       tiles' side in level-0 px, to draw hits on the slide; null in older indexes)
    coords.npy         (N, 2) int64 level-0 x, y of every row (rows of a slide are contiguous)
    barcodes.faissb    FAISS binary index over the packed MinMax barcodes (Hamming): IndexBinaryFlat for a
                       flat index, IndexBinaryIVF (+ direct map) otherwise (search/barcodes.py)
    float.faiss        FAISS float index of the chosen type (search/index.py)
    model.pt           copy of the feature extractor checkpoint (when built from a histo checkpoint; an
                       encoder's weight file is recorded in the manifest, not copied)

Every structure is rebuilt from the stored features (sorted by slide ID) by `build`, `add` and `remove`,
so an updated index equals one built from scratch on the same slides.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from histo.batch import BatchSummary
from histo.errors import HistoError, InputFileError
from histo.io import atomic_path, atomic_write_json, file_sha256
from histo.lock import writer_lock
from search import features as feats_io
from search.barcodes import BITORDER, build_binary_index, code_bits, minmax_barcode, stored_codes
from search.config import IndexConfig, SearchConfig, index_params
from search.engine import Catalog, SearchEngine, SearchResult
from search.index import FloatIndex, IndexParameters, build_float_index, load_float_index
from search.kinds import float_kind
from search.manifest import MANIFEST, read_manifest, write_manifest
from search.queries import PatchQuery, SlideQuery, as_query, patch_query, slide_query

logger = logging.getLogger(__name__)

CATALOG, COORDS, BARCODES, FLOAT, MODEL = (
    "catalog.json",
    "coords.npy",
    "barcodes.faissb",
    "float.faiss",
    "model.pt",
)
CATALOG_KEYS = ("slide_id", "label", "patient", "site", "n_tiles", "tile_size_level0")
BARCODE_DEFINITION = "MinMax: bit i = f[i+1] < f[i] for i < D-1, zero-padded to a multiple of 8 bits"


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


class SlideIndex:
    """A searchable slide index directory (see the module docstring for its files)."""

    def __init__(self, path: Path, manifest: dict[str, Any], config: SearchConfig, model: Any = None) -> None:
        self.path = path
        self.config = config
        self._extractor = None
        self.extraction: BatchSummary | None = None  # the feature extraction of `build`, when built here
        self._load(manifest)
        if model is not None:
            self._extractor = self._check_model(load_extractor(model, config.run.device))

    def _load(self, manifest: dict[str, Any]) -> None:
        """Read the catalog, barcodes and float index that `manifest` describes, and the search engine."""
        import faiss

        path = self.path
        self.manifest = manifest
        slides = json.loads((path / CATALOG).read_text())["slides"]
        offsets = np.concatenate([[0], np.cumsum([s["n_tiles"] for s in slides])])
        self.catalog = Catalog(
            slide_ids=[s["slide_id"] for s in slides],
            labels=[s["label"] for s in slides],
            patients=[s["patient"] for s in slides],
            sites=[s["site"] for s in slides],
            offsets=offsets,
            coords=np.load(path / COORDS, allow_pickle=False),
            tile_sides=[s.get("tile_size_level0") for s in slides],
        )
        try:
            self.barcode_index = faiss.read_index_binary(str(path / BARCODES))
        except RuntimeError:
            raise InputFileError(path / BARCODES, "not a readable FAISS binary index") from None
        self.codes = stored_codes(self.barcode_index)
        recorded = recorded_config(path, manifest)
        parameters = IndexParameters.recorded(manifest["index"], str(path / MANIFEST))
        self.float_index: FloatIndex = load_float_index(path / FLOAT, recorded.type, parameters)
        self.float_index.vectors = lambda rows: self._features()[rows]
        self.float_index.to_device(self.config.run.device)
        self._feature_array: np.ndarray | None = None
        # The index's search defaults, unless the search config sets tile_k / stage1_tiles.
        first_stage = {f"search.{k}": getattr(self.config, k) for k in ("tile_k", "stage1_tiles")}
        self.engine = SearchEngine(
            self.catalog,
            knn={"barcode": self.barcode_index.search, "float": self.float_index.search},
            tiles={"barcode": lambda: self.codes, "float": self._features},
            settings=recorded.updated(first_stage, source="search config").search,
        )

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
        rule, grid, precision and input_px (pathology.encoders.preprocess) define the features. Returns
        the opened index, its `extraction` the
        BatchSummary of the feature extraction, or None for a shard job (run once more without a shard to
        assemble; `extract` returns the shard's summary).
        """
        config = IndexConfig.coerce(config)
        out = Path(out)
        store = _open_store(store)
        extractor = config_extractor(model, config, store.params)
        with writer_lock(out, "histo index", shared=shard[1] > 1):
            batch = feats_io.extract_features(store, extractor, out, shard, config.run.batch_size, progress)
            if shard[1] > 1:
                return None
            built_with = {"feature_device": str(extractor.device)}
            return cls._finish(out, model, extractor, batch, config, built_with)

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
        """Build the index from per-slide CLAM/TRIDENT feature files (search/feature_files.py).

        `config` as for `build`; `encoder`: the name the files must carry (needed when they carry none);
        `model`: the checkpoint that made histo's files (its hash must match theirs), so the index can
        featurise new queries.
        """
        from search.feature_files import import_feature_files

        config = IndexConfig.coerce(config)
        out = Path(out)
        with writer_lock(out, "histo index"):
            batch, info = import_feature_files(folder, out, labels_csv, encoder, progress)
            extractor = None
            if model is not None:
                extractor = load_extractor(model, config.run.device)
                if extractor.model_hash != info["hash"]:
                    raise HistoError(
                        f"{folder}: features were made by model {info['hash'][:12]}, "
                        f"not by {model} ({extractor.model_hash[:12]})"
                    )
            built_with = {"features_from": str(Path(folder).resolve())}
            return cls._finish(out, model, extractor, batch, config, built_with)

    @classmethod
    def _finish(
        cls,
        out: Path,
        model: Any,
        extractor: Any,
        batch: BatchSummary,
        config: IndexConfig,
        built_with: dict[str, Any],
    ) -> SlideIndex:
        """Copy the model file into the index (when one is a file), assemble it and open it."""
        if not isinstance(model, (str, os.PathLike)):
            (out / MODEL).unlink(missing_ok=True)
        elif not (out / MODEL).exists() or feats_io.model_info(extractor)["hash"] != file_sha256(out / MODEL):
            with atomic_path(out / MODEL) as tmp:
                shutil.copyfile(model, tmp)
        content = {
            "index": {"type": config.type, "params_requested": config.params.model_dump(mode="json")},
            "search": config.search.model_dump(mode="json"),
            "failed_slides": _failed_slides(batch),
            "built_with": built_with,
        }
        _assemble(out, content)
        index = cls.open(out, {"run": {"device": config.run.device}}, model=extractor)
        index.extraction = batch
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
        """Extract the features of the shard's slides into `out` (resumable) without building the index."""
        config = IndexConfig.coerce(config)
        store = _open_store(store)
        extractor = config_extractor(model, config, store.params)
        with writer_lock(out, "histo index", shared=shard[1] > 1):
            return feats_io.extract_features(
                store, extractor, Path(out), shard, config.run.batch_size, progress
            )

    @classmethod
    def open(
        cls,
        path: str | os.PathLike,
        config: SearchConfig | Mapping[str, Any] | None = None,
        model: Any = None,
    ) -> SlideIndex:
        """Open an index dir for searching per `config` (a SearchConfig, None for the defaults, or a mapping
        over them), verifying its manifest and the checksums of its files (`config.run.verify`)."""
        path = Path(path)
        config = SearchConfig.coerce(config)
        return cls(path, read_manifest(path, config.run.verify), config, model)

    def add(self, store: Any, batch_size: int | None = None, progress: bool = True) -> BatchSummary:
        """Extract and index the slides of `store` not in the index yet (`batch_size` None: the index
        config's `run.batch_size`); returns the extraction summary."""
        store = _open_store(store)
        run = IndexConfig.coerce().updated({"run.batch_size": batch_size}, source="batch_size").run
        with writer_lock(self.path, "SlideIndex.add"):
            batch = feats_io.extract_features(
                store, self.extractor, self.path, (0, 1), run.batch_size, progress
            )
            failed = {f["slide_id"]: f for f in self.manifest.get("failed_slides", [])} | {
                f["slide_id"]: f for f in _failed_slides(batch)
            }
            self._reassemble({"failed_slides": sorted(failed.values(), key=lambda f: f["slide_id"])})
        return batch

    def remove(self, slide_ids: list[str]) -> None:
        """Remove slides from the index (all IDs must be indexed; nothing changes otherwise)."""
        unknown = sorted(set(slide_ids) - set(self.catalog.slide_ids))
        if unknown:
            raise HistoError(f"{self.path}: not in the index: {', '.join(unknown)}")
        with writer_lock(self.path, "SlideIndex.remove"):
            (self.path / MANIFEST).unlink()
            feats_io.remove_slides(self.path / feats_io.FEATURES_DIR, list(slide_ids))
            self._reassemble({})

    def _reassemble(self, changes: dict[str, Any]) -> None:
        keep = ("index", "search", "failed_slides", "built_with")
        content = {k: self.manifest[k] for k in keep if k in self.manifest} | changes
        content["index"] = {k: content["index"][k] for k in ("type", "params_requested")}
        _assemble(self.path, content)
        self._load(read_manifest(self.path, "full"))

    # ---- model --------------------------------------------------------------------------------------
    @property
    def extractor(self) -> Any:
        """The index's feature extractor, loaded on first use: model.pt of the index, or the registry
        encoder and weight file the manifest records (`weights` of `open` if the file moved)."""
        if self._extractor is None:
            model = self.manifest["model"]
            if (self.path / MODEL).exists():
                rule = _checkpoint_rule(model["feature_definition"])
                extractor = load_extractor(self.path / MODEL, self.config.run.device, rule=rule)
            elif model.get("weights"):
                from pathology.encoders import reopen_extractor

                extractor = reopen_extractor(model, self.config.run.device, self.config.run.weights)
            else:
                raise HistoError(
                    f"{self.path}: built with an in-memory model (hash {self.model_hash[:12]}); "
                    "pass the same model to SlideIndex.open(..., model=...)"
                )
            self._extractor = self._check_model(extractor)
        return self._extractor

    @property
    def model_hash(self) -> str:
        return self.manifest["model"]["hash"]

    def _check_model(self, extractor: Any) -> Any:
        """The extractor, if it has the index's weights and feature definition; HistoError otherwise."""
        built = self.manifest["model"]
        got = feats_io.model_info(extractor)
        if got["hash"] != built["hash"]:
            raise HistoError(
                f"{self.path}: index was built with model {built['hash'][:12]} ({_encoder_label(built)}), "
                f"refusing to search with a different model ({got['hash'][:12]}, {_encoder_label(got)})"
            )
        if got["feature_definition"] != built["feature_definition"]:
            old, new = built["feature_definition"], got["feature_definition"]
            differ = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
            raise HistoError(
                f"{self.path}: index features were made by {_encoder_label(built)} under another feature "
                f"definition (differs in {', '.join(differ)}); refusing to search with it"
            )
        return extractor

    def _features(self) -> np.ndarray:
        """All rows' float features (the flat index's own storage, else loaded once from features.zarr)."""
        if self.float_index.kind.exact:
            return self.float_index.stored_vectors()
        if self._feature_array is None:
            root = self.path / feats_io.FEATURES_DIR
            self._feature_array = np.concatenate(
                [feats_io.read_slide(root, sid)[1] for sid in self.catalog.slide_ids]
            )
        return self._feature_array

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
        `name`: what the result calls the query (default: its path, its slide ID, or "patch").
        """
        options = {
            "exclude_patient": exclude_patient,
            "tile_k": tile_k,
            "stage1_tiles": stage1_tiles,
            "exhaustive": exhaustive,
        }
        q = as_query(query, name)
        if isinstance(q, SlideQuery):
            return self._search_slide(q, k, mode, "search", **options)
        given = [key for key, value in options.items() if value is not None]
        if given:
            raise HistoError(f"{q.name}: {', '.join(given)} apply to slide queries, not to a patch")
        return self._search_patch(q, k, mode, "search")

    def search_slide(
        self,
        query: Any,
        k: int | None = None,
        mode: str | None = None,
        exclude_patient: str | bool | None = None,
        exhaustive: bool | None = None,
    ) -> SearchResult:
        """`search` for a slide (path or TileSet), never read as a patch: a one-line wrapper."""
        return self._search_slide(
            slide_query(query), k, mode, "search_slide", exclude_patient, exhaustive=exhaustive
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
        allowed = self.catalog.allowed(exclude_patient or None)
        codes = minmax_barcode(f) if s.mode == "barcode" else f
        result = self.engine.search(q.name, codes, s.mode, s.k, allowed, xy, s.exhaustive, settings)
        result.info.update(self.float_index.device_info() if s.mode == "float" else {"device": "cpu"})
        result.query_slide_id, result.query_tile_size_level0 = record.slide_id, record.tile_size_level0
        return result

    def _search_patch(self, q: PatchQuery, k: int | None, mode: str | None, source: str) -> SearchResult:
        """The k nearest indexed tiles of a patch, with the config's patch_k / patch_mode for None."""
        from pathology.stain import normalize_tiles

        s = self.config.updated({"patch_k": k, "patch_mode": mode}, source=source)
        extractor = self.extractor
        f = extractor.extract(normalize_tiles(q.rgb[None], self.query_stain(), q.name))
        codes = minmax_barcode(f) if s.patch_mode == "barcode" else f
        return self.engine.nearest_tiles(q.name, codes, s.patch_mode, s.patch_k)

    def tile_query(self, path: str | os.PathLike, mpp: float | None = None) -> Any:
        """A query slide's TileSet, tiled as the index's slides were (its manifest's tiling); `mpp` is used
        only when the file has no scale of its own."""
        from pathology.tiler import tile_slide, tiling_config

        tiling = tiling_config(self.manifest["tiling"], str(self.path / MANIFEST))
        return tile_slide(path, tiling, mpp_override=mpp)

    def query_features(self, query: Any) -> tuple[np.ndarray, np.ndarray, Any]:
        """(features, level-0 coords, slide record) of a query slide's selected tiles (path or TileSet)."""
        tiles = query if not isinstance(query, (str, os.PathLike)) else self.tile_query(query)
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


def _failed_slides(batch: BatchSummary) -> list[dict[str, Any]]:
    """The manifest's record of the slides whose features failed: slide_id, status, reason."""
    return [{"slide_id": o.id, "status": o.status, "reason": o.reason} for o in batch.failed()]


def _assemble(out: Path, content: dict[str, Any]) -> None:
    """(Re)build catalog, barcodes and float index from the stored features, then write the manifest."""
    import faiss

    (out / MANIFEST).unlink(missing_ok=True)  # the index is incomplete until the manifest is back
    root = out / feats_io.FEATURES_DIR
    attrs = feats_io.read_attrs(root)
    slide_ids = feats_io.done_slides(root)
    if not slide_ids:
        raise HistoError(f"{out}: no slide has features; nothing to index")
    records, features, coords = [], [], []
    for sid in slide_ids:
        rec, f, xy = feats_io.read_slide(root, sid)
        records.append({key: rec.get(key) for key in CATALOG_KEYS})
        features.append(f)
        coords.append(xy)
    matrix = np.concatenate(features)
    del features
    logger.info("%s: indexing %d tiles of %d slides", out, len(matrix), len(records))
    with atomic_path(out / COORDS) as tmp, open(tmp, "wb") as fh:
        np.save(fh, np.concatenate(coords))
    atomic_write_json(out / CATALOG, {"slides": records})
    index_type = content["index"]["type"]
    requested = index_params(content["index"]["params_requested"], source=str(out / MANIFEST))
    groups = np.repeat(np.arange(len(records)), [r["n_tiles"] for r in records])
    barcode_kind = requested.barcode_index or float_kind(index_type).barcodes
    barcodes, barcode_params = build_binary_index(minmax_barcode(matrix), barcode_kind, requested, groups)
    with atomic_path(out / BARCODES) as tmp:
        faiss.write_index_binary(barcodes, str(tmp))
    float_index = build_float_index(matrix, index_type, requested, groups)
    float_index.save(out / FLOAT)
    content["index"]["params"] = dict(float_index.params)
    content["index"]["metric"] = "Euclidean (L2) on float features; Hamming on barcodes"
    write_manifest(
        out,
        {
            **content,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "model": attrs["model"] | {"file": MODEL if (out / MODEL).exists() else None},
            "tiling": attrs["tiling"],
            "barcode": {
                "definition": BARCODE_DEFINITION,
                "bits": int(matrix.shape[1] - 1),
                "padded_bits": code_bits(matrix.shape[1]),
                "bitorder": BITORDER,
                "index": barcode_params,
            },
            "counts": {
                "slides": len(records),
                "tiles": len(matrix),
                "failed_slides": len(content.get("failed_slides", [])),
            },
        },
        [feats_io.FEATURES_DIR, CATALOG, COORDS, BARCODES, FLOAT, MODEL],
    )
