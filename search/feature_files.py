"""Per-slide feature files in the layout CLAM and TRIDENT use, written from a tile store and read back
into a slide index (`histo features`, `histo index --features DIR`).

One `.h5` per slide with two datasets of one row per tile:
    features (N, D) float32   attributes (TRIDENT's): name, savetodir, encoder; histo adds
                              histo_model_hash, histo_feature_definition (JSON), histo_tiling (JSON of the
                              store's parameters) and the slide's label, patient, site
    coords (N, 2) int64       level-0 x, y of each tile, with TRIDENT's patching attributes
                              (patch_size, patch_size_level0, level0/target magnification, ...)
Layouts: trident -> OUT/<id>.h5 (and OUT/<id>.pt), TRIDENT's `features_<encoder>/` folder;
clam -> OUT/h5_files/<id>.h5 and OUT/pt_files/<id>.pt, what CLAM's MIL training reads (`.pt`: the
features as a float32 torch tensor). Reading accepts both, from histo, TRIDENT or CLAM. Files made by
other tools carry no histo model hash: an index built from them is identified by encoder name and
dimension (`external:<encoder>:<dim>`) and is searched with stored features, not with new query slides.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from histo.batch import BatchSummary, Outcome, run_batch
from histo.errors import HistoError, InputFileError
from pathology.geometry import TileGeometry
from pathology.interop.coords import trident_attrs
from pathology.interop.h5 import h5_shapes, read_h5, write_h5
from pathology.store import slide_id_problem

LAYOUTS = ("trident", "clam")
CLAM_H5, CLAM_PT = "h5_files", "pt_files"


def encoder_name(extractor: Any) -> str:
    """The encoder's name written to `features.attrs['encoder']` (its registry name when it has one)."""
    definition = extractor.feature_definition
    return str(getattr(extractor, "name", None) or definition.get("encoder") or definition["arch"])


def feature_paths(out: str | os.PathLike, slide_id: str, layout: str) -> tuple[Path, Path]:
    """(.h5, .pt) paths of a slide's features in a layout."""
    out = Path(out)
    if layout == "clam":
        return out / CLAM_H5 / f"{slide_id}.h5", out / CLAM_PT / f"{slide_id}.pt"
    return out / f"{slide_id}.h5", out / f"{slide_id}.pt"


def _write_slide(
    store: Any, slide_id: str, extractor: Any, out: Path, layout: str, pt: bool, batch_size: int
) -> Outcome:
    rec = store.record(slide_id)
    coords = store.coords(slide_id)[store.selected(slide_id)]
    if len(coords) == 0:
        return Outcome.failed(slide_id, rec.source_path, "no selected tiles")
    feats = extractor.extract_store(store, slide_id, batch_size=batch_size)
    h5_path, pt_path = feature_paths(out, slide_id, layout)
    feature_attrs = {
        "name": slide_id,
        "savetodir": str(h5_path.parent),
        "encoder": encoder_name(extractor),
        "histo_model_hash": extractor.model_hash,
        "histo_feature_definition": extractor.feature_definition,
        "histo_tiling": store.params,
        "histo_tile_size_level0": rec.tile_size_level0,
        "label": rec.label,
        "patient": rec.patient,
        "site": rec.site,
    }
    target_mpp = TileGeometry.recorded(store.params, str(store.path)).mpp
    coords_attrs = trident_attrs(rec, target_mpp, str(h5_path.parent))
    write_h5(
        h5_path, {"features": feats, "coords": coords}, {"features": feature_attrs, "coords": coords_attrs}
    )
    if pt:
        import torch

        from histo.io import atomic_torch_save

        atomic_torch_save(torch.from_numpy(feats), pt_path)
    return Outcome.done(slide_id, rec.source_path, file=str(h5_path), n_tiles=len(coords))


def write_feature_files(
    store: Any,
    extractor: Any,
    out: str | os.PathLike,
    layout: str = "trident",
    pt: bool = False,
    shard: tuple[int, int] = (0, 1),
    batch_size: int = 32,
    progress: bool = True,
) -> BatchSummary:
    """Features of every done slide's selected tiles, one file per slide (resumable: a slide whose .h5
    exists with the same model hash is skipped)."""
    from pathology.store import TileStore

    if layout not in LAYOUTS:
        raise HistoError(f"unknown feature layout {layout!r} (choose from {', '.join(LAYOUTS)})")
    store = store if isinstance(store, TileStore) else TileStore.open(store)
    slide_ids = store.slide_ids()
    if not slide_ids:
        raise HistoError(f"{store.path}: no tiled slide (status done); nothing to extract")
    out = Path(out)

    def done(item: _Item) -> dict | None:
        h5_path, pt_path = feature_paths(out, item.id, layout)
        if not h5_path.exists() or (pt and not pt_path.exists()):
            return None
        try:
            _, attrs = read_h5(h5_path, ())
        except InputFileError:
            return None
        return (
            {"file": str(h5_path)}
            if attrs.get("features", {}).get("histo_model_hash") == extractor.model_hash
            else None
        )

    items = [_Item(sid, store.record(sid).source_path) for sid in slide_ids]
    outcomes = run_batch(
        items, lambda item: _write_slide(store, item.id, extractor, out, layout, pt, batch_size),
        shard=shard, is_done=done, desc="features", unit="slide", progress=progress,
    )  # fmt: skip
    return BatchSummary(tuple(outcomes), out=str(out), shard=shard)


@dataclass(frozen=True)
class _Item:
    id: str
    path: str | None


def _text(attrs: dict, key: str) -> str | None:
    """A string attribute, None for absent, empty or TRIDENT's 'None'."""
    value = attrs.get(key)
    return value if isinstance(value, str) and value not in ("", "None") else None


@dataclass(frozen=True)
class FeatureFile:
    """What identifies one slide's feature file (histo, TRIDENT or CLAM), read without its data."""

    id: str
    path: Path
    n: int
    dim: int
    attrs: dict[str, Any]  # of the features dataset
    coords_attrs: dict[str, Any]

    @property
    def encoder(self) -> str | None:
        return _text(self.attrs, "encoder")


def find_feature_files(folder: str | os.PathLike) -> list[Path]:
    """The .h5 files of a features folder: TRIDENT's flat `features_<encoder>/` or CLAM's `h5_files/`."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputFileError(folder, "not a folder of feature files")
    files = sorted(folder.glob("*.h5")) or sorted((folder / CLAM_H5).glob("*.h5"))
    if not files:
        raise InputFileError(folder, f"no .h5 feature files here or in {CLAM_H5}/")
    return files


def inspect_feature_file(path: str | os.PathLike) -> FeatureFile:
    """Shapes and attributes of a feature file: `features` (N, D) and `coords` (N, 2), N > 0."""
    path = Path(path)
    shapes = h5_shapes(path)
    missing = [n for n in ("features", "coords") if n not in shapes]
    if missing:
        raise InputFileError(path, f"no {' and '.join(missing)} dataset (not a CLAM/TRIDENT feature file)")
    fs, cs = shapes["features"], shapes["coords"]
    if len(fs) != 2 or fs[0] == 0:
        raise InputFileError(path, f"features must be a non-empty (N, D) array, got shape {fs}")
    if cs != (fs[0], 2):
        raise InputFileError(path, f"coords {cs} do not match features {fs} (need (N, 2))")
    _, attrs = read_h5(path, ())
    fa = attrs.get("features", {})
    slide_id = _text(fa, "name") or path.stem
    problem = slide_id_problem(slide_id)
    if problem:
        raise InputFileError(path, problem)
    return FeatureFile(slide_id, path, fs[0], fs[1], fa, attrs.get("coords", {}))


def tile_side(f: FeatureFile) -> float | None:
    """The patches' side in level-0 px: histo's exact value, else from the coords attributes (CLAM's or
    TRIDENT's); None when they do not tell it (CLAM without `downsample` needs the slide, not at hand)."""
    from pathology.interop.coords import patch_side_level0

    exact = f.attrs.get("histo_tile_size_level0")
    if isinstance(exact, float):
        return exact
    try:
        return patch_side_level0(f.coords_attrs, f.path, None)[1]
    except InputFileError:
        return None


def read_features(f: FeatureFile) -> tuple[np.ndarray, np.ndarray]:
    """(features float32, coords int64) of a file, checked finite and whole."""
    data, _ = read_h5(f.path, ("features", "coords"))
    feats, coords = data["features"], data["coords"]
    if not np.issubdtype(feats.dtype, np.floating) or not np.isfinite(feats).all():
        raise InputFileError(f.path, f"features must be finite floats ({feats.dtype}, NaN or inf found)")
    if not (np.issubdtype(coords.dtype, np.integer) or np.array_equal(coords, np.round(coords))):
        raise InputFileError(f.path, "coords must be whole level-0 pixel positions")
    return feats.astype(np.float32), coords.astype(np.int64)


def _json_attr(attrs: dict, key: str) -> Any:
    value = _text(attrs, key)
    return json.loads(value) if value is not None else None


def model_of(files: list[FeatureFile], encoder: str | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """(model info, tiling) shared by every file; HistoError when they mix encoders, dimensions or
    histo models, or differ from the `encoder` the user expects."""
    kinds = {(f.encoder, f.dim, _text(f.attrs, "histo_model_hash")) for f in files}
    if len(kinds) > 1:
        shown = "; ".join(
            f"encoder {e}, dim {d}, model {(h or '-')[:12]}" for e, d, h in sorted(kinds, key=str)
        )
        raise HistoError(f"{files[0].path.parent}: feature files mix encoders or models ({shown})")
    (name, dim, model_hash), first = kinds.pop(), files[0]
    if encoder is not None and name is not None and name != encoder:
        raise HistoError(f"{first.path}: features were made by encoder {name!r}, not {encoder!r}")
    name = name or encoder
    if model_hash is None:
        if name is None:
            raise HistoError(f"{first.path}: the files do not name their encoder; pass --encoder NAME")
        model = {
            "hash": f"external:{name}:{dim}",
            "feature_definition": {"encoder": name},
            "feature_dim": dim,
        }
        return model, {"source": "feature files", "coords": first.coords_attrs}
    definition = _json_attr(first.attrs, "histo_feature_definition")
    model = {"hash": model_hash, "feature_definition": definition, "feature_dim": dim}
    return model, _json_attr(first.attrs, "histo_tiling") or {"source": "feature files"}


def import_feature_files(
    folder: str | os.PathLike,
    index_dir: str | os.PathLike,
    labels_csv: str | os.PathLike | None = None,
    encoder: str | None = None,
    progress: bool = True,
) -> tuple[BatchSummary, dict[str, Any]]:
    """Read a folder of feature files into `index_dir`'s features group (search/features.py layout).

    Every readable file must come from one encoder (and dimension, and histo model when histo made them);
    an unreadable file fails alone. Labels come from `labels_csv` (slide,label[,patient,site]), else from
    histo's attributes. Returns the import's BatchSummary and the model info.
    """
    from pathology.slide_labels import SlideMeta, find_meta, read_labels, resolve_meta
    from search import features as feats_io

    labels = read_labels(labels_csv) if labels_csv is not None else {}
    good: list[FeatureFile] = []
    bad: list[Outcome] = []
    for p in find_feature_files(folder):
        try:
            good.append(inspect_feature_file(p))
        except InputFileError as e:
            bad.append(Outcome.failed(p.stem, p, e.reason))
    if not good:
        raise HistoError(f"{folder}: no readable feature file ({bad[0].path}: {bad[0].reason})")
    seen: dict[str, Path] = {}
    for f in good:
        if seen.setdefault(f.id, f.path) != f.path:
            raise HistoError(f"{f.path}: slide {f.id!r} also has features in {seen[f.id]}")
    model, tiling = model_of(good, encoder)
    root = feats_io.open_features(index_dir, model, tiling)
    existing = set(feats_io.done_slides(root))

    def write(f: FeatureFile) -> Outcome:
        feats, coords = read_features(f)
        stored = SlideMeta(_text(f.attrs, "label"), _text(f.attrs, "patient"), _text(f.attrs, "site"))
        meta = resolve_meta(find_meta(labels, f.path, f.id) or stored, f.id)
        record = {
            "slide_id": f.id, "label": meta.label, "patient": meta.patient, "site": meta.site,
            "n_tiles": len(feats), "tile_size_level0": tile_side(f), "store": str(f.path.resolve()),
        }  # fmt: skip
        feats_io.write_slide(root, record, feats, coords)
        return Outcome.done(f.id, f.path, n_tiles=len(feats))

    outcomes = run_batch(
        good, write, is_done=lambda f: {} if f.id in existing else None,
        desc="import features", unit="slide", progress=progress,
    )  # fmt: skip
    return BatchSummary((*outcomes, *bad), out=str(index_dir)), model
