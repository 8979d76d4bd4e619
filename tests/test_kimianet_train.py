"""KimiaNet training: feature extractor, variant freezing, augmentation, data split, loop, resume, re-runs,
non-finite training, bad input."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import SHARED_DATA
from skimage.color import hed2rgb, rgb2hed

from histo import checkpoint
from histo.classification import MACRO_F1_DEFINITION, VOTE_DEFINITION
from histo.cli import main
from histo.config import load_config
from histo.devices import DistInfo
from histo.errors import HistoError, InputFileError
from histo.training import Run, TrainingDiverged, output_paths
from pathology.augment import augment, hed_jitter, hed_to_rgb, normalize, resize, rgb_to_hed, to_tensor
from pathology.config import TrainConfig
from pathology.data import EpochSampler, TileDataset, split_patients
from pathology.kimianet import FeatureExtractor, build_model, random_init_checkpoint
from pathology.store import SlideRecord, TileStore
from pathology.train import KimiaNetTask, train_kimianet

CPU = DistInfo(0, 1, 0, torch.device("cpu"))
CMU = SHARED_DATA / "wsi" / "CMU-1-Small-Region.svs"
PX = 32


def make_store(
    path: Path, slides: list[tuple[str, str | None, str, int]], source: Path | None = None
) -> Path:
    """A tile store written with the store API: (slide_id, label, patient, n_selected) per slide.

    Tiles are class-coloured noise saved as pixels; with `source`, no pixels are saved and the tiles
    are read from that slide at level-0 coordinates instead.
    """
    store = TileStore.create_or_open(path, {"test": True})
    labels = sorted({s[1] for s in slides if s[1]})
    for k, (sid, label, patient, n) in enumerate(slides):
        rng = np.random.default_rng(k)
        coords = np.stack([np.arange(n) * 64 + 100, np.full(n, 200)], 1).astype(np.int64)
        arrays = {
            "coords": coords,
            "cluster": np.zeros(n, np.int32),
            "cellularity": np.ones(n, np.float32),
            "selected": np.ones(n, bool),
        }
        pixels = None
        if source is None:
            base = np.array([60 + 60 * (labels.index(label) if label else 0), 100, 160], np.uint8)
            pixels = np.clip(base + rng.integers(-40, 40, (n, PX, PX, 3)), 0, 255).astype(np.uint8)
        record = SlideRecord(
            slide_id=sid, source_path=str(source or path / f"{sid}.svs"), label=label, patient=patient,
            mpp=0.5, tile_size_level0=64.0, tile_px=PX, n_mosaic=n, n_selected=n,
        )  # fmt: skip
        store.write_slide(record, arrays, pixels)
    return path


def cohort(n_classes: int = 2, patients: int = 3, tiles: int = 6) -> list[tuple[str, str, str, int]]:
    return [(f"s{c}{p}", f"class{c}", f"p{c}{p}", tiles) for c in range(n_classes) for p in range(patients)]


def config(**overrides) -> TrainConfig:
    base = {
        "run.device": "cpu", "model.encoder": "cbr-tiny", "model.variant": "scratch", "model.input_px": PX,
        "run.workers": 0, "data.val_fraction": 0.34, "optim.epochs": 2, "optim.batch_size": 4,
        "optim.warmup_epochs": 0.5, "data.samples_per_epoch": 8,
    }  # fmt: skip
    return load_config(TrainConfig, overrides={**base, **overrides})


# ---- feature extractor -----------------------------------------------------------------------------
def test_feature_extractor_matches_manual_pipeline(tmp_path):
    path = random_init_checkpoint(tmp_path / "init.pt", input_px=48, seed=3)
    fx = FeatureExtractor.from_checkpoint(path, device="cpu")
    assert fx.feature_dim == 1024 and fx.input_px == 48
    assert fx.model_hash == hashlib.sha256(path.read_bytes()).hexdigest()
    assert fx.feature_definition["pooling"] == "avgpool(norm5) without ReLU"
    tiles = np.random.default_rng(0).integers(0, 256, (3, 64, 64, 3), dtype=np.uint8)
    got = fx.extract(tiles, batch_size=2)
    x = torch.from_numpy(tiles).permute(0, 3, 1, 2).float() / 255
    x = torch.nn.functional.interpolate(x, size=(48, 48), mode="bilinear", antialias=True)
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    x = (x - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)
    with torch.no_grad():
        norm5 = fx.model.features.feature_map(x)
    assert got.dtype == np.float32 and got.shape == (3, 1024)
    np.testing.assert_allclose(got, norm5.mean(dim=(2, 3)).numpy(), atol=1e-5)
    with pytest.raises(ValueError, match="uint8"):
        fx.extract(tiles.astype(np.float32))


def test_extract_store_prefetching_equals_extract(tmp_path):
    store = TileStore.open(make_store(tmp_path / "t.zarr", [("a", "x", "p", 5)]))
    fx = FeatureExtractor(build_model("cbr-tiny", "batch", 0, "scratch"), _cfg(), device="cpu")
    np.testing.assert_allclose(
        fx.extract_store(store, "a", batch_size=2), fx.extract(store.read_selected("a"))
    )


def _cfg() -> dict:
    from pathology.kimianet import model_config

    return model_config("cbr-tiny", "batch", "scratch", [], PX)


# ---- variants ----------------------------------------------------------------------------------------
TRAINED = {
    "I": ("features.denseblock4", "features.norm5", "classifier"),
    "II": ("features.transition3", "features.denseblock3", "features.denseblock4", "features.norm5", "classifier"),
    "III": ("features.transition2", "features.denseblock2", "features.transition3", "features.denseblock3",
            "features.denseblock4", "features.norm5", "classifier"),
}  # fmt: skip


@pytest.mark.parametrize("variant", ["I", "II", "III", "IV"])
def test_variant_step_changes_exactly_the_trained_parts(tmp_path, variant):
    init = random_init_checkpoint(tmp_path / "init.pt", input_px=PX)
    store = make_store(tmp_path / "t.zarr", cohort())
    cfg = config(**{"model.encoder": "kimianet", "model.variant": variant, "model.init": str(init),
                    "data.samples_per_epoch": 4, "optim.epochs": 1, "optim.warmup_epochs": 0.0})  # fmt: skip
    run = Run(KimiaNetTask(store, cfg, CPU), tmp_path / "m.pt", CPU)
    before = {k: v.clone() for k, v in run.model.state_dict().items()}
    run.train_epoch(0)
    after = run.model.state_dict()
    trained = TRAINED.get(variant, ("",))  # IV: every prefix
    for key, value in before.items():  # parameters and BN buffers alike
        changed = not torch.equal(value, after[key])
        assert changed == key.startswith(trained), f"{variant}: {key} changed={changed}"


# ---- augmentation --------------------------------------------------------------------------------------
def test_hed_conversions_match_scikit_image():
    rgb = np.random.default_rng(0).random((8, 9, 3))
    x = torch.from_numpy(rgb).permute(2, 0, 1)
    hed = rgb_to_hed(x)
    np.testing.assert_allclose(hed.permute(1, 2, 0).numpy(), rgb2hed(rgb), atol=1e-12)
    np.testing.assert_allclose(hed_to_rgb(hed).permute(1, 2, 0).numpy(), hed2rgb(rgb2hed(rgb)), atol=1e-12)
    alpha, beta = torch.tensor([1.05, 0.95, 1.0], dtype=torch.float64), torch.tensor([0.01, -0.02, 0.0])
    want = hed2rgb(rgb2hed(rgb) * alpha.numpy() + beta.double().numpy())
    got = hed_jitter(x, alpha, beta.double()).permute(1, 2, 0).numpy()
    np.testing.assert_allclose(got, want, atol=1e-12)


def test_augment_is_deterministic_per_seed_and_shapes():
    cfg = load_config(TrainConfig).augment
    x = to_tensor(np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8))
    a = augment(x, 24, cfg, torch.Generator().manual_seed(5))
    b = augment(x, 24, cfg, torch.Generator().manual_seed(5))
    c = augment(x, 24, cfg, torch.Generator().manual_seed(6))
    assert a.shape == (3, 24, 24) and torch.equal(a, b) and not torch.equal(a, c)
    assert a.min() >= 0 and a.max() <= 1
    plain = TrainConfig.section("augment", {"flip": False, "rot90": False, "hed_sigma": 0.0, "brightness": 0.0,
                                            "contrast": 0.0, "crop_scale": [1.0, 1.0]})  # fmt: skip
    torch.testing.assert_close(augment(x, 24, plain, torch.Generator()), resize(x, 24))
    n = normalize(torch.ones(3, 2, 2))
    torch.testing.assert_close(
        n[:, 0, 0], (1 - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor([0.229, 0.224, 0.225])
    )


# ---- data ------------------------------------------------------------------------------------------------
def test_split_is_by_patient_and_stratified():
    by_class = {"a": [f"a{i}" for i in range(5)], "b": ["b0", "b1", "shared"], "c": ["shared", "c1"]}
    train, val = split_patients(by_class, 0.4, seed=0)
    assert not train & val and train | val == {p for ps in by_class.values() for p in ps}
    assert len(val & set(by_class["a"])) == 2 and len(val & set(by_class["b"])) == 1


def test_sampler_shards_give_the_same_global_batches():
    w = torch.tensor([1.0, 1.0, 2.0, 4.0, 1.0, 1.0], dtype=torch.float64)
    one = list(EpochSampler(6, weights=w, num_samples=10, global_batch=4, seed=3))
    two = [
        list(EpochSampler(6, weights=w, num_samples=10, global_batch=4, rank=r, world_size=2, seed=3))
        for r in (0, 1)
    ]
    assert len(one) == 8  # whole global batches only
    merged = [two[r][i] for i in range(4) for r in (0, 1)]
    assert merged == one
    s = EpochSampler(6, weights=w, num_samples=10, global_batch=4, seed=3)
    s.set_epoch(1)
    assert list(s) != one


def test_dataset_reads_slide_when_pixels_not_saved(tmp_path):
    store_path = make_store(tmp_path / "t.zarr", [("cmu", "x", "p", 3)], source=CMU)
    store = TileStore.open(store_path)
    assert not store.has_pixels("cmu")
    ds = TileDataset(store_path, [("cmu", j, 0) for j in range(3)], PX)
    want = normalize(to_tensor(store.read_selected("cmu")))
    for j in range(3):
        torch.testing.assert_close(ds[j][0], want[j])


# ---- the loop ---------------------------------------------------------------------------------------------
def test_training_writes_outputs_and_checkpoint_loads(tmp_path):
    store = make_store(tmp_path / "t.zarr", cohort())
    summary = train_kimianet(store, tmp_path / "m.pt", config())
    paths = output_paths(tmp_path / "m.pt")
    assert all(p.is_file() for p in paths.values())
    assert summary["epochs_run"] == 2 and summary["val_patients"] == 2 and summary["train_patients"] == 4
    assert summary["macro_f1_definition"] == MACRO_F1_DEFINITION
    assert summary["vote_definition"] == VOTE_DEFINITION
    rows = (tmp_path / "m.metrics.csv").read_text().splitlines()
    assert rows[0].startswith("epoch,train_loss,train_acc,val_loss,val_acc,val_macro_f1") and len(rows) == 3
    ckpt = torch.load(tmp_path / "m.pt", weights_only=True)
    cfg = ckpt["config"]
    assert cfg["classes"] == ["class0", "class1"] and cfg["arch"] == "cbr-tiny" and cfg["input_px"] == PX
    assert cfg["data_hash"] == summary["data_hash"] and json.dumps(cfg)
    fx = FeatureExtractor.from_checkpoint(tmp_path / "m.pt", device="cpu")
    assert fx.extract(np.zeros((1, PX, PX, 3), np.uint8)).shape == (1, 512)


def test_resume_reproduces_uninterrupted_run(tmp_path, monkeypatch):
    store = make_store(tmp_path / "t.zarr", cohort())
    cfg = config(**{"model.encoder": "kimianet", "model.norm": "batch", "optim.epochs": 3})
    train_kimianet(store, tmp_path / "full.pt", cfg)
    full = checkpoint.load(tmp_path / "full.last.pt", "kimianet-train-state")

    original = Run.train_epoch

    def crash_in_epoch_2(self, epoch):
        if epoch == 1:
            raise KeyboardInterrupt
        return original(self, epoch)

    monkeypatch.setattr(Run, "train_epoch", crash_in_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        train_kimianet(store, tmp_path / "part.pt", cfg)
    monkeypatch.setattr(Run, "train_epoch", original)
    torch.manual_seed(1234)  # a fresh process would not share the first run's RNG position
    summary = train_kimianet(store, tmp_path / "part.pt", cfg.updated({"run.resume": True}))
    part = checkpoint.load(tmp_path / "part.last.pt", "kimianet-train-state")
    assert summary["epochs_run"] == 3 and part.extra["epoch"] == 3
    for k, v in full.weights.items():
        assert torch.equal(v, part.weights[k]), k
    full_rows = (tmp_path / "full.metrics.csv").read_text().splitlines()
    part_rows = (tmp_path / "part.metrics.csv").read_text().splitlines()
    # the last column is wall time
    assert [r.rsplit(",", 1)[0] for r in full_rows] == [r.rsplit(",", 1)[0] for r in part_rows]


def test_resume_refuses_changed_config(tmp_path):
    store = make_store(tmp_path / "t.zarr", cohort())
    train_kimianet(store, tmp_path / "m.pt", config(**{"optim.epochs": 1}))
    with pytest.raises(HistoError, match=r"changed config: optim\.lr"):
        train_kimianet(
            store, tmp_path / "m.pt", config(**{"optim.epochs": 1, "optim.lr": 0.5, "run.resume": True})
        )


def test_rerun_resumes_a_matching_run_and_never_overwrites_another(tmp_path):
    """Without --resume a re-run continues a run of the same config (a finished one: nothing is trained or
    rewritten), refuses another config in one line, and starts over only with --overwrite."""
    store = make_store(tmp_path / "t.zarr", cohort())
    out, paths = tmp_path / "m.pt", output_paths(tmp_path / "m.pt")
    assert train_kimianet(store, out, config(), stop_after=1)["epochs_run"] == 1
    again = train_kimianet(store, out, config())
    assert again["epochs_run"] == 2 and len(paths["csv"].read_text().splitlines()) == 3
    stamps = {p: p.stat().st_mtime_ns for p in paths.values()}
    done = train_kimianet(store, out, config())
    assert (
        done["epochs_run"] == 2
        and done["best_epoch"] == again["best_epoch"]
        and done["best"] == again["best"]
    )
    with pytest.raises(
        HistoError, match=r"another config is here \(optim\.lr: 0\.0001 -> 0\.5\).*--overwrite"
    ):
        train_kimianet(store, out, config(**{"optim.lr": 0.5}))
    assert {p: p.stat().st_mtime_ns for p in paths.values()} == stamps
    with pytest.raises(HistoError, match="exclude each other"):
        train_kimianet(store, out, config(**{"run.resume": True, "run.overwrite": True}))
    fresh = train_kimianet(store, out, config(**{"optim.lr": 0.5, "optim.epochs": 1, "run.overwrite": True}))
    assert fresh["epochs_run"] == 1 and len(paths["csv"].read_text().splitlines()) == 2
    assert checkpoint.load(paths["last"], "kimianet-train-state").config["optim"]["lr"] == 0.5
    foreign = random_init_checkpoint(tmp_path / "imported.pt", arch="cbr-tiny", input_px=PX)
    with pytest.raises(
        HistoError, match=r"imported\.pt: exists without its training state imported\.last\.pt"
    ):
        train_kimianet(store, foreign, config())
    with pytest.raises(HistoError, match="nothing to resume"):
        train_kimianet(store, tmp_path / "new.pt", config(**{"run.resume": True}))


def test_non_finite_training_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    """A NaN input in epoch 2 turns the loss and gradients non-finite: one-line error, epoch 1 kept."""
    store = make_store(tmp_path / "t.zarr", cohort())
    read, calls = TileDataset.__getitem__, []

    def poisoned(self, item):
        x, y = read(self, item)
        if self.augment_cfg is not None:  # training tiles only; epoch 1 draws 8 (samples_per_epoch)
            calls.append(item)
            if len(calls) > 8:
                x = torch.full_like(x, float("nan"))
        return x, y

    monkeypatch.setattr(TileDataset, "__getitem__", poisoned)
    out, paths = tmp_path / "m.pt", output_paths(tmp_path / "m.pt")
    with pytest.raises(TrainingDiverged, match=r"diverged in epoch 2 \(non-finite loss in 2 batches first at batch 1;"
                       r" non-finite gradient in 2 batches.*m.last.pt and m.pt still hold epoch 1"):  # fmt: skip
        train_kimianet(store, out, config())
    state = checkpoint.load(paths["last"], "kimianet-train-state")
    assert state.extra["epoch"] == 1 and state.extra["finished"] is False
    for weights in (state.weights, checkpoint.load(out, "kimianet").weights):
        assert all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point())
    assert len(paths["csv"].read_text().splitlines()) == 2
    result = CliRunner().invoke(main, ["train", "--tiles", str(store), "--out", str(tmp_path / "c.pt"),
                                       "--encoder", "cbr-tiny", "--variant", "scratch", "--input-px", str(PX),
                                       "--epochs", "2", "--batch-size", "4", "--device", "cpu", "--workers", "0"])  # fmt: skip
    assert (
        result.exit_code == 2
        and "error:" in result.output
        and "training diverged in epoch 1" in result.output
    )


# ---- bad input ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("slides", "message"),
    [
        (
            [("a", None, "p1", 4), ("b", None, "p2", 4)],
            "no slide has both a label and selected tiles .*no label",
        ),
        ([("a", "x", "p1", 4), ("b", "x", "p2", 4)], "at least 2 classes, found only 'x'"),
        ([("a", "x", "p1", 0), ("b", "y", "p2", 0)], "no selected tiles"),
        ([("a", "x", "p1", 4), ("b", "y", "p2", 4)], "too few patients"),
    ],
)
def test_unusable_stores(tmp_path, slides, message):
    store = make_store(tmp_path / "t.zarr", slides)
    with pytest.raises(InputFileError, match=message) as e:
        train_kimianet(store, tmp_path / "m.pt", config())
    assert str(store) in str(e.value)


def test_moved_slide_fails_or_is_skipped(tmp_path):
    slides = cohort(tiles=3)
    moved = tmp_path / "moved.svs"
    shutil.copy(CMU, moved)
    store = make_store(tmp_path / "t.zarr", slides)
    make_store(tmp_path / "t.zarr", [("zz", "class0", "pz", 3)], source=moved)
    moved.unlink()
    with pytest.raises(InputFileError, match=r"moved\.svs: slide zz .*has moved or is missing"):
        train_kimianet(store, tmp_path / "m.pt", config())
    summary = train_kimianet(
        store, tmp_path / "m.pt", config(**{"data.skip_missing": True, "optim.epochs": 1})
    )
    assert [s["slide_id"] for s in summary["skipped"]] == ["zz"]


def test_cli_train_json_and_bad_init(tmp_path):
    store = make_store(tmp_path / "t.zarr", cohort())
    yaml = tmp_path / "c.yaml"
    yaml.write_text("data:\n  samples_per_epoch: 4\n  val_fraction: 0.34\noptim:\n  warmup_epochs: 0.0\n")
    common = ["train", "--tiles", str(store), "--input-px", str(PX), "--epochs", "1", "--batch-size", "4",
              "--device", "cpu", "--workers", "0", "--config", str(yaml)]  # fmt: skip
    result = CliRunner().invoke(main, [*common, "--out", str(tmp_path / "m.pt"), "--encoder", "cbr-tiny",
                                       "--variant", "scratch", "--json"])  # fmt: skip
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["classes"] == ["class0", "class1"] and Path(summary["curve_png"]).is_file()
    rerun = [
        *common,
        "--out",
        str(tmp_path / "m.pt"),
        "--encoder",
        "cbr-tiny",
        "--variant",
        "scratch",
        "--lr",
        "0.5",
    ]
    result = CliRunner().invoke(main, rerun)
    assert result.exit_code == 2 and "another config is here (optim.lr: 0.0001 -> 0.5)" in result.output
    result = CliRunner().invoke(main, [*rerun, "--overwrite", "--json"])
    assert result.exit_code == 0 and json.loads(result.stdout)["epochs_run"] == 1
    other = random_init_checkpoint(tmp_path / "cbr.pt", arch="cbr-small")
    result = CliRunner().invoke(main, [*common, "--out", str(tmp_path / "d.pt"), "--init", str(other)])
    assert result.exit_code == 2
    assert (
        "error:" in result.output
        and "(cbr-small, norm 'batch')" in result.output
        and "cbr.pt" in result.output
    )
    result = CliRunner().invoke(main, [*common, "--out", str(tmp_path / "d.pt"), "--variant", "III"])
    assert result.exit_code == 2 and "give --init PATH" in result.output
