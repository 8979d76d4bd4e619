"""The encoder registry in the core lane: CNN entries, weight layouts and their checks, preprocessing and
tile rules, `histo index --encoder --weights` with the official KimiaNet layout, and index refusals.

The timm-built entries are tested against their authors' reference models in test_encoders_full.py (lane 2).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from PIL import Image

from histo.cli import main
from histo.errors import HistoError, InputFileError
from pathology import encoders
from pathology.densenet import densenet121_trunk
from pathology.encoders.preprocess import Preprocess, crops_per_side, grid_crops

TILE_OVERRIDES = {"tile.px": 32, "tile.um": 64.0, "mosaic.percent": 50.0, "cellularity.top_fraction": 1.0}
PX = 32  # encoder input in these tests (CNN entries accept any size)


def run(args: list) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, [str(a) for a in args])
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout, result.stderr


def tiles(n: int = 3, px: int = 40, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, px, px, 3), dtype=np.uint8)


def trunk_state(seed: int) -> OrderedDict:
    """A DenseNet-121 trunk with random weights and BN statistics (so norm5 has both signs)."""
    torch.manual_seed(seed)
    trunk = densenet121_trunk("batch")
    for m in trunk.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.3, 0.3)
    return trunk.state_dict()


def official_kimianet_file(path: Path, seed: int = 0) -> Path:
    """A file in the released KimiaNet layout: DataParallel `module.model.0.*` backbone, 30-class `fc_4`."""
    state = {f"module.model.0.{k}": v for k, v in trunk_state(seed).items()}
    state["module.fc_4.weight"] = torch.randn(30, 1024)
    state["module.fc_4.bias"] = torch.randn(30)
    torch.save(state, path)
    return path


def reference_norm5(state: dict, x: np.ndarray, px: int = PX) -> torch.Tensor:
    """norm5 maps of tiles resized (antialiased bilinear) and ImageNet-normalised, by hand."""
    trunk = densenet121_trunk("batch")
    trunk.load_state_dict(state)
    t = torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255
    t = F.interpolate(t, size=(px, px), mode="bilinear", antialias=True, align_corners=False)
    t = (t - torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)) / torch.tensor([0.229, 0.224, 0.225]).view(
        3, 1, 1
    )
    with torch.no_grad():
        return trunk.eval().feature_map(t)


# ---- registry -------------------------------------------------------------------------------------
def test_registry_has_the_required_entries_with_complete_definitions():
    required = {"kimianet", "densenet121-imagenet", "cbr-tiny", "cbr-small", "cbr-large-t", "cbr-large-w",
                "resnet50-trunc", "uni", "uni2-h", "virchow2", "h-optimus-0", "phikon", "phikon-v2",
                "ctranspath", "prov-gigapath", "conch-v1"}  # fmt: skip
    assert required <= set(encoders.names())
    for name in encoders.names():
        enc = encoders.get_encoder(name)
        assert enc.input_px > 0 and enc.mpp > 0 and enc.feature_dim > 0 and enc.pooling and enc.layouts
        assert len(enc.mean) == 3 and len(enc.std) == 3 and enc.colour in ("RGB", "BGR")
        assert json.loads(json.dumps(dict(enc.arch))) == dict(enc.arch)  # recorded in manifests
        pre = encoders.encoder_preprocess(enc)
        definition = encoders.encoder_definition(enc, pre, enc.precision)
        assert definition["encoder"] == name and definition["feature_dim"] == enc.feature_dim
        assert definition["tile_rule"]["rule"] == "resize"
    with pytest.raises(HistoError, match="unknown encoder 'nope'; registered: kimianet"):
        encoders.get_encoder("nope")


def test_entry_needing_a_missing_package_says_how_to_install_it():
    enc = encoders.get_encoder("uni")
    fake = dataclasses.replace(enc, requires=("no_such_module_xyz",))
    with pytest.raises(HistoError, match=r"needs no_such_module_xyz: pip install 'histo\[encoders\]'"):
        fake.network()


def test_histo_encoders_lists_every_entry_with_its_definition():
    code, out, _ = run(["encoders"])
    assert code == 0
    for name in encoders.names():
        assert f"\n{name} " in f"\n{out}"
    code, out, _ = run(["encoders", "virchow2", "--json"])
    row = json.loads(out)["encoders"][0]
    assert row["feature"].startswith("2560-d, class token concatenated with the mean of the patch tokens")
    assert row["architecture"]["reg_tokens"] == 4 and row["input"].startswith("224 px RGB at 0.5 µm/px")
    assert run(["encoders", "nope"])[0] == 2


# ---- DenseNet entries -----------------------------------------------------------------------------
def test_official_kimianet_file_loads_every_tensor_and_gives_avgpool_norm5(tmp_path):
    path = official_kimianet_file(tmp_path / "KimiaNetPyTorchWeights.pth")
    fx = encoders.open_extractor("kimianet", path, "cpu", input_px=PX)
    w = fx.weights
    assert w["layout"] == "KimiaNet (official)" and w["tensors_loaded"] == len(trunk_state(0))
    assert w["ignored"] == {"tensors": 2, "patterns": [r"fc_4\."]}
    assert fx.model_hash == w["sha256"] and fx.feature_definition["pooling"] == "avgpool(norm5) without ReLU"
    x = tiles()
    expected = reference_norm5(trunk_state(0), x).mean(dim=(2, 3))
    torch.testing.assert_close(torch.from_numpy(fx.extract(x)), expected, rtol=1e-5, atol=1e-5)


def test_the_two_densenet_poolings_differ_exactly_by_the_relu(tmp_path):
    path = official_kimianet_file(tmp_path / "k.pth")
    x = tiles(seed=3)
    kimia = encoders.open_extractor("kimianet", path, "cpu", input_px=PX).extract(x)
    imagenet = encoders.open_extractor("densenet121-imagenet", path, "cpu", input_px=PX).extract(x)
    norm5 = reference_norm5(trunk_state(0), x)
    assert (norm5 < 0).any()  # else the two poolings could not differ
    # relu(v) - v = relu(-v): the ImageNet pooling adds the mean of the negative part of norm5.
    difference = F.relu(-norm5).mean(dim=(2, 3)).numpy()
    np.testing.assert_allclose(imagenet - kimia, difference, rtol=1e-4, atol=1e-6)
    assert (imagenet - kimia).min() >= -1e-6 and np.abs(imagenet - kimia).max() > 1e-3


def test_torchvision_densenet_file_with_old_style_keys_loads(tmp_path):
    state = {f"features.{k}": v for k, v in trunk_state(1).items()}
    old = {k.replace("norm1.", "norm.1.").replace("conv2.", "conv.2."): v for k, v in state.items()}
    old |= {"classifier.weight": torch.randn(1000, 1024), "classifier.bias": torch.randn(1000)}
    torch.save(old, tmp_path / "densenet121-a639ec97.pth")
    fx = encoders.open_extractor(
        "densenet121-imagenet", tmp_path / "densenet121-a639ec97.pth", "cpu", input_px=PX
    )
    assert fx.weights["layout"] == "torchvision" and fx.weights["ignored"]["tensors"] == 2
    x = tiles(seed=4)
    expected = F.relu(reference_norm5(trunk_state(1), x)).mean(dim=(2, 3))
    torch.testing.assert_close(torch.from_numpy(fx.extract(x)), expected, rtol=1e-5, atol=1e-5)


def test_safetensors_file_loads_like_the_pth(tmp_path):
    from safetensors.torch import save_file

    state = {f"features.{k}": v.contiguous() for k, v in trunk_state(2).items()}
    save_file(state, tmp_path / "model.safetensors")
    torch.save(state, tmp_path / "pytorch_model.bin")
    a = encoders.open_extractor("kimianet", tmp_path / "model.safetensors", "cpu", input_px=PX)
    b = encoders.open_extractor("kimianet", tmp_path / "pytorch_model.bin", "cpu", input_px=PX)
    x = tiles(seed=5)
    np.testing.assert_array_equal(a.extract(x), b.extract(x))
    assert a.model_hash != b.model_hash  # the hash is the file's


def test_histo_checkpoint_as_weights_only_for_its_own_batchnorm_arch(tmp_path):
    from pathology.kimianet import random_init_checkpoint

    bn = random_init_checkpoint(tmp_path / "bn.pt", norm="batch", input_px=PX)
    fx = encoders.open_extractor("kimianet", bn, "cpu", input_px=PX)
    assert fx.weights["layout"] == "histo" and fx.weights["tensors_loaded"] == len(trunk_state(0))
    gn = random_init_checkpoint(tmp_path / "gn.pt", norm="group", input_px=PX)
    with pytest.raises(
        InputFileError, match=r"gn\.pt: a histo checkpoint \(densenet121, norm 'group'\).*--model"
    ):
        encoders.open_extractor("kimianet", gn, "cpu")
    with pytest.raises(InputFileError, match="not weights of encoder 'resnet50-trunc'"):
        encoders.open_extractor("resnet50-trunc", bn, "cpu")
    cbr = random_init_checkpoint(tmp_path / "cbr.pt", arch="cbr-tiny", input_px=PX)
    assert encoders.open_extractor("cbr-tiny", cbr, "cpu").extract(tiles(1)).shape == (1, 512)


@pytest.mark.parametrize("arch", ["cbr-tiny", "cbr-small", "cbr-large-t", "cbr-large-w"])
def test_cbr_entries_give_the_features_of_their_histo_checkpoint(tmp_path, arch):
    from pathology.kimianet import FeatureExtractor, random_init_checkpoint

    ckpt = random_init_checkpoint(tmp_path / f"{arch}.pt", arch=arch, input_px=PX, seed=2)
    fx = encoders.open_extractor(arch, ckpt, "cpu", input_px=PX)
    assert fx.feature_definition["pooling"] == "avgpool(last conv-norm-ReLU)"
    x = tiles(2, px=48, seed=6)
    reference = FeatureExtractor.from_checkpoint(ckpt, device="cpu").extract(x)  # what `--model` computes
    np.testing.assert_allclose(fx.extract(x), reference, rtol=1e-5, atol=1e-6)
    assert fx.model_hash == FeatureExtractor.from_checkpoint(ckpt, device="cpu").model_hash


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda s: s.pop("module.model.0.norm5.weight"), r"1 missing \(norm5\.weight\)"),
        (lambda s: s.update({"module.model.0.extra.weight": torch.zeros(1)}), r"1 unexpected \(extra\.weight\)"),
        (lambda s: s.update({"module.model.0.conv0.weight": torch.zeros(64, 3, 3, 3)}), r"1 shape mismatches \(conv0\.weight \(64, 3, 3, 3\)\)"),
    ],
)  # fmt: skip
def test_mismatched_file_is_one_line_naming_the_file_and_first_keys(tmp_path, edit, message):
    path = official_kimianet_file(tmp_path / "k.pth")
    state = torch.load(path, weights_only=True)
    edit(state)
    torch.save(state, path)
    with pytest.raises(
        InputFileError,
        match=rf"k\.pth: KimiaNet \(official\) layout does not match encoder 'kimianet': {message}",
    ):
        encoders.open_extractor("kimianet", path, "cpu")


def test_unrecognised_or_unreadable_files_are_refused_in_one_line(tmp_path):
    torch.save({"encoder.weight": torch.zeros(2)}, tmp_path / "other.pth")
    with pytest.raises(
        InputFileError,
        match=r"other\.pth: not a weight file of encoder 'kimianet': its keys \(encoder\.weight\)",
    ):
        encoders.open_extractor("kimianet", tmp_path / "other.pth", "cpu")
    good = official_kimianet_file(tmp_path / "k.pth")
    (tmp_path / "cut.pth").write_bytes(good.read_bytes()[:5000])
    with pytest.raises(InputFileError, match=r"cut\.pth: truncated or damaged"):
        encoders.open_extractor("kimianet", tmp_path / "cut.pth", "cpu")
    (tmp_path / "bad.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}" + b"\0" * 16)
    with pytest.raises(InputFileError, match=r"bad\.safetensors: damaged safetensors file"):
        encoders.open_extractor("kimianet", tmp_path / "bad.safetensors", "cpu")
    with pytest.raises(InputFileError, match="checkpoint not found"):
        encoders.open_extractor("kimianet", tmp_path / "missing.pth", "cpu")


# ---- CLAM's truncated ResNet-50 -------------------------------------------------------------------
def test_resnet50_trunc_reads_a_full_resnet50_file_without_layer4_and_fc(tmp_path):
    from pathology.encoders.resnet import ResNetTrunk

    torch.manual_seed(0)
    full = ResNetTrunk((3, 4, 6, 3))  # torchvision's module names through layer4
    state = {**full.state_dict(), "fc.weight": torch.randn(1000, 2048), "fc.bias": torch.randn(1000)}
    # torchvision ResNet-50 has 25,557,032 parameters: layer4 has 14,964,736 and fc 2,049,000.
    assert (
        sum(v.numel() for k, v in state.items() if "running" not in k and "num_batches" not in k)
        == 25_557_032
    )
    torch.save(state, tmp_path / "resnet50-0676ba61.pth")
    fx = encoders.open_extractor("resnet50-trunc", tmp_path / "resnet50-0676ba61.pth", "cpu", input_px=64)
    assert sum(p.numel() for p in fx.network.parameters()) == 25_557_032 - 14_964_736 - 2_049_000
    layer4 = sum(1 for k in state if k.startswith("layer4."))
    assert fx.weights["ignored"] == {"tensors": layer4 + 2, "patterns": [r"layer4\.", r"fc\."]}
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        full.eval()
        y = full.maxpool(full.relu(full.bn1(full.conv1(x))))
        expected = full.layer3(full.layer2(full.layer1(y))).mean(dim=(2, 3))
        torch.testing.assert_close(fx.network(x), expected)
    assert expected.shape == (2, 1024)


# ---- preprocessing and tile rules -----------------------------------------------------------------
def test_resize_matches_pillow_antialiased_resampling():
    x = tiles(1, px=50, seed=7)[0]
    for interpolation, pil in (("bilinear", Image.BILINEAR), ("bicubic", Image.BICUBIC)):
        pre = Preprocess(32, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), interpolation)
        ours = pre(torch.from_numpy(x[None]))[0].numpy()
        for c in range(3):
            ref = np.asarray(
                Image.fromarray(x[..., c].astype(np.float32) / 255, mode="F").resize((32, 32), pil)
            )
            np.testing.assert_allclose(ours[c], np.clip(ref, 0, 1), atol=2e-5)


def test_crop_pct_centre_crop_colour_order_and_normalisation():
    x = torch.from_numpy(tiles(1, px=64, seed=8))
    mean, std = (0.1, 0.2, 0.3), (0.5, 0.25, 0.2)
    full = Preprocess(64, (0.0,) * 3, (1.0,) * 3)(x)
    cropped = Preprocess(56, mean, std, crop_pct=56 / 64)(x)  # resize to 64 (no-op), keep the central 56
    expected = (full[:, :, 4:60, 4:60] - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
    torch.testing.assert_close(cropped, expected)
    bgr = Preprocess(64, (0.0,) * 3, (1.0,) * 3, colour="BGR")(x)
    torch.testing.assert_close(bgr, full.flip(1))


def test_grid_crops_are_centred_row_major_and_averaged():
    x = torch.arange(2 * 3 * 10 * 10, dtype=torch.float32).view(2, 3, 10, 10)
    crops = grid_crops(x, 3)  # 3 px crops, 1 px left out: offset 0
    assert crops.shape == (18, 3, 3, 3)
    torch.testing.assert_close(crops[1 * 9 + 5], x[1, :, 3:6, 6:9])  # tile 1, row 1, column 2
    fx = encoders.open_extractor("cbr-tiny", None, "cpu", input_px=PX, tile_rule="grid", grid=2)
    single = encoders.FeatureExtractor(fx.network, Preprocess(PX, fx.preprocess.mean, fx.preprocess.std),
                                       {}, fx.feature_dim, "cpu", model_hash="x")  # fmt: skip
    t = tiles(2, px=64, seed=9)
    quarters = [t[:, i : i + 32, j : j + 32] for i in (0, 32) for j in (0, 32)]
    expected = np.mean([single.extract(np.ascontiguousarray(q)) for q in quarters], axis=0)
    np.testing.assert_allclose(fx.extract(t, batch_size=3), expected, rtol=1e-5, atol=1e-5)
    assert fx.feature_definition["tile_rule"] == {
        "rule": "grid", "crops_per_side": 2, "aggregate": "mean of the 4 crop embeddings"}  # fmt: skip


def test_grid_crop_count_follows_the_encoders_field_of_view():
    tiling = {"resolved": {"tile_px": 1000, "target_mpp": 0.5}}
    for name, n in (("uni", 4), ("prov-gigapath", 4), ("ctranspath", 2), ("conch-v1", 2), ("kimianet", 1)):
        enc = encoders.get_encoder(name)
        assert crops_per_side("grid", None, enc.input_px / enc.crop_pct, enc.mpp, tiling) == n, name
    assert crops_per_side("grid", 3, None, None, None) == 3
    with pytest.raises(HistoError, match="needs the tile store's tile size"):
        crops_per_side("grid", None, 224, 0.5, {})
    with pytest.raises(HistoError, match="tile rule is resize"):
        crops_per_side("resize", 2, 224, 0.5, tiling)
    with pytest.raises(HistoError, match="takes 224 px inputs only"):
        encoders.encoder_preprocess(encoders.get_encoder("h-optimus-0"), input_px=256)


# ---- indexes built from weight files --------------------------------------------------------------
@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """6 synthetic slides tiled at 32 px, an official-layout KimiaNet file and an input_px config."""
    from histo.config import load_config
    from pathology import tile_slides
    from pathology.config import TileConfig
    from pathology.synthetic import make_cohort

    root = tmp_path_factory.mktemp("encoders")
    csv = make_cohort(root / "slides", n_classes=3, patients_per_class=2, size=(1280, 1024), seed=1)
    tile_slides([root / "slides"], root / "tiles.zarr", load_config(TileConfig, overrides=TILE_OVERRIDES),
                labels_csv=csv, progress=False)  # fmt: skip
    (root / "index.yaml").write_text(f"input_px: {PX}\n")
    return {
        "root": root,
        "tiles": root / "tiles.zarr",
        "weights": official_kimianet_file(root / "KimiaNetPyTorchWeights.pth"),
        "other": official_kimianet_file(root / "other.pth", seed=1),
        "config": root / "index.yaml",
        "slide": sorted((root / "slides").glob("*.svs"))[0],
    }


def index_args(cohort: dict, out: Path, *more) -> list:
    return ["index", "--tiles", cohort["tiles"], "--encoder", "kimianet", "--weights", cohort["weights"],
            "--out", out, "--device", "cpu", "--config", cohort["config"], *more]  # fmt: skip


@pytest.fixture(scope="module")
def built(cohort: dict) -> Path:
    out = cohort["root"] / "idx"
    code, _, err = run(index_args(cohort, out))
    assert code == 0, err
    return out


def test_official_kimianet_file_indexes_without_training(cohort, built):
    from pathology.store import TileStore
    from search.features import FEATURES_DIR, read_slide

    m = json.loads((built / "manifest.json").read_text())
    model = m["model"]
    assert model["hash"] == model["weights"]["sha256"] and model["file"] is None  # recorded, not copied
    assert model["weights"]["path"] == str(cohort["weights"].resolve())
    assert model["weights"]["layout"] == "KimiaNet (official)" and model["feature_dim"] == 1024
    d = model["feature_definition"]
    assert (
        d["encoder"] == "kimianet" and d["pooling"] == "avgpool(norm5) without ReLU" and d["input_px"] == PX
    )
    assert d["tile_rule"]["rule"] == "resize" and d["precision"] == "float32"
    store = TileStore.open(cohort["tiles"])
    sid = store.slide_ids()[0]
    _, feats, _ = read_slide(built / FEATURES_DIR, sid)
    expected = reference_norm5(trunk_state(0), store.read_selected(sid)).mean(dim=(2, 3))
    torch.testing.assert_close(torch.from_numpy(feats), expected, rtol=1e-5, atol=1e-5)


def test_search_uses_the_recorded_weights_and_refuses_others(cohort, built, tmp_path):
    from search.slide_index import SlideIndex

    code, out, err = run(["search", "--index", built, cohort["slide"], "--device", "cpu", "--json"])
    assert code == 0, err
    assert json.loads(out)["queries"][0]["results"]
    with pytest.raises(HistoError, match=r"built with model .* \(kimianet, weights .*refusing to search"):
        SlideIndex.open(built, model=encoders.open_extractor("kimianet", cohort["other"], "cpu", input_px=PX))
    same_file_other_pooling = encoders.open_extractor(
        "densenet121-imagenet", cohort["weights"], "cpu", input_px=PX
    )
    with pytest.raises(HistoError, match=r"another feature definition \(differs in encoder, pooling\)"):
        SlideIndex.open(built, model=same_file_other_pooling)
    with pytest.raises(HistoError, match=r"differs in tile_rule"):
        SlideIndex.open(built, model=encoders.open_extractor("kimianet", cohort["weights"], "cpu", input_px=PX,
                                                             tile_rule="grid", grid=2))  # fmt: skip


def test_moved_weights_are_found_with_search_weights(cohort, built, tmp_path):
    moved = shutil.copytree(built, tmp_path / "idx")
    manifest = json.loads((moved / "manifest.json").read_text())
    manifest["model"]["weights"]["path"] = str(tmp_path / "gone.pth")
    (moved / "manifest.json").write_text(json.dumps(manifest))
    args = ["search", "--index", moved, cohort["slide"], "--device", "cpu"]
    code, _, err = run(args)
    assert code == 1 and "weight file" in err and "gone.pth is missing" in err and "--weights FILE" in err
    assert run([*args, "--weights", cohort["weights"]])[0] == 0
    code, _, err = run([*args, "--weights", cohort["other"]])
    assert code == 1 and "refusing to search with a different model" in err


def test_resumed_features_refuse_another_tile_rule(cohort, built, tmp_path):
    out = shutil.copytree(built, tmp_path / "idx")
    code, _, err = run(index_args(cohort, out, "--tile-rule", "grid", "--grid", "2"))
    assert code == 2 and "another feature definition (differs in tile_rule)" in err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--encoder", "kimianet"], "encoder 'kimianet' needs its weight file (--weights FILE"),
        (["--weights", "w.pth"], "--weights goes with --encoder NAME"),
        ([], "no feature extractor: give --model CKPT or --encoder NAME --weights FILE"),
        (["--encoder", "nope", "--weights", "w.pth"], "unknown encoder 'nope'"),
        (["--encoder", "kimianet", "--weights", "w.pth"], "w.pth: checkpoint not found"),
    ],
)
def test_index_option_errors_are_one_line(cohort, tmp_path, args, message):
    code, _, err = run(["index", "--tiles", cohort["tiles"], "--out", tmp_path / "i", *args])
    assert code == 2 and message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_python_api_builds_from_an_encoder_name(cohort, tmp_path):
    from search.slide_index import SlideIndex

    config = {"encoder": "densenet121-imagenet", "weights": str(cohort["weights"]), "input_px": PX,
              "run": {"device": "cpu"}}  # fmt: skip
    idx = SlideIndex.build(cohort["tiles"], None, tmp_path / "api", config, progress=False)
    assert idx.manifest["model"]["feature_definition"]["pooling"] == "avgpool(ReLU(norm5))"
    assert SlideIndex.open(tmp_path / "api").extractor.feature_definition == idx.extractor.feature_definition
    with pytest.raises(HistoError, match="not both"):
        SlideIndex.build(
            cohort["tiles"], cohort["weights"], tmp_path / "x", {"encoder": "kimianet", "weights": "w"}
        )


# ---- the benchmark and comparison scripts -----------------------------------------------------------
def test_compare_encoders_prints_one_row_per_encoder(cohort, tmp_path):
    import subprocess
    import sys

    weights = cohort["weights"]
    args = ["--tiles", cohort["tiles"], "--out", tmp_path, "--input-px", PX, "--device", "cpu", "--k", "1,3",
            "--encoder", f"kimianet={weights}", "--encoder", f"densenet121-imagenet={weights}", "--encoder", "cbr-tiny"]  # fmt: skip
    script = Path(__file__).resolve().parent.parent / "scripts/compare_encoders.py"
    proc = subprocess.run(
        [sys.executable, script, *map(str, args)], capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    table = [line.split()[0] for line in proc.stdout.splitlines() if line.strip()]
    assert {"kimianet", "densenet121-imagenet", "cbr-tiny"} <= set(table)
    report = json.loads((tmp_path / "compare_encoders.json").read_text())
    for res in report["results"]:
        assert {(r["scope"], r["k"]) for r in res["rows"]} >= {("horizontal", 1), ("horizontal", 3)}
        assert all(0 <= r["accuracy"] <= 1 for r in res["rows"]) and res["slides"] == 6
    assert [r["weights"] for r in report["results"]][2] == "random"


def test_bench_encoders_reports_both_rates_and_their_ratio(cohort, tmp_path):
    import subprocess
    import sys

    script = Path(__file__).resolve().parent.parent / "scripts/bench_encoders.py"
    args = ["--store", cohort["tiles"], "--encoders", "cbr-tiny,resnet50-trunc", "--batch", "4", "--steps", "1",
            "--repeats", "1", "--device", "cpu", "--work", tmp_path, "--json", tmp_path / "b.json"]  # fmt: skip
    proc = subprocess.run(
        [sys.executable, script, *map(str, args)], capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "e2e/model" in proc.stdout
    report = json.loads((tmp_path / "b.json").read_text())
    assert [r["encoder"] for r in report["rows"]] == ["cbr-tiny", "resnet50-trunc"]
    for r in report["rows"]:
        assert r["model_only_tiles_s"] > 0 and r["end_to_end_tiles_s"] > 0
        assert r["ratio"] == pytest.approx(r["end_to_end_tiles_s"] / r["model_only_tiles_s"])
        assert r["tiles"] == sum(s["n_selected"] for s in _records(cohort["tiles"]))
    assert report["store"]["tile_px"] == 32 and report["precision"] == "float32"


def _records(store_path: Path) -> list[dict]:
    from pathology.store import TileStore

    store = TileStore.open(store_path)
    return [store.record(s).to_dict() for s in store.slide_ids()]


def test_robustness_pathology_runs_a_registry_encoder_from_its_weights(cohort, tmp_path):
    from histo.io import file_sha256
    from pathology.kimianet import random_init_checkpoint

    weights = random_init_checkpoint(tmp_path / "cbr.pt", arch="cbr-tiny", input_px=PX)
    args = ["robustness", "pathology", "--encoder", "cbr-tiny", "--model", weights, "--tiles", cohort["tiles"],
            "--out", tmp_path / "out", "--corruptions", "gaussian_noise", "--severities", "1", "--device", "cpu",
            "--config", _write(tmp_path / "r.yaml", "pathology:\n  max_tiles_per_slide: 4\n"), "--json"]  # fmt: skip
    code, out, err = run(args)
    assert code == 0, err
    summary = json.loads(out)
    assert summary["models"] == {"cbr": file_sha256(weights)} and summary["counts"]["failed"] == 0
    assert set(summary["metrics"]["accuracy"]["mean"]["cbr"]) == {"clean", "gaussian_noise"}
    code, _, err = run([*args[:3], "nope", *args[4:]])
    assert code == 2 and "unknown encoder 'nope'" in err


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path
