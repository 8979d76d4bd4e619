"""`SlideIndex`: build, open, search, update and evaluate a slide index directory.

Index dir (DESIGN.md "Index dir")::

    manifest.json      format version, model (hash, feature definition, dim; a registry encoder's weight file:
                       path, sha256, layout), tiling config, index type and
                       parameters (requested and effective), counts, skipped slides, sha256 of every file
    features.zarr/     per-slide tile features and coordinates (search/features.py)
    catalog.json       slides in row order: slide_id, label, patient, site, n_tiles
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
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from histo.errors import HistoError, InputFileError
from histo.io import atomic_path, atomic_write_json, file_sha256
from search import features as feats_io
from search.barcodes import BITORDER, build_binary_index, code_bits, minmax_barcode, stored_codes
from search.engine import MODES, Catalog, SearchEngine, SearchResult, SlideHit, TileMatch, vote_of
from search.index import DEFAULT_PARAMS, INDEX_TYPES, FloatIndex, build_float_index, load_float_index
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


def _load_extractor(
    model: Any,
    device: str,
    encoder: str | None = None,
    weights: str | os.PathLike | None = None,
    rule: dict[str, Any] | None = None,
    tiling: dict[str, Any] | None = None,
) -> Any:
    """A FeatureExtractor from a histo checkpoint (`model`), a registry encoder with its weight file, or
    an extractor passed as is. `rule`: tile_rule, grid, precision, input_px (None: the defaults)."""
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


class SlideIndex:
    """A searchable slide index directory (see the module docstring for its files)."""

    def __init__(
        self,
        path: Path,
        manifest: dict[str, Any],
        device: str = "auto",
        model: Any = None,
        weights: str | os.PathLike | None = None,
    ) -> None:
        import faiss

        self.path = path
        self._weights = weights  # where the encoder's weight file is now, if it moved
        self.manifest = manifest
        self.device = device
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
        if model is not None:
            self._extractor = self._check_model(_load_extractor(model, device))
        search_cfg = manifest.get("search", {})
        self.engine = SearchEngine(
            self.catalog,
            knn={"barcode": self.barcode_index.search, "float": self.float_index.search},
            tiles={"barcode": lambda: self.codes, "float": self._features},
            tile_k=search_cfg.get("tile_k"),
            stage1_tiles=int(search_cfg.get("stage1_tiles", 32)),
            n_matches=int(search_cfg.get("n_matches", 5)),
        )

    # ---- construction -------------------------------------------------------------------------------
    @classmethod
    def build(
        cls,
        store: Any,
        model: Any = None,
        out: str | os.PathLike | None = None,
        index_type: str = "flat",
        device: str = "auto",
        shard: tuple[int, int] = (0, 1),
        params: dict[str, Any] | None = None,
        batch_size: int = 32,
        search: dict[str, Any] | None = None,
        progress: bool = True,
        encoder: str | None = None,
        weights: str | os.PathLike | None = None,
        tile_rule: str = "resize",
        grid: int | None = None,
        precision: str | None = None,
        input_px: int | None = None,
    ) -> SlideIndex | None:
        """Extract features (resumable) and build the index in `out`; with shard (i, n > 1) only extract.

        The feature extractor is `model` (a histo checkpoint path, copied into the index as model.pt, or a
        FeatureExtractor), or a registry `encoder` with its `weights` file (recorded by path and sha256,
        not copied). `tile_rule` (resize | grid, `grid` crops per side), `precision` and `input_px`
        define how tiles become features (pathology.encoders.preprocess).
        Returns the opened index, or None for a shard job (run once more without a shard to assemble).
        """
        if out is None:
            raise HistoError("SlideIndex.build needs `out`, the index directory")
        if index_type not in INDEX_TYPES:
            raise HistoError(f"unknown index type {index_type!r} (choose from {', '.join(INDEX_TYPES)})")
        unknown = set(params or {}) - set(DEFAULT_PARAMS)
        if unknown:
            raise HistoError(f"unknown index parameters: {', '.join(sorted(unknown))}")
        out = Path(out)
        store = _open_store(store)
        rule = {"tile_rule": tile_rule, "grid": grid, "precision": precision, "input_px": input_px}
        extractor = _load_extractor(model, device, encoder, weights, rule, store.params)
        out.mkdir(parents=True, exist_ok=True)
        summary = feats_io.extract_features(store, extractor, out, shard, batch_size, progress)
        if shard[1] > 1:
            return None
        if not isinstance(model, (str, os.PathLike)):
            (out / MODEL).unlink(missing_ok=True)
        elif not (out / MODEL).exists() or feats_io.model_info(extractor)["hash"] != file_sha256(out / MODEL):
            with atomic_path(out / MODEL) as tmp:
                shutil.copyfile(model, tmp)
        content = {
            "index": {"type": index_type, "params_requested": dict(params or {})},
            "search": {"tile_k": None, "stage1_tiles": 32, "n_matches": 5, **(search or {})},
            "failed_slides": summary["failed"],
            "built_with": {"feature_device": str(extractor.device)},
        }
        _assemble(out, content)
        return cls.open(out, device=device, model=extractor)

    @classmethod
    def open(
        cls,
        path: str | os.PathLike,
        device: str = "auto",
        model: Any = None,
        verify: str = "full",
        weights: str | os.PathLike | None = None,
    ) -> SlideIndex:
        """Open an index dir, verifying its manifest and the checksums of its files (`verify`).

        `weights`: the encoder's weight file when it is no longer where the index recorded it.
        """
        path = Path(path)
        return cls(path, read_manifest(path, verify), device, model, weights)

    def add(self, store: Any, batch_size: int = 32, progress: bool = True) -> dict[str, Any]:
        """Extract and index the slides of `store` not in the index yet; returns the extraction summary."""
        store = _open_store(store)
        summary = feats_io.extract_features(store, self.extractor, self.path, (0, 1), batch_size, progress)
        failed = {f["slide_id"]: f for f in self.manifest.get("failed_slides", [])} | {
            f["slide_id"]: f for f in summary["failed"]
        }
        self._reassemble({"failed_slides": sorted(failed.values(), key=lambda f: f["slide_id"])})
        return summary

    def remove(self, slide_ids: list[str]) -> None:
        """Remove slides from the index (all IDs must be indexed; nothing changes otherwise)."""
        unknown = sorted(set(slide_ids) - set(self.catalog.slide_ids))
        if unknown:
            raise HistoError(f"{self.path}: not in the index: {', '.join(unknown)}")
        (self.path / MANIFEST).unlink()
        feats_io.remove_slides(self.path / feats_io.FEATURES_DIR, list(slide_ids))
        self._reassemble({})

    def _reassemble(self, changes: dict[str, Any]) -> None:
        keep = ("index", "search", "failed_slides", "built_with")
        content = {k: self.manifest[k] for k in keep if k in self.manifest} | changes
        content["index"] = {k: content["index"][k] for k in ("type", "params_requested")}
        _assemble(self.path, content)
        extractor = self._extractor
        self.__init__(self.path, read_manifest(self.path, "full"), self.device, None, self._weights)
        self._extractor = extractor

    # ---- model --------------------------------------------------------------------------------------
    @property
    def extractor(self) -> Any:
        """The index's feature extractor, loaded on first use: model.pt of the index, or the registry
        encoder and weight file the manifest records (`weights` of `open` if the file moved)."""
        if self._extractor is None:
            model = self.manifest["model"]
            if (self.path / MODEL).exists():
                rule = _checkpoint_rule(model["feature_definition"])
                extractor = _load_extractor(self.path / MODEL, self.device, rule=rule)
            elif model.get("weights"):
                from pathology.encoders import reopen_extractor

                extractor = reopen_extractor(model, self.device, self._weights)
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
        from pathology.tiler import tile_slide

        if isinstance(query, (str, os.PathLike)):
            name = str(query)
            query = tile_slide(query, self.manifest["tiling"])
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
        k: int = 5,
        mode: str = "barcode",
        exclude_patient: str | bool | None = None,
        exhaustive: bool = False,
    ) -> SearchResult:
        """Rank indexed slides for a query slide (file path or TileSet) by the two-stage search.

        `exclude_patient`: a patient ID, or True for the query's own patient (TCGA: first 12 characters).
        `exhaustive`: skip the first stage and compare every indexed slide (exact, slower).
        """
        if mode not in MODES:
            raise HistoError(f"unknown search mode {mode!r} (barcode, float)")
        name, f, xy, record = self.query_features(query)
        if exclude_patient is True:
            exclude_patient = self.query_patient(record)
            if exclude_patient is None:
                raise HistoError(f"{name}: patient of the query is unknown; cannot exclude it")
        allowed = self.catalog.allowed(exclude_patient or None)
        q = minmax_barcode(f) if mode == "barcode" else f
        result = self.engine.search(name, q, mode, k, allowed, xy, exhaustive)
        result.info.update(self.float_index.device_info() if mode == "float" else {"device": "cpu"})
        return result

    def search_patch(self, rgb: np.ndarray, k: int = 10, mode: str = "float") -> SearchResult:
        """Top-k indexed tiles for one RGB patch (H, W, 3) uint8 at the index's tile resolution."""
        if mode not in MODES:
            raise HistoError(f"unknown search mode {mode!r} (barcode, float)")
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
        self, k: tuple[int, ...] = (1, 3, 5), mode: str = "barcode", out_dir: str | os.PathLike | None = None
    ) -> Any:
        """Leave-one-patient-out evaluation (search/evaluate.py); PNGs and JSON written to `out_dir`."""
        from search.evaluate import evaluate_engine

        return evaluate_engine(self.engine, ks=tuple(k), mode=mode, out_dir=out_dir)

    def __len__(self) -> int:
        return len(self.catalog)


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
    requested = content["index"]["params_requested"]
    groups = np.repeat(np.arange(len(records)), [r["n_tiles"] for r in records])
    barcode_kind = requested.get("barcode_index") or ("flat" if index_type == "flat" else "ivf")
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
