"""Fine-tuning registry encoders (`histo train --encoder NAME --init FILE`): each variant trains the set its
published rule defines (computed here by a type walk, independently of histo.norms), frozen parameters stay
bit-identical over an epoch and trained ones change, BN statistics follow the stated rule, the checkpoint
indexes with `histo index --model` and makes the entry's feature, resume is exact, bad combos are one line."""

from __future__ import annotations

import hashlib
import json
import re
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from torch import nn

from histo import checkpoint
from histo.cli import main
from histo.config import load_config
from histo.devices import DistInfo
from histo.errors import ConfigError, HistoError
from histo.norms import BatchChannelNorm, EvoNormB0, EvoNormS0, FilterResponseNorm, RegionNormB
from histo.training import Run
from pathology.config import TrainConfig
from pathology.densenet import densenet121_trunk
from pathology.kimianet import FeatureExtractor, build_model
from pathology.train import KimiaNetTask, train_kimianet
from pathology.variants import parameter_counts

CPU = DistInfo(0, 1, 0, torch.device("cpu"))
PX = 32
TILE_OVERRIDES = {"tile.px": 32, "tile.um": 64.0, "mosaic.percent": 50.0, "cellularity.top_fraction": 1.0}
# The normalization classes of these networks, listed here on purpose (the library finds them its own way).
NORM_TYPES = (nn.BatchNorm2d, nn.InstanceNorm2d, nn.GroupNorm, nn.LayerNorm, BatchChannelNorm, EvoNormB0,
              EvoNormS0, FilterResponseNorm, RegionNormB)  # fmt: skip
HEAD = {"classifier.weight", "classifier.bias"}
# KimiaNet-I/II/III: what the paper's rule trains (the first trained block and everything after it).
TRAINED_PREFIXES = {
    "I": ("features.denseblock4", "features.norm5"),
    "II": ("features.denseblock3", "features.transition3", "features.denseblock4", "features.norm5"),
    "III": ("features.denseblock2", "features.transition2", "features.denseblock3", "features.transition3",
            "features.denseblock4", "features.norm5"),
}  # fmt: skip


def published_set(model: nn.Module, variant: str) -> set[str]:
    """The parameters a variant trains by its published rule, from names and module types alone."""
    names = {n for n, _ in model.named_parameters()}
    if variant in ("IV", "scratch"):
        return names
    if variant in TRAINED_PREFIXES:
        return {n for n in names if n.startswith(TRAINED_PREFIXES[variant])} | HEAD
    wanted = ("weight", "bias") if variant == "norm_only" else ("bias",)  # Frankle: γ, β; MobileTL: β
    norms = {f"{m_name}.{p}" for m_name, m in model.named_modules() if isinstance(m, NORM_TYPES)
             for p in wanted if getattr(m, p, None) is not None}  # fmt: skip
    return norms | HEAD


def trainable(model: nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize(
    ("encoder", "norm"),
    [("kimianet", None), ("kimianet", "ibn_a"), ("kimianet", "bcn"), ("kimianet", "group"),
     ("densenet121-imagenet", None), ("cbr-tiny", "evonorm_s0"), ("cbr-tiny", "frn"), ("cbr-small", None),
     ("resnet50-trunc", None)],
)  # fmt: skip
@pytest.mark.parametrize("variant", ["IV", "scratch", "norm_only", "norm_shift", "I", "II", "III"])
def test_each_variant_trains_the_set_of_its_published_rule(encoder, norm, variant):
    if variant in TRAINED_PREFIXES and not encoder.startswith(("kimianet", "densenet")):
        with pytest.raises(
            HistoError, match=f"variant {variant} freezes dense blocks; a .* encoder has none"
        ):
            build_model(encoder, norm, 3, variant)
        return
    model = build_model(encoder, norm, 3, variant)
    expected = published_set(model, variant)
    assert trainable(model) == expected
    assert expected >= HEAD and len(expected) > len(HEAD)
    counts = parameter_counts(model)
    params = dict(model.named_parameters())
    assert counts["trainable"] == sum(params[n].numel() for n in expected)
    assert counts["trainable_head"] == sum(params[n].numel() for n in HEAD)
    assert (
        counts["total"] == counts["trainable"] + counts["frozen"] == sum(p.numel() for p in params.values())
    )


def test_norm_layers_without_scale_or_shift_refuse_the_norm_variants():
    with pytest.raises(
        HistoError, match="variant norm_only trains normalization scales/shifts and norm 'rn_l'"
    ):
        build_model("cbr-tiny", "rn_l", 2, "norm_only")
    assert trainable(build_model("cbr-tiny", "rn_l", 2, "IV"))  # the norm itself is fine


def test_frn_threshold_and_evonorm_v_are_not_affine_and_stay_frozen():
    for norm, extra in (("frn", "tau"), ("evonorm_s0", "v")):
        model = build_model("cbr-tiny", norm, 2, "norm_only")
        assert not any(n.endswith(f".{extra}") for n in trainable(model)), norm


@pytest.mark.parametrize("variant", ["norm_only", "norm_shift"])
def test_bn_running_statistics_follow_the_stated_rule(variant):
    """norm_only (Frankle): BN in train mode, statistics update; norm_shift (MobileTL): frozen, eval mode."""
    model = build_model("kimianet", None, 2, variant).train()
    bns = [m for m in model.features.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(m.training == (variant == "norm_only") for m in bns)
    before = [m.running_mean.clone() for m in bns]
    model(torch.randn(4, 3, PX, PX))
    moved = [not torch.equal(b, m.running_mean) for b, m in zip(before, bns, strict=True)]
    assert all(moved) if variant == "norm_only" else not any(moved)


# ---- an epoch on a store ------------------------------------------------------------------------------
def official_kimianet_file(path: Path, seed: int = 0) -> Path:
    """A file in the released KimiaNet layout (`module.model.0.*`, 30-class `module.fc_4`), random weights
    with non-trivial BN statistics."""
    torch.manual_seed(seed)
    trunk = densenet121_trunk("batch")
    for m in trunk.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
            m.bias.data.uniform_(-0.3, 0.3)
    state = {f"module.model.0.{k}": v for k, v in trunk.state_dict().items()}
    state |= {"module.fc_4.weight": torch.randn(30, 1024), "module.fc_4.bias": torch.randn(30)}
    torch.save(state, path)
    return path


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """6 synthetic slides (2 classes x 3 patients) tiled at 32 px, and an official-layout KimiaNet file."""
    from pathology import tile_slides
    from pathology.config import TileConfig
    from pathology.synthetic import make_cohort

    root = tmp_path_factory.mktemp("finetune")
    csv = make_cohort(root / "slides", n_classes=2, patients_per_class=3, size=(1280, 1024), seed=2)
    tile_slides([root / "slides"], root / "tiles.zarr", load_config(TileConfig, overrides=TILE_OVERRIDES),
                labels_csv=csv, progress=False)  # fmt: skip
    return {"root": root, "tiles": root / "tiles.zarr", "init": official_kimianet_file(root / "kimianet.pth")}


def config(cohort: dict, **overrides) -> TrainConfig:
    base = {"run.device": "cpu", "run.workers": 0, "model.init": str(cohort["init"]), "model.input_px": PX,
            "data.val_fraction": 0.34, "data.samples_per_epoch": 8, "optim.batch_size": 4, "optim.epochs": 1,
            "optim.warmup_epochs": 0.0, "optim.lr": 1e-2, "optim.weight_decay": 0.0}  # fmt: skip
    return load_config(TrainConfig, overrides={**base, **overrides})


@pytest.mark.parametrize("variant", ["norm_only", "norm_shift", "II"])
def test_an_epoch_changes_the_trained_parameters_and_leaves_frozen_ones_bit_identical(
    cohort, tmp_path, variant
):
    run = Run(
        KimiaNetTask(cohort["tiles"], config(cohort, **{"model.variant": variant}), CPU),
        tmp_path / "m.pt",
        CPU,
    )
    trained = published_set(run.model, variant)
    before = {k: v.clone() for k, v in run.model.state_dict().items()}
    run.train_epoch(0)
    after = run.model.state_dict()
    params = {n for n, _ in run.model.named_parameters()}
    for key in params:
        assert torch.equal(before[key], after[key]) == (key not in trained), f"{variant}: {key}"
    stats = [k for k in before if k.endswith(("running_mean", "running_var"))]
    moved = {k for k in stats if not torch.equal(before[k], after[k])}
    if variant == "norm_only":  # Frankle et al.: BatchNorm in train mode, its statistics update
        assert moved == set(stats)
    elif variant == "norm_shift":  # MobileTL: global statistics frozen
        assert moved == set()
    else:  # KimiaNet-II: frozen blocks keep theirs, trained blocks update
        assert moved == {k for k in stats if k.startswith(TRAINED_PREFIXES["II"])}


def _sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def run_cli(args: list) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, [str(a) for a in args])
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout, result.stderr


def train_args(cohort: dict, out: Path, *more) -> list:
    yaml = cohort["root"] / "small.yaml"
    yaml.write_text("data:\n  samples_per_epoch: 8\n  val_fraction: 0.34\noptim:\n  warmup_epochs: 0.0\n")
    return ["train", "--tiles", cohort["tiles"], "--out", out, "--input-px", PX, "--epochs", 1,
            "--batch-size", 4, "--device", "cpu", "--workers", 0, "--config", yaml, *more]  # fmt: skip


def test_fine_tuned_checkpoint_indexes_with_histo_index_model_and_makes_its_feature(cohort, tmp_path):
    from pathology.encoders import open_extractor
    from pathology.store import TileStore
    from search.features import FEATURES_DIR, read_slide
    from search.slide_index import SlideIndex

    ckpt = tmp_path / "ft.pt"
    code, out, err = run_cli(train_args(cohort, ckpt, "--encoder", "kimianet", "--init", cohort["init"],
                                        "--variant", "norm_shift", "--json"))  # fmt: skip
    assert code == 0, err
    summary = json.loads(out)
    model = build_model("kimianet", None, 2, "norm_shift")
    assert summary["parameters"]["trainable"] == sum(p.numel() for n, p in model.named_parameters()
                                                     if n in published_set(model, "norm_shift"))  # fmt: skip
    cfg = checkpoint.load(ckpt, "kimianet").config
    assert cfg["encoder"] == "kimianet" and cfg["variant"] == "norm_shift"
    assert cfg["init"]["sha256"] == _sha256(cohort["init"]) and cfg["init"]["layout"] == "KimiaNet (official)"
    d = cfg["feature_definition"]
    assert (
        d["encoder"] == "kimianet" and d["pooling"] == "avgpool(norm5) without ReLU" and d["input_px"] == PX
    )
    assert d["init_sha256"] == _sha256(cohort["init"]) and d["variant"] == "norm_shift"

    code, _, err = run_cli(["index", "--tiles", cohort["tiles"], "--model", ckpt, "--out", tmp_path / "idx",
                            "--device", "cpu"])  # fmt: skip
    assert code == 0, err
    manifest = json.loads((tmp_path / "idx" / "manifest.json").read_text())
    assert manifest["model"]["hash"] == _sha256(ckpt) and manifest["model"]["feature_definition"] == d
    # the feature by hand: the fine-tuned trunk's avgpool(norm5) of bilinear-resized, ImageNet-normalised tiles
    trunk = densenet121_trunk("batch")
    weights = checkpoint.load(ckpt, "kimianet").weights
    trunk.load_state_dict(OrderedDict((k.removeprefix("features."), v) for k, v in weights.items()
                                      if k.startswith("features.")))  # fmt: skip
    store = TileStore.open(cohort["tiles"])
    sid = store.slide_ids()[0]
    x = torch.from_numpy(store.read_selected(sid)).permute(0, 3, 1, 2).float() / 255
    x = F.interpolate(x, size=(PX, PX), mode="bilinear", antialias=True, align_corners=False)
    x = (x - torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)) / torch.tensor([0.229, 0.224, 0.225]).view(
        3, 1, 1
    )
    with torch.no_grad():
        expected = trunk.eval().feature_map(x).mean(dim=(2, 3))
    _, feats, _ = read_slide(tmp_path / "idx" / FEATURES_DIR, sid)
    torch.testing.assert_close(torch.from_numpy(feats), expected, rtol=1e-5, atol=1e-5)
    # the registry entry reads the fine-tuned checkpoint too, with the same feature
    entry = open_extractor("kimianet", ckpt, "cpu", input_px=PX)
    np.testing.assert_allclose(entry.extract(store.read_selected(sid)), feats, rtol=1e-5, atol=1e-5)
    # a query from other weights (the untrained init) is refused
    untrained = open_extractor("kimianet", cohort["init"], "cpu", input_px=PX)
    with pytest.raises(HistoError, match="refusing to search with a different model"):
        SlideIndex.open(tmp_path / "idx", model=untrained)


def test_a_resnet_fine_tuned_from_a_torchvision_file_gives_its_trunk_feature(cohort, tmp_path):
    """resnet50-trunc from a torchvision-layout file (its layer4/fc ignored): the checkpoint's feature is
    avgpool(layer3) of the fine-tuned trunk, the entry's preprocessing."""
    torch.manual_seed(5)
    trunk = build_model("resnet50-trunc", None, 0, "IV").features
    state = {**trunk.state_dict(), "layer4.0.conv1.weight": torch.zeros(512, 1024, 1, 1),
             "fc.weight": torch.zeros(1000, 2048), "fc.bias": torch.zeros(1000)}  # fmt: skip
    torch.save(state, tmp_path / "resnet50-0676ba61.pth")
    cfg = config(cohort, **{"model.encoder": "resnet50-trunc", "model.variant": "norm_only",
                            "model.init": str(tmp_path / "resnet50-0676ba61.pth")})  # fmt: skip
    summary = train_kimianet(cohort["tiles"], tmp_path / "r.pt", cfg)
    assert summary["init"]["layout"] == "torchvision / timm" and summary["init"]["ignored"]["tensors"] == 3
    fx = FeatureExtractor.from_checkpoint(tmp_path / "r.pt", device="cpu")
    assert fx.feature_definition["pooling"] == "avgpool(layer3)" and fx.feature_dim == 1024
    weights = checkpoint.load(tmp_path / "r.pt", "kimianet").weights
    trunk.load_state_dict(
        {k.removeprefix("features."): v for k, v in weights.items() if k.startswith("features.")}
    )
    x = np.random.default_rng(0).integers(0, 256, (2, 40, 40, 3), dtype=np.uint8)
    t = F.interpolate(torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255, size=(PX, PX), mode="bilinear",
                      antialias=True, align_corners=False)  # fmt: skip
    t = (t - torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)) / torch.tensor([0.229, 0.224, 0.225]).view(
        3, 1, 1
    )
    with torch.no_grad():
        expected = trunk.eval()(t)
    np.testing.assert_allclose(fx.extract(x), expected.numpy(), rtol=1e-5, atol=1e-5)


def test_a_fine_tuned_checkpoint_continues_as_init_of_the_same_encoder_only(cohort, tmp_path):
    first = tmp_path / "a.pt"
    train_kimianet(cohort["tiles"], first, config(cohort, **{"model.variant": "norm_only"}))
    again = train_kimianet(cohort["tiles"], tmp_path / "b.pt", config(cohort, **{"model.init": str(first)}))
    assert again["init"]["layout"] == "histo" and again["init"]["sha256"] == _sha256(first)
    code, _, err = run_cli(
        train_args(cohort, tmp_path / "c.pt", "--encoder", "resnet50-trunc", "--init", first)
    )
    assert code == 2 and "a.pt: a histo checkpoint (densenet121, norm 'batch'), not weights of encoder" in err
    assert not (tmp_path / "c.pt").exists() and not (tmp_path / "c.last.pt").exists()


def test_resume_of_a_fine_tuning_run_equals_the_uninterrupted_run(cohort, tmp_path):
    cfg = config(cohort, **{"model.variant": "norm_shift", "optim.epochs": 2})
    train_kimianet(cohort["tiles"], tmp_path / "full.pt", cfg)
    train_kimianet(cohort["tiles"], tmp_path / "part.pt", cfg, stop_after=1)
    assert checkpoint.load(tmp_path / "part.last.pt", "kimianet-train-state").extra["epoch"] == 1
    torch.manual_seed(99)  # a fresh process would not share the first run's RNG position
    summary = train_kimianet(cohort["tiles"], tmp_path / "part.pt", cfg.updated({"run.resume": True}))
    assert summary["epochs_run"] == 2
    full = checkpoint.load(tmp_path / "full.last.pt", "kimianet-train-state").weights
    part = checkpoint.load(tmp_path / "part.last.pt", "kimianet-train-state").weights
    assert full.keys() == part.keys() and all(torch.equal(full[k], part[k]) for k in full)


def test_histo_train_prints_what_the_variant_trains(cohort, tmp_path):
    code, _, err = run_cli(
        train_args(cohort, tmp_path / "m.pt", "--encoder", "cbr-tiny", "--variant", "norm_only")
    )
    assert code == 0, err
    model = build_model("cbr-tiny", None, 2, "norm_only")
    n = sum(p.numel() for name, p in model.named_parameters() if name in published_set(model, "norm_only"))
    total = sum(p.numel() for p in model.parameters())
    assert re.search(rf"variant norm_only: trains {n:,} of {total:,} parameters", err), err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--encoder", "resnet50-trunc", "--variant", "II", "--init", "w.pth"],
         "model.variant: variant II freezes dense blocks; a resnet encoder has none"),
        (["--encoder", "resnet50-trunc", "--norm", "group", "--variant", "scratch"],
         "model.norm: encoder 'resnet50-trunc' keeps its published norms"),
        (["--encoder", "cbr-tiny", "--norm", "rn_l", "--variant", "norm_shift", "--init", "w.pth"],
         "model.variant: variant norm_shift trains normalization scales/shifts and norm 'rn_l' has none"),
        (["--encoder", "cbr-tiny", "--norm", "rn_b", "--variant", "scratch"], "model.norm: norm 'rn_b' cannot be used here"),
        (["--encoder", "nosuch"], "model.encoder: unknown encoder 'nosuch'"),
        (["--variant", "norm_shift"], "variant norm_shift fine-tunes pretrained weights: give --init PATH"),
        (["--variant", "scratch", "--init", "w.pth"], "--variant scratch trains from random weights; drop --init"),
        (["--variant", "norm_half"], "model.variant: input should be 'I', 'II', 'III', 'IV', 'scratch', 'norm_only' or 'norm_shift'"),
        (["--arch", "densenet121", "--encoder", "kimianet"], "error: --arch is the deprecated spelling of --encoder: give only --encoder"),
        (["--arch", "resnet50"], "error: --arch: unknown arch 'resnet50'; the arch names were densenet121, cbr-large-t, cbr-large-w, cbr-small, cbr-tiny (use --encoder NAME"),
    ],
)  # fmt: skip
def test_bad_combinations_are_one_line_errors_before_any_work(cohort, tmp_path, args, message):
    out = tmp_path / "m.pt"
    code, _, err = run_cli(train_args(cohort, out, *args))
    assert code == 2 and message in err and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


def test_the_deprecated_arch_flag_trains_the_entry_it_names_with_one_warning(cohort, tmp_path):
    """Scripts from before the registry (`--arch densenet121`) still run: the kimianet entry, one warning."""
    code, _, err = run_cli(
        train_args(
            cohort, tmp_path / "m.pt", "--arch", "densenet121", "--variant", "I", "--init", cohort["init"]
        )
    )
    assert code == 0, err
    assert [line for line in err.splitlines() if "--arch" in line] == [
        "warning: --arch is deprecated; use --encoder kimianet"
    ]
    cfg = checkpoint.load(tmp_path / "m.pt", "kimianet").config
    assert (
        cfg["encoder"] == "kimianet"
        and cfg["variant"] == "I"
        and cfg["init"]["sha256"] == _sha256(cohort["init"])
    )


def test_the_old_arch_names_are_registry_entries():
    from pathology.cbr import CBR_SPECS
    from pathology.encoders import get_encoder
    from pathology.kimianet import encoder_of_arch

    assert encoder_of_arch("densenet121") == "kimianet"
    for name in CBR_SPECS:  # the CBR nets kept their names
        assert encoder_of_arch(name) == name and get_encoder(name).family == "cbr"


def test_norm_only_may_start_from_random_weights_as_in_frankle(cohort, tmp_path):
    cfg = config(cohort, **{"model.variant": "norm_only", "model.init": None, "model.encoder": "cbr-tiny"})
    summary = train_kimianet(cohort["tiles"], tmp_path / "m.pt", cfg)
    cfg = checkpoint.load(tmp_path / "m.pt", "kimianet").config
    assert (
        summary["init"] is None and cfg["init"] is None and cfg["feature_definition"]["init_sha256"] is None
    )


def test_config_refusals_name_the_key():
    with pytest.raises(ConfigError, match=r"model\.variant: variant I freezes dense blocks; a cbr encoder"):
        load_config(TrainConfig, overrides={"model.encoder": "cbr-tiny", "model.variant": "I"})


# ---- lane 2: the timm-built entries ------------------------------------------------------------------
@pytest.mark.full
@pytest.mark.parametrize("name", ["uni", "ctranspath"])
@pytest.mark.parametrize("variant", ["norm_only", "norm_shift", "IV"])
def test_timm_entries_train_their_layer_norms_by_the_same_rules(name, variant):
    from pathology.encoders import get_encoder

    entry = get_encoder(name)
    # Swin's stochastic depth can drop a block for the whole batch: off, so every trained tensor gets a gradient
    small = entry.with_arch(depth=2) if name == "uni" else entry.with_arch(drop_path_rate=0.0)
    model = build_model(small, None, 2, variant)
    assert any(isinstance(m, nn.LayerNorm) for m in model.modules())
    assert trainable(model) == published_set(model, variant)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model.train()
    F.cross_entropy(model(torch.randn(2, 3, entry.input_px, entry.input_px)), torch.tensor([0, 1])).backward()
    opt.step()
    after = model.state_dict()
    for key, _ in model.named_parameters():
        assert torch.equal(before[key], after[key]) == (key not in trainable(model)), key
    with pytest.raises(HistoError, match="freezes dense blocks"):
        build_model(small, None, 2, "III")
