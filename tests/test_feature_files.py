"""Per-slide feature files (CLAM/TRIDENT layout): written from a store, read back by `histo index
--features` into the same index as from the store; files made the way TRIDENT and CLAM make them index
with their encoder name and dimension checked."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from histo.cli import main
from histo.errors import HistoError
from pathology.config import TileConfig
from pathology.store import TileStore
from search import features as feats_io
from search.feature_files import write_feature_files
from search.slide_index import SlideIndex, load_extractor

CPU = {"run": {"device": "cpu"}}  # the index config of these tests: defaults, features on the CPU
TILE_OVERRIDES = {"tile.px": 32, "tile.um": 64.0, "mosaic.percent": 50.0, "cellularity.top_fraction": 1.0}


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> dict:
    from histo.config import load_config
    from pathology import tile_slides
    from pathology.kimianet import random_init_checkpoint
    from pathology.synthetic import make_cohort

    root = tmp_path_factory.mktemp("cohort")
    csv = make_cohort(root / "slides", n_classes=2, patients_per_class=2, size=(1536, 1024), seed=0)
    cfg = load_config(TileConfig, overrides=TILE_OVERRIDES)
    tile_slides([root / "slides"], root / "all.zarr", cfg, labels_csv=csv, progress=False)
    model = random_init_checkpoint(root / "model.pt", input_px=32, seed=0)
    flat = SlideIndex.build(root / "all.zarr", model, root / "flat", config=CPU, progress=False)
    return {"root": root, "store": root / "all.zarr", "model": model, "flat": flat, "csv": csv}


def _index_features(index: SlideIndex) -> dict[str, np.ndarray]:
    root = index.path / feats_io.FEATURES_DIR
    return {sid: feats_io.read_slide(root, sid)[1] for sid in index.catalog.slide_ids}


def test_files_hold_features_coords_and_the_tools_attributes(cohort, tmp_path):
    extractor = load_extractor(cohort["model"], "cpu")
    batch = write_feature_files(cohort["store"], extractor, tmp_path / "t", progress=False)
    assert batch.counts["done"] == 4
    expected = _index_features(cohort["flat"])
    for sid, feats in expected.items():
        with h5py.File(tmp_path / "t" / f"{sid}.h5", "r") as f:
            assert f["features"].dtype == np.float32 and f["coords"].dtype == np.int64
            np.testing.assert_array_equal(f["features"][...], feats)
            fa, ca = dict(f["features"].attrs), dict(f["coords"].attrs)
        assert fa["name"] == sid and fa["encoder"] == "kimianet"  # the registry entry the checkpoint trained
        assert (
            fa["histo_model_hash"] == extractor.model_hash
            and json.loads(fa["histo_tiling"])["tile"]["px"] == 32
        )
        assert int(ca["patch_size"]) == 32 and int(ca["patch_size_level0"]) == 256  # 64 µm at 0.25 µm/px
    again = write_feature_files(cohort["store"], extractor, tmp_path / "t", progress=False)
    assert again.counts["skipped"] == 4  # resumable
    clam = write_feature_files(
        cohort["store"], extractor, tmp_path / "c", layout="clam", pt=True, progress=False
    )
    assert clam.counts["done"] == 4
    for sid, feats in expected.items():
        pt = torch.load(tmp_path / "c" / "pt_files" / f"{sid}.pt", weights_only=True)
        assert isinstance(pt, torch.Tensor) and torch.equal(pt, torch.from_numpy(feats))
        assert (tmp_path / "c" / "h5_files" / f"{sid}.h5").is_file()


def test_index_from_histo_files_equals_index_from_the_store(cohort, tmp_path):
    extractor = load_extractor(cohort["model"], "cpu")
    write_feature_files(cohort["store"], extractor, tmp_path / "f", layout="clam", progress=False)
    built = SlideIndex.build_from_features(
        tmp_path / "f", tmp_path / "idx", model=cohort["model"], config=CPU, progress=False
    )
    flat = cohort["flat"]
    for index in (built, flat):  # one version each: the same catalog and coordinates files
        assert index.manifest["catalog"] == "catalog.000001.json"
    for name in ("catalog.000001.json", "coords.000001.npy"):
        assert (built.path / name).read_bytes() == (flat.path / name).read_bytes()
    store = TileStore.open(cohort["store"])
    assert flat.catalog.tile_sides == [store.record(s).tile_size_level0 for s in flat.catalog.slide_ids]
    assert built.model_hash == flat.model_hash and built.manifest["tiling"] == flat.manifest["tiling"]
    query = next(iter((cohort["root"] / "slides").glob("*.svs")))
    a, b = built.search_slide(query, k=3), flat.search_slide(query, k=3)
    assert a.to_dict()["results"] == b.to_dict()["results"]
    from pathology.kimianet import random_init_checkpoint

    other = random_init_checkpoint(tmp_path / "other.pt", input_px=32, seed=1)
    with pytest.raises(HistoError, match="features were made by model"):
        SlideIndex.build_from_features(
            tmp_path / "f", tmp_path / "x", model=other, config=CPU, progress=False
        )


def test_an_index_grows_from_more_feature_files(cohort, tmp_path):
    """`histo index --features DIR` on an existing index adds the folder's new slides, as `--tiles` does."""
    import shutil

    extractor = load_extractor(cohort["model"], "cpu")
    write_feature_files(cohort["store"], extractor, tmp_path / "all", progress=False)
    files = sorted((tmp_path / "all").glob("*.h5"))
    (tmp_path / "first").mkdir()
    for f in files[:2]:
        shutil.copy(f, tmp_path / "first" / f.name)
    out = tmp_path / "idx"
    SlideIndex.build_from_features(tmp_path / "first", out, model=cohort["model"], config=CPU, progress=False)
    args = ["index", "--features", str(tmp_path / "all"), "--out", str(out), "--device", "cpu", "--json"]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert report["counts"] == {"done": 2, "skipped": 2, "failed": 0}
    assert report["updates"][0]["op"] == "add" and len(report["updates"][0]["slide_ids"]) == 2
    grown, flat = SlideIndex.open(out), cohort["flat"]
    assert grown.catalog.slide_ids == flat.catalog.slide_ids and grown.manifest["version"] == 2
    np.testing.assert_array_equal(grown.codes, flat.codes)
    np.testing.assert_array_equal(grown._features(), flat._features())
    again = CliRunner().invoke(main, args[:-1])
    assert again.exit_code == 0 and "no new slide or change in" in again.output


def _trident_file(path: Path, name: str, feats: np.ndarray, encoder: str | None = "uni_v1") -> None:
    """As TRIDENT's save_h5 writes extract_patch_features: chunks (1, ...), attributes per dataset."""
    path.parent.mkdir(parents=True, exist_ok=True)
    coords = np.arange(2 * len(feats), dtype=np.int64).reshape(-1, 2) * 256
    with h5py.File(path, "w") as f:
        for key, val in {"features": feats, "coords": coords}.items():
            d = f.create_dataset(
                key,
                shape=val.shape,
                maxshape=(None, *val.shape[1:]),
                chunks=(1, *val.shape[1:]),
                dtype=val.dtype,
            )
            d[:] = val
        for k, v in {"name": name, "savetodir": str(path.parent), "encoder": encoder or "None"}.items():
            f["features"].attrs[k] = v
        for k, v in {"patch_size": 256, "patch_size_level0": 512, "level0_magnification": 40,
                     "target_magnification": 20, "overlap": 0, "name": name}.items():  # fmt: skip
            f["coords"].attrs[k] = v


def test_trident_and_clam_files_index_with_encoder_checks(tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / "features_uni_v1"
    for i in range(4):
        _trident_file(folder / f"S{i}.h5", f"S{i}", rng.normal(size=(5 + i, 16)).astype(np.float32))
    csv = tmp_path / "labels.csv"
    csv.write_text("slide,label,patient\nS0,A,P0\nS1,A,P1\nS2,B,P2\nS3,B,P3\n")
    idx = SlideIndex.build_from_features(
        folder, tmp_path / "i", labels_csv=csv, encoder="uni_v1", config=CPU, progress=False
    )
    assert idx.catalog.labels == ["A", "A", "B", "B"] and idx.catalog.patients == ["P0", "P1", "P2", "P3"]
    assert idx.catalog.tile_sides == [512.0] * 4  # TRIDENT's patch_size_level0: hits can be drawn
    assert (
        idx.manifest["model"]["hash"] == "external:uni_v1:16"
        and idx.manifest["counts"]["tiles"] == 5 + 6 + 7 + 8
    )
    assert idx.evaluate(k=(1,), mode="float").summary_rows()
    with pytest.raises(HistoError, match=r"made by encoder 'uni_v1', not 'conch_v15'"):
        SlideIndex.build_from_features(
            folder, tmp_path / "j", encoder="conch_v15", config=CPU, progress=False
        )
    _trident_file(folder / "S9.h5", "S9", rng.normal(size=(3, 8)).astype(np.float32))
    with pytest.raises(
        HistoError, match=r"mix encoders or models .*dim 16.*dim 8|mix encoders or models .*dim 8.*dim 16"
    ):
        SlideIndex.build_from_features(folder, tmp_path / "k", config=CPU, progress=False)
    # CLAM: h5_files/<id>.h5 with features and int32 coords, no attributes at all: --encoder names it
    for i in range(2):
        (tmp_path / "clam" / "h5_files").mkdir(parents=True, exist_ok=True)
        with h5py.File(tmp_path / "clam" / "h5_files" / f"C{i}.h5", "w") as f:
            f.create_dataset(
                "features",
                data=rng.normal(size=(4, 1024)).astype(np.float32),
                maxshape=(None, 1024),
                chunks=(32, 1024),
            )
            f.create_dataset("coords", data=np.zeros((4, 2), np.int32), maxshape=(None, 2), chunks=(32, 2))
    with pytest.raises(HistoError, match="do not name their encoder; pass --encoder"):
        SlideIndex.build_from_features(tmp_path / "clam", tmp_path / "l", config=CPU, progress=False)
    clam = SlideIndex.build_from_features(
        tmp_path / "clam", tmp_path / "m", encoder="resnet50_trunc", config=CPU, progress=False
    )
    assert clam.manifest["model"]["hash"] == "external:resnet50_trunc:1024" and clam.catalog.slide_ids == [
        "C0",
        "C1",
    ]
    assert clam.catalog.tile_sides == [None, None]  # no attributes: the side is unknown, not guessed


def test_a_bad_file_fails_alone(tmp_path):
    rng = np.random.default_rng(1)
    folder = tmp_path / "f"
    for i in range(2):
        _trident_file(folder / f"S{i}.h5", f"S{i}", rng.normal(size=(3, 8)).astype(np.float32))
    (folder / "broken.h5").write_bytes(b"not hdf5")
    with h5py.File(folder / "nan.h5", "w") as f:
        f.create_dataset("features", data=np.full((2, 8), np.nan, np.float32)).attrs["encoder"] = "uni_v1"
        f.create_dataset("coords", data=np.zeros((2, 2), np.int64))
    idx = SlideIndex.build_from_features(folder, tmp_path / "i", encoder="uni_v1", config=CPU, progress=False)
    failed = {o.id: o.reason for o in idx.extraction.failed()}
    assert set(failed) == {"broken", "nan"} and "not a readable HDF5 file" in failed["broken"]
    assert "NaN or inf" in failed["nan"] and idx.catalog.slide_ids == ["S0", "S1"]
    assert {f["slide_id"] for f in idx.manifest["failed_slides"]} == {"broken", "nan"}


def test_cli_features_then_index(cohort, tmp_path):
    runner = CliRunner()
    res = runner.invoke(main, ["features", "--tiles", str(cohort["store"]), "--model", str(cohort["model"]),
                               "--out", str(tmp_path / "f"), "--device", "cpu", "--pt"])  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "4 done, 0 skipped, 0 failed" in res.output and len(list((tmp_path / "f").glob("*.pt"))) == 4
    res = runner.invoke(
        main, ["index", "--features", str(tmp_path / "f"), "--out", str(tmp_path / "i"), "--device", "cpu"]
    )
    assert res.exit_code == 0, res.output
    assert "4 slides" in res.output
    res = runner.invoke(
        main,
        [
            "index",
            "--features",
            str(tmp_path / "f"),
            "--tiles",
            str(cohort["store"]),
            "--out",
            str(tmp_path / "j"),
        ],
    )
    assert res.exit_code == 2 and "exactly one of --tiles STORE or --features DIR" in res.output
