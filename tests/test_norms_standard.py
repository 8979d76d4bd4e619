"""Registry, the torch-equivalent norms (batch/instance/group/layer/ibn_b), IBN-a and the MONAI factory."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from monai.networks.layers import get_norm_layer
from monai.networks.layers.factories import Norm
from monai.networks.nets import BasicUNet
from torch import nn

from histo.norms import IBN, make_norm, monai_name, names, region_mask, resolve_groups, set_region_mask

ALL = [
    "batch", "bcn", "evonorm_b0", "evonorm_s0", "frn", "group",
    "ibn_a", "ibn_b", "instance", "layer", "rn_b", "rn_l",
]  # fmt: skip


def _randomize(m: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial affine parameters so that tests also pin how they are applied."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.5 + (1.0 if p.ndim else 0.0))
    return m


def test_registry_lists_every_required_name():
    assert names() == sorted(ALL)


@pytest.mark.parametrize("spatial_dims", [1, 2, 3])
@pytest.mark.parametrize("name", ALL)
def test_every_name_builds_and_runs(name, spatial_dims):
    torch.manual_seed(0)
    m = make_norm(name, 8, spatial_dims)
    x = torch.randn(2, 8, *([6] * spatial_dims), requires_grad=True)
    mask = torch.rand(2, 1, *([12] * spatial_dims)) > 0.5  # other resolution: resized per block
    with region_mask(m, mask):
        for train in (True, False):
            m.train(train)
            y = m(x)
            assert y.shape == x.shape and torch.isfinite(y).all()
        y.square().sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert all(p.grad is not None for p in m.parameters())


def test_bad_arguments_fail_loudly():
    with pytest.raises(ValueError, match="unknown norm 'bogus'"):
        make_norm("bogus", 8)
    with pytest.raises(ValueError, match="spatial_dims"):
        make_norm("group", 8, spatial_dims=4)
    with pytest.raises(ValueError, match="expected input"):
        make_norm("frn", 8, 2)(torch.randn(2, 8, 4, 4, 4))
    with pytest.raises(ValueError, match="IN channels"):
        make_norm("ibn_a", 1)
    with pytest.raises(TypeError):
        make_norm("group", 8, num_group=4)  # misspelt keyword is not swallowed


@pytest.mark.parametrize(
    ("channels", "requested", "expected"),
    [
        (64, 32, 32),
        (256, 32, 32),
        (16, 32, 16),
        (48, 32, 24),
        (100, 32, 25),
        (37, 32, 1),
        (64, 8, 8),
        (12, 8, 6),
    ],
)
def test_group_count_rule(channels, requested, expected):
    assert resolve_groups(channels, requested) == expected
    assert make_norm("group", channels, num_groups=requested).num_groups == expected


@pytest.mark.parametrize("spatial_dims", [1, 2, 3])
def test_group_equals_torch_groupnorm(spatial_dims):
    torch.manual_seed(1)
    x = torch.randn(3, 64, *([5] * spatial_dims), dtype=torch.float64)
    ours = _randomize(make_norm("group", 64, spatial_dims).double())
    ref = nn.GroupNorm(32, 64).double()
    ref.load_state_dict(ours.state_dict())
    torch.testing.assert_close(ours(x), ref(x), rtol=0, atol=1e-12)


@pytest.mark.parametrize("spatial_dims", [1, 2, 3])
def test_layer_is_layer_norm_over_channels_and_space(spatial_dims):
    torch.manual_seed(2)
    x = torch.randn(3, 6, *([4] * spatial_dims), dtype=torch.float64)
    m = _randomize(make_norm("layer", 6, spatial_dims).double())
    view = (1, 6) + (1,) * spatial_dims
    ref = F.layer_norm(x, x.shape[1:], eps=1e-5) * m.weight.view(view) + m.bias.view(view)
    torch.testing.assert_close(m(x), ref, rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", ["instance", "ibn_b"])
@pytest.mark.parametrize("spatial_dims", [1, 2, 3])
def test_instance_and_ibn_b_are_affine_instance_norm(name, spatial_dims):
    torch.manual_seed(3)
    x = torch.randn(2, 5, *([6] * spatial_dims), dtype=torch.float64)
    m = _randomize(make_norm(name, 5, spatial_dims).double())
    assert m.affine and not m.track_running_stats
    axes = tuple(range(2, 2 + spatial_dims))
    mean, var = x.mean(axes, keepdim=True), x.var(axes, unbiased=False, keepdim=True)
    view = (1, 5) + (1,) * spatial_dims
    ref = (x - mean) / torch.sqrt(var + 1e-5) * m.weight.view(view) + m.bias.view(view)
    torch.testing.assert_close(m(x), ref, rtol=0, atol=1e-12)


@pytest.mark.parametrize("spatial_dims", [1, 2, 3])
def test_batch_is_torch_batchnorm(spatial_dims):
    m = make_norm("batch", 7, spatial_dims, momentum=0.3, eps=1e-4)
    assert type(m) is {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[spatial_dims]
    assert (m.num_features, m.momentum, m.eps) == (7, 0.3, 1e-4)


@pytest.mark.parametrize(("channels", "ratio", "half"), [(8, 0.5, 4), (10, 0.4, 4), (7, 0.5, 3)])
def test_ibn_a_is_in_on_first_channels_and_bn_on_the_rest(channels, ratio, half):
    torch.manual_seed(4)
    m = _randomize(make_norm("ibn_a", channels, 2, ratio=ratio).double())
    assert isinstance(m, IBN) and m.half == half
    inorm = nn.InstanceNorm2d(half, affine=True).double()
    bnorm = nn.BatchNorm2d(channels - half).double()
    inorm.load_state_dict(m.IN.state_dict())
    bnorm.load_state_dict(m.BN.state_dict())
    for _ in range(2):  # train (batch statistics, running stats move identically), then eval
        x = torch.randn(4, channels, 5, 5, dtype=torch.float64) * 3 + 1
        ref = torch.cat([inorm(x[:, :half]), bnorm(x[:, half:])], dim=1)
        torch.testing.assert_close(m(x), ref, rtol=0, atol=1e-12)
        m.eval(), inorm.eval(), bnorm.eval()
    torch.testing.assert_close(m.BN.running_var, bnorm.running_var)


@pytest.mark.parametrize(("channels", "n_bn"), [(64, 38), (10, 6), (7, 4)])
def test_ibn_a_densenet_split_is_bn_first_then_in(channels, n_bn):
    """IBN-Net's densenet_ibn.py: BN on the first int(C * (1 - r)) channels, IN on the rest (r = 0.4)."""
    torch.manual_seed(5)
    m = _randomize(make_norm("ibn_a", channels, 2, ratio=0.4, in_first=False).double())
    assert (m.BN.num_features, m.IN.num_features) == (n_bn, channels - n_bn)
    bnorm = nn.BatchNorm2d(n_bn).double()
    inorm = nn.InstanceNorm2d(channels - n_bn, affine=True).double()
    bnorm.load_state_dict(m.BN.state_dict())
    inorm.load_state_dict(m.IN.state_dict())
    x = torch.randn(4, channels, 5, 5, dtype=torch.float64) * 3 + 1
    torch.testing.assert_close(
        m(x), torch.cat([bnorm(x[:, :n_bn]), inorm(x[:, n_bn:])], 1), rtol=0, atol=1e-12
    )


@pytest.mark.parametrize("spatial_dims", [1, 2, 3])
@pytest.mark.parametrize("name", ALL)
def test_monai_norm_factory_builds_every_name(name, spatial_dims):
    ctor = Norm[monai_name(name), spatial_dims]
    direct = ctor(num_features=8)
    via_get = get_norm_layer((monai_name(name), {"eps": 1e-4}), spatial_dims=spatial_dims, channels=8)
    ref = make_norm(name, 8, spatial_dims)
    assert type(direct) is type(ref) and type(via_get) is type(ref)
    assert {k: v.shape for k, v in via_get.state_dict().items()} == {
        k: v.shape for k, v in ref.state_dict().items()
    }
    x = torch.randn(2, 8, *([6] * spatial_dims))
    with region_mask(via_get, torch.ones(1, 1, *([6] * spatial_dims), dtype=torch.bool)):
        assert via_get(x).shape == x.shape


def test_monai_builtin_names_are_not_overridden():
    assert [monai_name(n) for n in ("batch", "instance", "group", "layer")] == [
        "histo_batch", "histo_instance", "histo_group", "histo_layer",
    ]  # fmt: skip
    assert Norm["instance", 2] is nn.InstanceNorm2d and Norm["group", 2] is nn.GroupNorm
    assert monai_name("ibn_a") == "ibn_a"


@pytest.mark.parametrize("name", ALL)
def test_real_monai_network_accepts_every_name(name):
    torch.manual_seed(5)
    net = BasicUNet(spatial_dims=2, in_channels=1, out_channels=2, features=(8, 8, 16, 16, 32, 8),
                    norm=(monai_name(name), {}))  # fmt: skip
    built = {type(m) for m in net.modules()}
    assert type(make_norm(name, 8, 2)) in built
    x = torch.randn(2, 1, 32, 32)
    n_rn = set_region_mask(net, torch.rand(2, 1, 32, 32) > 0.3)
    assert (n_rn > 0) == (name == "rn_b")
    y = net(x)
    y.square().mean().backward()
    assert y.shape == (2, 2, 32, 32) and torch.isfinite(y).all()
    set_region_mask(net, None)


def test_monai_network_takes_norm_kwargs():
    net = BasicUNet(spatial_dims=2, in_channels=1, out_channels=1, features=(8, 8, 16, 16, 32, 8),
                    norm=("ibn_a", {"ratio": 0.25}))  # fmt: skip
    assert {m.half for m in net.modules() if isinstance(m, IBN)} == {2, 4, 8}
