"""IBN-Net placement: ibn_a / ibn_b go where the authors' code puts them in every network, or are refused.

References: XingangPan/IBN-Net `ibnnet/resnet_ibn.py` (IBN-a: `bn1` of every block of layer1-3 is IBN with
IN on the first half; IBN-b: conv1's norm is IN, and an IN follows the residual sum of the last block of
layer1-2) and `ibnnet/densenet_ibn.py` (tests/test_densenet.py, tests/test_encoder_weights.py).
"""

from __future__ import annotations

import importlib.util
import re

import pytest
import torch
from conftest import REPO
from torch import nn

from histo import checkpoint
from histo.errors import InputFileError
from histo.norms import IBN, make_norm, resolve_norm
from histo.norms.placement import (
    FIRST,
    OTHER,
    RESNET,
    STAGE_END,
    STEM,
    STEM_END,
    IBNLayout,
    Site,
    place,
    place_extra,
)
from pathology.cbr import CBR_SPECS, cbr
from pathology.kimianet import load_model, model_config, save_model
from segmentation.mbconv import MBConv
from segmentation.unet import UNet3D

STALE = "cannot be converted: retrain the model"


def _kind(module: nn.Module) -> str:
    if isinstance(module, IBN):
        return "ibn"
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return "bn"
    if isinstance(module, nn.modules.instancenorm._InstanceNorm):
        return "in"
    return type(module).__name__


def _norms(model: nn.Module) -> dict[str, str]:
    """name -> kind of every norm module (IBN's own IN/BN halves left out)."""
    out = {}
    for name, m in model.named_modules():
        if name.endswith((".IN", ".BN")):
            continue
        if _kind(m) in ("ibn", "bn", "in"):
            out[name] = _kind(m)
    return out


# ---------------------------------------------------------------- the rule


def test_place_follows_resnet_ibn_a_and_ibn_b_per_site():
    a, b, group = resolve_norm("ibn_a"), resolve_norm("ibn_b"), resolve_norm("group")
    stages = [Site(s, 4, block=k) for s in range(4) for k in range(3)]
    ibn_a = [(s.stage, s.block) for s in stages if place(a, FIRST, RESNET, s).name == "ibn_a"]
    assert ibn_a == [(s, k) for s in range(3) for k in range(3)]  # ibn_cfg=('a', 'a', 'a', None)
    assert {place(a, pos, RESNET, Site(0, 4)).name for pos in (OTHER, STEM)} == {"batch"}
    assert place(a, FIRST, RESNET, Site(None, 4)).name == "batch"  # outside the stages (decoder, head)
    assert place(a, FIRST, RESNET, Site(0, 4)).kwargs == {"ratio": 0.5, "in_first": True}
    assert place(a, FIRST, RESNET, Site(1, 2)).name == "batch"  # the last stage never gets IN
    every3 = IBNLayout("x", every=3)
    assert [place(a, FIRST, every3, Site(0, 4, k)).name for k in range(4)] == [
        "ibn_a",
        "batch",
        "batch",
        "ibn_a",
    ]
    assert place(b, STEM, RESNET).name == "ibn_b" and place(b, FIRST, RESNET, Site(0, 4)).name == "batch"
    ends = [place_extra(b, STAGE_END, RESNET, Site(s, 4)) for s in range(4)]
    assert [e is not None for e in ends] == [True, True, False, False]  # ibn_cfg=('b', 'b', None, None)
    assert place_extra(b, STEM_END, RESNET) is not None and place_extra(a, STEM_END, RESNET) is None
    assert (
        place(group, FIRST, RESNET, Site(3, 4)) == group
        and place_extra(group, STAGE_END, RESNET, Site(0, 4)) is None
    )
    with pytest.raises(ValueError, match="unknown norm site"):
        place(a, STAGE_END, RESNET)


def test_user_arguments_reach_ibn_and_the_bn_sites():
    a = resolve_norm(("ibn_a", {"ratio": 0.25, "momentum": 0.3}))
    ibn = place(a, FIRST, RESNET, Site(0, 4))(16, 2)
    bn = place(a, OTHER, RESNET)(16, 2)
    assert (ibn.IN.num_features, ibn.BN.momentum) == (4, 0.3)
    assert type(bn) is nn.BatchNorm2d and bn.momentum == 0.3


# ---------------------------------------------------------------- networks


@pytest.mark.parametrize("name", sorted(CBR_SPECS))
def test_cbr_ibn_a_in_the_first_three_layers_never_the_last(name):
    n = len(CBR_SPECS[name][0])
    trunk = cbr(name, "ibn_a").features
    kinds = [_kind(getattr(trunk, f"norm{i}")) for i in range(n)]
    assert kinds == ["ibn"] * min(3, n - 1) + ["bn"] * (n - min(3, n - 1))
    assert trunk.norm0.in_first and trunk.norm0.IN.num_features == trunk.norm0.num_features // 2


def test_networks_without_residual_sums_refuse_ibn_b():
    from pathology.densenet import densenet121

    for build in (
        lambda: cbr("cbr-small", "ibn_b"),
        lambda: densenet121("ibn_b"),
        lambda: _study_cnn("ibn_b"),
    ):
        with pytest.raises(ValueError, match="no residual sums"):
            build()


def test_unet_ibn_a_only_in_the_encoders_first_three_levels():
    model = UNet3D(channels=(4, 8, 16, 32), expansion=2, norm="ibn_a")
    norms = _norms(model)
    ibn = {k for k, v in norms.items() if v == "ibn"}
    assert ibn == {f"encoder.{lv}.blocks.{b}.{fg}.norm1" for lv in range(3) for b in range(2) for fg in "fg"}
    assert {v for k, v in norms.items() if k not in ibn} == {"bn"}  # decoder and the deepest level: BN
    shallow = {
        k for k, v in _norms(UNet3D(channels=(4, 8, 16), expansion=2, norm="ibn_a")).items() if v == "ibn"
    }
    assert {k.split(".")[1] for k in shallow} == {"0", "1"}  # three levels: the deepest stays BN


def test_unet_ibn_b_adds_in_after_stem_and_early_levels_and_is_not_the_instance_unet():
    torch.manual_seed(0)
    model = UNet3D(channels=(4, 8, 16, 32), expansion=2, norm="ibn_b").eval()
    norms = _norms(model)
    assert {k for k, v in norms.items() if v == "in"} == {"stem_norm", "encoder_norm.0", "encoder_norm.1"}
    assert {v for k, v in norms.items() if k.startswith(("encoder.", "decoder."))} == {"bn"}
    assert model.stem_norm.affine and model.encoder_norm[0].num_features == 4
    seen = {}
    model.encoder[0].register_forward_hook(lambda m, i, o: seen.__setitem__("level0", o))
    model.encoder_norm[0].register_forward_hook(lambda m, i, o: seen.__setitem__("normed", o))
    model.down[0].register_forward_hook(lambda m, i, o: seen.__setitem__("down_in", i[0]))
    with torch.no_grad():
        model(torch.randn(2, 4, 8, 8, 8))
    level0 = seen["level0"]
    ref = (level0 - level0.mean((2, 3, 4), keepdim=True)) / torch.sqrt(
        level0.var((2, 3, 4), unbiased=False, keepdim=True) + 1e-5
    )
    w = model.encoder_norm[0].weight.view(1, -1, 1, 1, 1)
    torch.testing.assert_close(seen["normed"], ref * w + model.encoder_norm[0].bias.view(1, -1, 1, 1, 1))
    assert torch.equal(seen["down_in"], seen["normed"])  # the IN'd stage output feeds the next stage
    instance = UNet3D(channels=(4, 8, 16, 32), expansion=2, norm="instance")
    assert _norms(instance).keys() != norms.keys()


def test_standalone_mbconv_is_a_first_stage_block():
    kinds = {k: v for k, v in _norms(MBConv(4, expansion=2, norm="ibn_a")).items()}
    assert kinds == {"norm1": "ibn", "norm2": "bn", "norm3": "bn"}
    assert set(_norms(MBConv(4, expansion=2, norm="ibn_b")).values()) == {"bn"}


def _study_cnn(norm: str) -> nn.Module:
    spec = importlib.util.spec_from_file_location("norm_study", REPO / "scripts/norm_study.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.SmallCNN(norm, 4)


def test_norm_study_network_places_ibn_a_like_the_cbr_nets():
    kinds = [v for k, v in _norms(_study_cnn("ibn_a")).items()]
    assert kinds == ["ibn", "ibn", "bn"]
    assert [v for v in _norms(_study_cnn("batch")).values()] == ["bn"] * 3


# ---------------------------------------------------------------- checkpoints from the old placement


def test_old_ibn_a_densenet_checkpoint_gets_one_line(tmp_path):
    from pathology.densenet import densenet121

    old = densenet121(("ibn_a", {"in_first": True}), num_classes=2)  # histo's old IN-first split
    first = old.features.denseblock1.denselayer1.norm1
    assert first.IN.num_features == int(0.4 * 64) == 25
    save_model(tmp_path / "old.pt", old, model_config("densenet121", "ibn_a", "IV", ["a", "b"], 224))
    with pytest.raises(InputFileError, match=re.escape(STALE)) as e:
        load_model(tmp_path / "old.pt")
    assert "\n" not in str(e.value) and "int(0.4*C)" in str(e.value)


@pytest.mark.parametrize("name", ["ibn_a", "ibn_b"])
def test_old_unet_checkpoint_with_the_norm_at_every_site_gets_one_line(tmp_path, name):
    from segmentation.infer import load_model as load_unet

    old = UNet3D(
        channels=(4, 8),
        blocks_per_level=1,
        expansion=2,
        norm=lambda c, spatial_dims: make_norm(name, c, spatial_dims),
    )
    config = {"network": {**old.config, "norm": name}, "train_config": {}}
    checkpoint.save(tmp_path / "old.pt", "unet3d", 1, old.state_dict(), config)
    with pytest.raises(InputFileError, match=re.escape(STALE)) as e:
        load_unet(tmp_path / "old.pt")
    assert "\n" not in str(e.value)
    new = UNet3D(channels=(4, 8), blocks_per_level=1, expansion=2, norm=name)
    checkpoint.save(tmp_path / "new.pt", "unet3d", 1, new.state_dict(), {"network": new.config})
    assert load_unet(tmp_path / "new.pt")[0].config == new.config
