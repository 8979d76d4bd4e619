"""`SlideIndex`: build, open, search, update and evaluate a slide index directory.

Index dir (DESIGN.md "Index dir")::

    manifest.json      format version, model (hash, feature definition, dim), tiling config, index type and
                       parameters (requested and effective), counts, skipped slides, sha256 of every file
    features.zarr/     per-slide tile features and coordinates (search/features.py)
    catalog.json       slides in row order: slide_id, label, patient, site, n_tiles
    coords.npy         (N, 2) int64 level-0 x, y of every row (rows of a slide are contiguous)
    barcodes.faissb    FAISS binary index over the packed MinMax barcodes (Hamming): IndexBinaryFlat for a
                       flat index, IndexBinaryIVF (+ direct map) otherwise (search/barcodes.py)
    float.faiss        FAISS float index of the chosen type (search/index.py)
    model.pt           copy of the feature extractor checkpoint (when built from a file)

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
from search.engine import Catalog, SearchEngine, SearchResult, SlideHit, TileMatch, vote_of
from search.index import FloatIndex, build_float_index, load_float_index
from search.manifest import MANIFEST, read_manifest, write_manifest

logger = logging.getLogger(__name__)

CATALOG, COORDS, BARCODES, FLOAT, MODEL = (
    "catalog.json",
    "coords.npy",
    "barcodes.faissb",
    "float.faiss",
    "model.pt",
)
BARCODE_DEFINITION = "MinMax: bit i = f[i+1] < f[i] for i < D-1, zero-padded to a multiple of 8 bits"


def _open_store(store: Any) -> Any:
    from pathology.store import TileStore

    return store if isinstance(store, TileStore) else TileStore.open(store)


def _load_extractor(model: Any, device: str) -> Any:
    from pathology.kimianet import FeatureExtractor

    if isinstance(model, FeatureExtractor):
        return model
    return FeatureExtractor.from_checkpoint(model, device=device)


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
        import faiss

        self.path = path
        self.manifest = manifest
        self.config = config
        device = config.run.device
        self.index_type = manifest["index"]["type"]
        slides = json.loads((path / CATALOG).read_text())["slides"]
        offsets = np.concatenate([[0], np.cumsum([s["n_tiles"] for s in slides])])
        self.catalog = Catalog(
            slide_ids=[s["slide_id"] for s in slides],
            labels=[s["label"] for s in slides],
            patients=[s["patient"] for s in slides],
            sites=[s["site"] for s in slides],
            offsets=offsets,
            coords=np.load(path / COORDS, allow_pickle=False),
        )
        try:
            self.barcode_index = faiss.read_index_binary(str(path / BARCODES))
        except RuntimeError:
            raise InputFileError(path / BARCODES, "not a readable FAISS binary index") from None
        self.codes = stored_codes(self.barcode_index)
        self.float_index: FloatIndex = load_float_index(
            path / FLOAT, self.index_type, manifest["index"]["params"]
        )
        self.float_index.vectors = lambda rows: self._features()[rows]
        self.float_index.to_device(device)
        self._feature_array: np.ndarray | None = None
        self._extractor = None
        self.extraction: BatchSummary | None = None  # the feature extraction of `build`, when built here
        if model is not None:
            self._extractor = self._check_model(_load_extractor(model, device))
        # The index's search defaults, unless the search config sets tile_k / stage1_tiles.
        first_stage = {f"search.{k}": getattr(config, k) for k in ("tile_k", "stage1_tiles")}
        self.engine = SearchEngine(
            self.catalog,
            knn={"barcode": self.barcode_index.search, "float": self.float_index.search},
            tiles={"barcode": lambda: self.codes, "float": self._features},
            settings=recorded_config(path, manifest).updated(first_stage, source="search config").search,
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

        `model` is a checkpoint path (copied into the index as model.pt) or a FeatureExtractor. `config`:
        an IndexConfig, None (the defaults) or a mapping over the defaults, e.g. {"type": "ivf"}; its
        type, params and search go into the manifest. Returns the opened index, its `extraction` the
        BatchSummary of the feature extraction, or None for a shard job (run once more without a shard to
        assemble; `extract` returns the shard's summary).
        """
        config = IndexConfig.coerce(config)
        out = Path(out)
        extractor = _load_extractor(model, config.run.device)
        store = _open_store(store)
        with writer_lock(out, "histo index", shared=shard[1] > 1):
            batch = feats_io.extract_features(store, extractor, out, shard, config.run.batch_size, progress)
            if shard[1] > 1:
                return None
            if not isinstance(model, (str, os.PathLike)):
                (out / MODEL).unlink(missing_ok=True)
            elif not (out / MODEL).exists() or feats_io.model_info(extractor)["hash"] != file_sha256(
                out / MODEL
            ):
                with atomic_path(out / MODEL) as tmp:
                    shutil.copyfile(model, tmp)
            content = {
                "index": {"type": config.type, "params_requested": config.params.model_dump(mode="json")},
                "search": config.search.model_dump(mode="json"),
                "failed_slides": _failed_slides(batch),
                "built_with": {"feature_device": str(extractor.device)},
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
        extractor = _load_extractor(model, config.run.device)
        store = _open_store(store)
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
        extractor = self._extractor
        self.__init__(self.path, read_manifest(self.path, "full"), self.config, None)
        self._extractor = extractor

    # ---- model --------------------------------------------------------------------------------------
    @property
    def extractor(self) -> Any:
        """The index's feature extractor (model.pt of the index, loaded on first use)."""
        if self._extractor is None:
            if not (self.path / MODEL).exists():
                raise HistoError(
                    f"{self.path}: built with an in-memory model (hash {self.model_hash[:12]}); "
                    "pass the same model to SlideIndex.open(..., model=...)"
                )
            self._extractor = self._check_model(_load_extractor(self.path / MODEL, self.config.run.device))
        return self._extractor

    @property
    def model_hash(self) -> str:
        return self.manifest["model"]["hash"]

    def _check_model(self, extractor: Any) -> Any:
        if extractor.model_hash != self.model_hash:
            raise HistoError(
                f"{self.path}: index was built with model {self.model_hash[:12]}, "
                f"refusing to search with a different model ({extractor.model_hash[:12]})"
            )
        return extractor

    def _features(self) -> np.ndarray:
        """All rows' float features (the flat index's own storage, else loaded once from features.zarr)."""
        if self.index_type == "flat":
            return self.float_index.stored_vectors()
        if self._feature_array is None:
            root = self.path / feats_io.FEATURES_DIR
            self._feature_array = np.concatenate(
                [feats_io.read_slide(root, sid)[1] for sid in self.catalog.slide_ids]
            )
        return self._feature_array

    # ---- search -------------------------------------------------------------------------------------
    def query_features(self, query: Any) -> tuple[str, np.ndarray, np.ndarray, Any]:
        """(name, features, level-0 coords, slide record) of a query slide path or a TileSet."""
        from pathology.tiler import tile_slide, tiling_config

        if isinstance(query, (str, os.PathLike)):
            name = str(query)
            query = tile_slide(query, tiling_config(self.manifest["tiling"], str(self.path / MANIFEST)))
        else:
            name = query.record.slide_id
        tiles = query.read_tiles("selected")
        if len(tiles) == 0:
            raise InputFileError(name, "no selected tiles in the query slide")
        return name, self.extractor.extract(tiles), query.coords[query.selected], query.record

    def query_patient(self, record: Any) -> str | None:
        """The query's patient: the index's record when the same slide ID is indexed, else the tiler's
        (TCGA barcode -> first 12 characters; otherwise the slide is its own patient)."""
        pos = self.catalog.position.get(record.slide_id)
        return (
            self.catalog.patients[pos] if pos is not None and self.catalog.patients[pos] else record.patient
        )

    def search_slide(
        self,
        query: Any,
        k: int | None = None,
        mode: str | None = None,
        exclude_patient: str | bool | None = None,
        exhaustive: bool | None = None,
    ) -> SearchResult:
        """Rank indexed slides for a query slide (file path or TileSet) by the two-stage search.

        Arguments left None take the search config's value (`k`, `mode`, `exclude_same_patient`,
        `exhaustive`), and given ones are validated like it. `exclude_patient`: a patient ID, or True for
        the query's own patient (TCGA: first 12 characters). `exhaustive`: skip the first stage and compare
        every indexed slide (exact, slower).
        """
        s = self.config.updated({"k": k, "mode": mode, "exhaustive": exhaustive}, source="search_slide")
        if exclude_patient is None:
            exclude_patient = s.exclude_same_patient or None
        name, f, xy, record = self.query_features(query)
        if exclude_patient is True:
            exclude_patient = self.query_patient(record)
            if exclude_patient is None:
                raise HistoError(f"{name}: patient of the query is unknown; cannot exclude it")
        allowed = self.catalog.allowed(exclude_patient or None)
        q = minmax_barcode(f) if s.mode == "barcode" else f
        result = self.engine.search(name, q, s.mode, s.k, allowed, xy, s.exhaustive)
        result.info.update(self.float_index.device_info() if s.mode == "float" else {"device": "cpu"})
        return result

    def search_patch(self, rgb: np.ndarray, k: int | None = None, mode: str | None = None) -> SearchResult:
        """Top-k indexed tiles for one RGB patch (H, W, 3) uint8 at the index's tile resolution (`k`,
        `mode` None: the search config's `patch_k`, `patch_mode`)."""
        s = self.config.updated({"patch_k": k, "patch_mode": mode}, source="search_patch")
        k, mode = s.patch_k, s.patch_mode
        rgb = np.asarray(rgb)
        if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
            raise HistoError(f"a patch must be uint8 (H, W, 3), got {rgb.dtype} {rgb.shape}")
        f = self.extractor.extract(rgb[None])
        q = minmax_barcode(f) if mode == "barcode" else f
        dist, rows = self.engine.knn[mode](q, k)
        cat = self.catalog
        hits = []
        for d, row in zip(dist[0], rows[0], strict=True):
            if row < 0:
                continue
            s = int(cat.row_slide[row])
            tile = int(row - cat.offsets[s])
            match = TileMatch(0, None, tile, [int(v) for v in cat.coords[row]], float(d))
            hits.append(SlideHit(cat.slide_ids[s], cat.labels[s], float(d), [match]))
        return SearchResult("patch", vote_of(hits), hits, {"mode": mode})

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
        records.append({key: rec.get(key) for key in ("slide_id", "label", "patient", "site", "n_tiles")})
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
    barcode_kind = requested.barcode_index or ("flat" if index_type == "flat" else "ivf")
    barcodes, barcode_params = build_binary_index(minmax_barcode(matrix), barcode_kind, requested, groups)
    with atomic_path(out / BARCODES) as tmp:
        faiss.write_index_binary(barcodes, str(tmp))
    float_index = build_float_index(matrix, index_type, requested, groups)
    float_index.save(out / FLOAT)
    content["index"]["params"] = {k: v for k, v in float_index.params.items()}
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
