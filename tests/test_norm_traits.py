"""Norm traits: each registered norm's declared traits match what its modules and the networks do, the
three `norm` forms build identical networks, and a throwaway norm (one class + one `@register`) works end to
end in the U-Net, the reversible backward, α-BN, DenseNet, CBR, the KimiaNet trainer and MONAI."""

from __future__ import annotations

import functools
import re

import pytest
import torch
from monai.networks.layers import get_norm_layer
from torch import nn

import histo.norms as hn
from histo.calibration import alpha_bn, revert_alpha_bn
from histo.norms.common import CONV
from pathology.cbr import cbr
from pathology.densenet import densenet121
from pathology.kimianet import NO_MASK, build_model
from segmentation.mbconv import MBConv
from segmentation.unet import UNet3D

NAMES = hn.names()
SMALL_UNET = {"channels": (8, 16), "blocks_per_level": 1, "expansion": 2}


def _input(spatial_dims: int, channels: int = 8) -> torch.Tensor:
    return torch.randn(4, channels, *[6] * spatial_dims, generator=torch.Generator().manual_seed(0))


def _masked(module: nn.Module, x: torch.Tensor) -> nn.Module:
    """Give region-masked blocks a half-volume mask (a no-op for every other norm)."""
    mask = torch.zeros(x.shape[0], 1, *x.shape[2:], dtype=torch.bool)
    mask[..., : x.shape[-1] // 2] = True
    hn.set_region_mask(module, mask)
    return module


# ---------------------------------------------------------------- registered norms: traits vs behaviour


@pytest.mark.parametrize("name", NAMES)
def test_declared_spatial_dims_build_and_run(name: str) -> None:
    traits = hn.norm_traits(name)
    for dims in traits.spatial_dims:
        x = _input(dims)
        assert _masked(hn.make_norm(name, 8, dims), x)(x).shape == x.shape
    for dims in {0, 4} | ({1, 2, 3} - traits.spatial_dims):
        with pytest.raises(ValueError, match="spatial_dims"):
            hn.make_norm(name, 8, dims)


@pytest.mark.parametrize("name", NAMES)
def test_calibratable_trait_is_what_alpha_bn_converts(name: str) -> None:
    shifted = _input(2, 64) * 3 + 2  # 64 channels: BCN's group norm keeps 2 per group, not cancelling BN
    block = _masked(hn.make_norm(name, 64, 2), shifted).eval()
    with torch.no_grad():
        source = block(shifted)
        converted = alpha_bn(block, 0.5)
        calibrated = block(shifted)
    assert (converted > 0) == hn.norm_traits(name).calibratable
    assert torch.equal(calibrated, source) != hn.norm_traits(name).calibratable  # converted ones really mix
    revert_alpha_bn(block)
    with torch.no_grad():
        assert torch.equal(block(shifted), source)


@pytest.mark.parametrize("name", NAMES)
def test_recompute_state_trait_is_the_protocol(name: str) -> None:
    block = hn.make_norm(name, 8, 3)
    stateful = [m for m in block.modules() if isinstance(m, hn.RecomputeState)]
    assert bool(stateful) == hn.norm_traits(name).recompute_state
    for m in stateful:  # the saved state round-trips
        state = m.save_state()
        m.restore_state(None)
        m.restore_state(state)
        assert m.save_state() is state


@pytest.mark.parametrize("name", NAMES)
def test_region_mask_trait_is_what_set_region_mask_reaches(name: str) -> None:
    block = hn.make_norm(name, 8, 2)
    x = _input(2)
    needs_mask = hn.norm_traits(name).region_mask
    if needs_mask:
        with pytest.raises(RuntimeError, match="region mask"):
            block(x)
    assert (hn.set_region_mask(block, x[:, :1] > 0) > 0) == needs_mask
    assert block(x).shape == x.shape


@pytest.mark.parametrize("name", NAMES)
def test_activating_trait_decides_the_activation_in_mbconv_cbr_and_densenet(name: str) -> None:
    activating = hn.norm_traits(name).activating
    assert isinstance(MBConv(4, expansion=2, norm=name).act, nn.Identity if activating else nn.SiLU)
    for model in filter(None, _placeable(name, lambda: cbr("cbr-tiny", name), lambda: densenet121(name))):
        relus = [m for m in model.modules() if isinstance(m, nn.ReLU)]
        assert (not relus) == activating
    assert isinstance(hn.make_norm_act(name, 8, 2).act, nn.Identity if activating else nn.ReLU)


@pytest.mark.parametrize("name", NAMES)
def test_conv_trait_is_the_convolution_networks_use(name: str) -> None:
    paired = hn.norm_traits(name).conv
    for dims in (1, 2, 3):
        assert hn.conv_for(name, dims) is (CONV[dims] if paired is None else paired[dims])
    mb = MBConv(4, expansion=2, norm=name)
    assert {type(mb.expand), type(mb.depthwise), type(mb.project)} == {hn.conv_for(name, 3)}
    trunk, dense = _placeable(
        name, lambda: cbr("cbr-tiny", name).features, lambda: densenet121(name).features
    )
    if trunk is not None:
        assert {type(getattr(trunk, f"conv{i}")) for i in range(4)} == {hn.conv_for(name, 2)}
        layer = dense.denseblock1.denselayer1
        assert {type(layer.conv1), type(layer.conv2)} == {hn.conv_for(name, 2)}


def _placeable(name: str, *builders) -> list:
    """Each built network, or [None, ...] after checking that every builder refuses a placed norm that
    the CBR and DenseNet families refuse (ibn_b: neither has residual sums) with the trait's reason."""
    reason = hn.norm_traits(name).unsupported.get("cbr") if hn.norm_traits(name).placement else None
    if reason is None:
        return [build() for build in builders]
    for build in builders:
        with pytest.raises(ValueError, match=re.escape(reason)):
            build()
    return [None] * len(builders)


@pytest.mark.parametrize("name", NAMES)
def test_affine_trait_is_what_norm_parameters_finds(name: str) -> None:
    """Every registry block is a norm layer; its own `weight`/`bias` are its scale/shift, nothing else."""
    block = hn.make_norm(name, 64, 2)
    assert hn.is_norm_layer(block) and "" in hn.norm_layers(block)
    roles = hn.norm_parameters(block)
    assert bool(roles) == hn.norm_traits(name).affine
    params = dict(block.named_parameters())
    for key, role in roles.items():
        assert key.rsplit(".", 1)[-1] == {"scale": "weight", "shift": "bias"}[role] and key in params
    assert not any(k.endswith(("tau", ".v", "attention.weight")) or k in ("v", "tau") for k in roles)


def test_norm_layers_of_networks_built_outside_the_registry() -> None:
    """torch's own norm classes count too (timm's ViTs, the ResNet-50 trunk), whatever built them."""
    net = nn.Sequential(
        nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.Sequential(nn.LayerNorm(4), nn.Linear(4, 2))
    )
    assert hn.norm_layers(net) == ["1", "2.0"]
    assert hn.norm_parameters(net) == {
        "1.weight": "scale",
        "1.bias": "shift",
        "2.0.weight": "scale",
        "2.0.bias": "shift",
    }


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("arch", ["densenet121", "cbr-tiny"])
def test_kimianet_refuses_exactly_what_the_traits_refuse(name: str, arch: str) -> None:
    from histo.errors import HistoError

    family = "densenet" if arch == "densenet121" else "cbr"
    reason = hn.norm_traits(name).refusal(family, no_mask=NO_MASK)
    if reason is None:
        assert build_model(arch, name, 2, "scratch") is not None
    else:
        with pytest.raises(HistoError, match=re.escape(f"norm '{name}' cannot be used here: {reason}")):
            build_model(arch, name, 2, "scratch")


def test_declared_traits_of_the_shipped_norms() -> None:
    """The registry's declarations themselves (what the formulas' papers say), so none drifts silently."""

    def having(trait: str) -> set[str]:
        return {n for n in NAMES if getattr(hn.norm_traits(n), trait)}

    assert having("activating") == {"evonorm_b0", "evonorm_s0", "frn"}
    assert having("calibratable") == {"batch", "ibn_a", "bcn", "evonorm_b0"}
    assert having("region_mask") == having("recompute_state") == {"rn_b"}
    assert having("conv") == {"bcn"} and hn.norm_traits("bcn").conv == hn.WS_CONV
    assert having("placement") == {"ibn_a", "ibn_b"} and hn.norm_traits("ibn_a").placement == hn.IBN_A
    assert hn.norm_traits("ibn_b").placement == hn.IBN_B
    assert having("unsupported") == {"ibn_b"}
    assert set(NAMES) - having("affine") == {"rn_l"}


# ---------------------------------------------------------------- make_norm_act, conv_for, resolve_norm


def test_make_norm_act_and_conv_for_give_the_expected_classes() -> None:
    norm, act = hn.make_norm_act("batch", 8, 3)
    assert type(norm) is nn.BatchNorm3d and type(act) is nn.ReLU
    assert type(hn.make_norm_act("group", 8, 2, act=nn.SiLU).act) is nn.SiLU
    for name, cls in [
        ("frn", hn.FilterResponseNorm),
        ("evonorm_b0", hn.EvoNormB0),
        ("evonorm_s0", hn.EvoNormS0),
    ]:
        norm, act = hn.make_norm_act(name, 8, 2, act=nn.SiLU)
        assert type(norm) is cls and type(act) is nn.Identity
    norm, _ = hn.make_norm_act(("group", {"num_groups": 4}), 8, 2, eps=1e-3)
    assert (norm.num_groups, norm.eps) == (4, 1e-3)
    assert [hn.conv_for("bcn", d) for d in (1, 2, 3)] == [hn.WSConv1d, hn.WSConv2d, hn.WSConv3d]
    assert [hn.conv_for("batch", d) for d in (1, 2, 3)] == [nn.Conv1d, nn.Conv2d, nn.Conv3d]
    with pytest.raises(ValueError, match="spatial_dims"):
        hn.conv_for("bcn", 4)


def test_resolve_norm_forms_and_refusals() -> None:
    spec = hn.get_norm("group")
    pair = hn.resolve_norm(("group", {"num_groups": 4}))
    assert (
        pair
        == hn.resolve_norm("group", {"num_groups": 4})
        == hn.resolve_norm(functools.partial(spec, num_groups=4))
    )
    assert pair == hn.resolve_norm((spec, {"num_groups": 4})) == hn.resolve_norm(pair)
    assert hn.resolve_norm(("group", {"num_groups": 4}), {"num_groups": 2}).kwargs == {"num_groups": 2}
    assert pair.name == "group" and pair.traits == spec.traits
    plain = hn.resolve_norm(hn.EvoNormS0)  # an unregistered callable: plain traits, called with spatial_dims
    assert plain.name is None and plain.traits == hn.NormTraits()
    assert type(plain(8, 3)) is hn.EvoNormS0 and plain(8, 3).spatial_dims == 3
    assert type(hn.resolve_norm(nn.BatchNorm2d)(8, 2)) is nn.BatchNorm2d  # no spatial_dims parameter
    for bad in [("group",), ("group", 4), 5, None]:
        with pytest.raises(ValueError, match="norm"):
            hn.resolve_norm(bad)
    with pytest.raises(ValueError, match="unknown norm 'nope'"):
        hn.resolve_norm("nope")
    with pytest.raises(ValueError, match="already registered"):
        hn.register("group")


def _same_networks(models: list[nn.Module], x: torch.Tensor) -> None:
    """Same modules under the same names, equal state, equal outputs (state compared before any forward)."""
    first = models[0]
    for model in models[1:]:
        assert [(n, type(m)) for n, m in model.named_modules()] == [
            (n, type(m)) for n, m in first.named_modules()
        ]
        a, b = first.state_dict(), model.state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    outputs = [_masked(model, x)(x) for model in models]
    assert all(torch.equal(out, outputs[0]) for out in outputs[1:])


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [("group", {"num_groups": 4}), ("evonorm_s0", {}), ("bcn", {"num_groups": 4}), ("rn_b", {})],
)
def test_the_three_norm_forms_build_identical_unets(name: str, kwargs: dict) -> None:
    spec = hn.get_norm(name)
    forms = [
        {"norm": name, "norm_kwargs": kwargs or None},
        {"norm": (name, kwargs)},
        {"norm": functools.partial(spec, **kwargs)},
        {"norm": spec, "norm_kwargs": kwargs},
    ]
    x = torch.randn(2, 4, 8, 8, 8)
    models = []
    for form in forms:
        torch.manual_seed(0)
        models.append(UNet3D(**SMALL_UNET, **form))
    _same_networks(models, x)
    assert all(model.config == models[0].config for model in models)
    assert models[0].config["norm"] == name and UNet3D(**models[0].config).config == models[0].config


@pytest.mark.parametrize("name", ["ibn_a", "evonorm_b0", "bcn"])
def test_the_three_norm_forms_build_identical_densenets_and_cbrs(name: str) -> None:
    x = torch.randn(2, 3, 64, 64)
    for build in (densenet121, functools.partial(cbr, "cbr-small")):
        models = []
        for form in (name, (name, {}), hn.get_norm(name)):
            torch.manual_seed(0)
            models.append(build(norm=form).eval())
        _same_networks(models, x)


def test_unregistered_callable_is_a_plain_norm_in_networks() -> None:
    torch.manual_seed(0)
    by_name = cbr("cbr-tiny", "batch")
    torch.manual_seed(0)
    by_callable = cbr("cbr-tiny", lambda channels: nn.BatchNorm2d(channels))
    _same_networks([by_name, by_callable], torch.randn(2, 3, 32, 32))
    assert any(isinstance(m, nn.ReLU) for m in cbr("cbr-tiny", hn.EvoNormS0).modules())  # undeclared: plain


# ---------------------------------------------------------------- a throwaway norm, end to end

THROWAWAY = "test_gated_bn"
REASON = "the throwaway norm is not defined for DenseNet"


class GatedBatchNorm(nn.Module):
    """Throwaway norm: BN-style centring with a running mean, then its own activation, times a caller's gain.

    y = gain * z * sigmoid(z), z = c / rms(c) * w + b, c = x - mean; rms per sample and channel over space;
    mean: the batch's in training (running mean updated only when `updates_stats`), the running one in
    eval, α-mixed under `calibrate(α)`. `gain` is state the caller sets before a forward, so a reversible
    recompute must restore it (`save_state`/`restore_state`).
    """

    def __init__(self, num_features: int, spatial_dims: int = 2, momentum: float = 0.1) -> None:
        super().__init__()
        self.num_features, self.spatial_dims, self.momentum = num_features, spatial_dims, momentum
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.calibration_alpha: float | None = None
        self.gain = 1.0

    def calibrate(self, alpha: float | None) -> None:
        self.calibration_alpha = alpha

    def save_state(self) -> float:
        return self.gain

    def restore_state(self, state: float) -> None:
        self.gain = state

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        axes, view = (0, *range(2, x.ndim)), (1, -1) + (1,) * (x.ndim - 2)
        if self.training:
            mean = x.mean(axes)
            if hn.updates_stats(self):
                with torch.no_grad():
                    self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), self.momentum)
        elif self.calibration_alpha is None:
            mean = self.running_mean.to(x.dtype)
        else:
            mean = (1 - self.calibration_alpha) * self.running_mean + self.calibration_alpha * x.mean(axes)
        c = x - mean.view(view)
        c = c * torch.rsqrt(c.pow(2).mean(axes[1:], keepdim=True) + 1e-5)
        z = c * self.weight.view(view) + self.bias.view(view)
        return self.gain * z * torch.sigmoid(z)


@pytest.fixture
def throwaway():
    """Register the throwaway norm for one test (the one registration a new norm needs), then remove it."""

    @hn.register(  # one registration: the class above plus its traits
        THROWAWAY,
        traits=hn.NormTraits(
            activating=True,
            conv=hn.WS_CONV,
            calibratable=True,
            recompute_state=True,
            unsupported={"densenet": REASON},
        ),
    )
    def _gated(channels: int, spatial_dims: int, **kwargs) -> nn.Module:
        return GatedBatchNorm(channels, spatial_dims, **kwargs)

    yield THROWAWAY
    hn.unregister(THROWAWAY)
    assert THROWAWAY not in hn.names()


def _gated_blocks(model: nn.Module) -> list[GatedBatchNorm]:
    return [m for m in model.modules() if isinstance(m, GatedBatchNorm)]


def _set_gain(model: nn.Module, gain: float) -> None:
    for m in _gated_blocks(model):
        m.gain = gain


def test_throwaway_norm_in_a_reversible_unet(throwaway: str) -> None:
    """Built by name: no SiLU after it, its paired convolutions, and the recompute sees the forward's gain."""
    torch.manual_seed(0)
    rev = UNet3D(**SMALL_UNET, norm=throwaway, reversible=True).double()
    plain = UNet3D(**SMALL_UNET, norm=throwaway, reversible=False).double()
    plain.load_state_dict(rev.state_dict())
    assert len(_gated_blocks(rev)) == 3 * 2 * 3  # 3 sequences x (F, G) x 3 norms per MBConv
    bodies = [m for m in rev.modules() if isinstance(m, MBConv)]
    assert all(isinstance(b.act, nn.Identity) and type(b.depthwise) is hn.WSConv3d for b in bodies)
    x = torch.randn(2, 4, 8, 8, 8, dtype=torch.float64)
    weight = torch.randn(2, 3, 8, 8, 8, dtype=torch.float64)

    def step(model: nn.Module, forward_gain: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        model.zero_grad()
        _set_gain(model, forward_gain)
        xi = x.clone().requires_grad_(True)
        loss = (model(xi) * weight).sum()
        _set_gain(model, 3.0)  # changed before backward: the recompute must use the forward's gain
        loss.backward()
        assert all(m.gain == 3.0 for m in _gated_blocks(model))  # and the caller's state is kept
        return xi.grad, {n: p.grad.clone() for n, p in model.named_parameters()}

    gx_rev, gp_rev = step(rev, 0.5)
    gx_plain, gp_plain = step(plain, 0.5)
    torch.testing.assert_close(gx_rev, gx_plain, rtol=1e-6, atol=1e-9)
    assert gp_rev.keys() == gp_plain.keys()
    for name, g in gp_plain.items():
        assert torch.isfinite(g).all(), name
        torch.testing.assert_close(gp_rev[name], g, rtol=1e-6, atol=1e-9, msg=name)
    assert not torch.allclose(step(plain, 3.0)[0], gx_plain)  # the gain really changes the gradients


def test_throwaway_norm_running_state_moves_once_per_reversible_step(throwaway: str) -> None:
    torch.manual_seed(0)
    rev = UNet3D(**SMALL_UNET, norm=throwaway, reversible=True).double()
    plain = UNet3D(**SMALL_UNET, norm=throwaway, reversible=False).double()
    plain.load_state_dict(rev.state_dict())
    x = torch.randn(2, 4, 8, 8, 8, dtype=torch.float64)
    for model in (rev, plain):
        model(x).sum().backward()
    for (name, a), (_, b) in zip(rev.named_buffers(), plain.named_buffers(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-14, msg=name)
        assert not torch.equal(a, torch.zeros_like(a)), name


def test_throwaway_norm_is_calibrated_by_alpha_bn(throwaway: str) -> None:
    torch.manual_seed(0)
    model = UNet3D(**SMALL_UNET, norm=throwaway, reversible=True)
    with torch.no_grad():
        model(torch.randn(2, 4, 8, 8, 8))  # source running means
    model.eval()
    x = torch.randn(2, 4, 8, 8, 8) * 2 + 1
    with torch.no_grad():
        source = model(x)
        assert alpha_bn(model, 0.0) == len(_gated_blocks(model))
        assert torch.equal(model(x), source)
        alpha_bn(model, 1.0)
        calibrated = model(x)
        revert_alpha_bn(model)
        assert torch.equal(model(x), source)
    assert not torch.allclose(calibrated, source)
    assert all(m.calibration_alpha is None for m in _gated_blocks(model))


def test_throwaway_norm_in_cbr_and_densenet(throwaway: str) -> None:
    from histo.errors import HistoError

    torch.manual_seed(0)
    for model in (cbr("cbr-small", throwaway, num_classes=3), densenet121(throwaway, num_classes=3)):
        assert not any(isinstance(m, nn.ReLU) for m in model.modules())
        assert {type(m) for m in model.features.modules() if isinstance(m, nn.Conv2d)} == {hn.WSConv2d}
        model.train()
        loss = nn.functional.cross_entropy(model(torch.randn(2, 3, 64, 64)), torch.tensor([0, 2]))
        loss.backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
        assert alpha_bn(model.eval(), 0.1) == len(_gated_blocks(model)) > 0
    assert isinstance(build_model("cbr-tiny", throwaway, 2, "scratch").features.norm0, GatedBatchNorm)
    with pytest.raises(HistoError, match=f"norm '{throwaway}' cannot be used here: {REASON}"):
        build_model("densenet121", throwaway, 2, "scratch")


def test_throwaway_norm_in_monai_and_gone_after_unregister(throwaway: str) -> None:
    block = get_norm_layer((hn.monai_name(throwaway), {"momentum": 0.5}), spatial_dims=3, channels=6)
    assert isinstance(block, GatedBatchNorm) and block.spatial_dims == 3 and block.momentum == 0.5
    assert throwaway in hn.names()
    spec = hn.get_norm(throwaway)
    hn.unregister(throwaway)
    with pytest.raises(ValueError, match="unknown norm"):
        hn.make_norm(throwaway, 4)
    with pytest.raises(ValueError):
        get_norm_layer(hn.monai_name(throwaway), spatial_dims=3, channels=6)
    hn.register(throwaway, traits=spec.traits)(spec.builder)  # back for the fixture's teardown
