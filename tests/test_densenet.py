"""DenseNet-121 / CBR: torchvision names, the KimiaNet feature against MONAI's DenseNet, norm placement."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from histo.norms import IBN, WSConv2d
from pathology.cbr import CBR_SPECS, cbr
from pathology.densenet import densenet121
from pathology.kimianet import build_model


def _randomise_stats(model: nn.Module, seed: int = 0) -> None:
    """Non-trivial affine parameters and running statistics, so eval-mode comparisons test something."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)


def _to_monai_key(key: str) -> str:
    return re.sub(r"(denselayer\d+)\.", r"\1.layers.", key)


def test_module_names_match_torchvision_layout():
    from monai.networks.nets import DenseNet121

    ours = densenet121("batch", num_classes=7)
    monai = DenseNet121(spatial_dims=2, in_channels=3, out_channels=7)
    # MONAI nests each dense layer under `.layers`; otherwise the names are torchvision's.
    expected = {re.sub(r"\.layers\.", ".", k) for k in monai.state_dict() if k.startswith("features.")}
    got = {k for k in ours.state_dict() if k.startswith("features.")}
    assert got == expected
    assert len([k for k in got if not k.endswith("num_batches_tracked")]) == 604  # + classifier w, b = 606
    assert sum(p.numel() for p in ours.features.parameters()) == 6_953_856  # torchvision densenet121 features


def test_feature_is_avgpool_of_norm5_without_relu_against_monai():
    from monai.networks.nets import DenseNet121

    torch.manual_seed(0)
    ours = densenet121("batch", num_classes=5)
    _randomise_stats(ours)
    monai = DenseNet121(spatial_dims=2, in_channels=3, out_channels=5)
    state = {_to_monai_key(k): v for k, v in ours.state_dict().items() if k.startswith("features.")}
    missing, unexpected = monai.load_state_dict(state, strict=False)
    assert unexpected == [] and sorted(missing) == ["class_layers.out.bias", "class_layers.out.weight"]
    ours.eval()
    monai.eval()
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    ours.double()
    monai.double()
    with torch.no_grad():
        reference = monai.features(x).mean(dim=(2, 3))  # MONAI: features end at norm5 (ReLU is in its head)
        feature = ours.features(x)
        logits = ours(x)
    assert feature.shape == (2, 1024)
    torch.testing.assert_close(feature, reference, atol=1e-5, rtol=0)
    assert (feature < 0).any(), "a ReLU before pooling would make every feature non-negative"
    torch.testing.assert_close(logits, ours.classifier(reference), atol=1e-5, rtol=0)


def test_feature_equals_hooked_norm5_output_in_float32():
    torch.manual_seed(1)
    model = build_model("densenet121", "batch", num_classes=3, variant="scratch").eval()
    _randomise_stats(model, seed=1)
    captured = {}
    model.features.norm5.register_forward_hook(lambda m, i, o: captured.update(out=o))
    x = torch.randn(2, 3, 72, 72)
    with torch.no_grad():
        feature = model.features(x)
    torch.testing.assert_close(feature, captured["out"].mean(dim=(2, 3)), atol=1e-5, rtol=0)


def test_ibn_a_placement_follows_ibn_net_densenet():
    model = densenet121("ibn_a")
    ibn = {name: m for name, m in model.named_modules() if isinstance(m, IBN)}
    expected = {
        f"features.denseblock{b}.denselayer{i}.norm1"
        for b, n in zip((1, 2, 3), (6, 12, 24), strict=True)
        for i in range(1, n + 1, 3)
    }
    assert set(ibn) == expected and len(expected) == 2 + 4 + 8
    for m in ibn.values():  # densenet_ibn.py: BN on the first int(C * (1 - 0.4)) channels, IN on the rest
        n_bn = int(m.num_features * (1 - 0.4))
        assert not m.in_first and (m.BN.num_features, m.IN.num_features) == (n_bn, m.num_features - n_bn)
    first = ibn["features.denseblock1.denselayer1.norm1"]
    assert (first.BN.num_features, first.IN.num_features) == (38, 26)  # 64 channels; histo had IN 25
    others = [m for n, m in model.named_modules() if n.endswith(("norm", "norm0", "norm1", "norm2", "norm5"))]
    assert all(isinstance(m, nn.BatchNorm2d) for m in others if not isinstance(m, IBN))


def test_bcn_uses_weight_standardised_convolutions_and_evonorm_drops_relu():
    bcn = densenet121("bcn")
    convs = [m for m in bcn.modules() if isinstance(m, nn.Conv2d)]
    assert convs and all(isinstance(m, WSConv2d) for m in convs)
    evo = densenet121("evonorm_s0")
    assert not any(isinstance(m, nn.ReLU) for m in evo.modules())
    assert sum(isinstance(m, nn.ReLU) for m in densenet121("group").modules()) == 1 + 2 * 58 + 3


@pytest.mark.parametrize("name", sorted(CBR_SPECS))
def test_cbr_specs(name):
    widths, kernel, last_pool = CBR_SPECS[name]
    model = cbr(name, "batch", num_classes=4)
    convs = [m for m in model.features if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == list(widths)
    assert all(c.kernel_size == (kernel, kernel) and c.stride == (1, 1) for c in convs)
    pools = sum(isinstance(m, nn.MaxPool2d) for m in model.features)
    assert pools == len(widths) - (0 if last_pool else 1)
    x = torch.randn(2, 3, 64, 64)
    assert model(x).shape == (2, 4) and model.features(x).shape == (2, widths[-1])


def test_frozen_parts_stay_in_eval_mode():
    model = build_model("densenet121", "batch", num_classes=2, variant="II")
    model.train()
    assert not model.features.denseblock2.training and not model.features.transition2.training
    assert model.features.transition3.training and model.features.denseblock3.training
    assert model.features.norm5.training and model.classifier.training
    with pytest.raises(Exception, match=r"no dense blocks|freezes dense blocks"):
        build_model("cbr-tiny", "batch", 2, variant="I")


@pytest.mark.parametrize(
    "norm", ["batch", "ibn_a", "group", "instance", "layer", "bcn", "evonorm_b0", "evonorm_s0", "frn", "rn_l"]
)
def test_every_usable_norm_trains(norm):
    torch.manual_seed(0)
    model = build_model("densenet121", norm, num_classes=3, variant="scratch").train()
    loss = nn.functional.cross_entropy(model(torch.randn(2, 3, 64, 64)), torch.tensor([0, 2]))
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize(
    ("norm", "reason"), [("rn_b", "region mask"), ("ibn_b", "no residual sums"), ("nope", "unknown")]
)
def test_unusable_norms_are_refused(norm, reason):
    from histo.errors import HistoError

    with pytest.raises(HistoError, match=reason):
        build_model("densenet121", norm, 2, "scratch")
