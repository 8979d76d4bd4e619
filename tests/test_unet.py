"""Reversible MBConv 3D U-Net: heads and shapes, input checks, config rebuild, twin equivalence, memory."""

from __future__ import annotations

import pytest
import torch

import histo.norms
from segmentation.reversible import SavedTensorMeter
from segmentation.unet import UNet3D

SMALL = {"channels": (8, 16, 32), "expansion": 2}


def pair(dtype=torch.float64, **kwargs) -> tuple[UNet3D, UNet3D]:
    """A reversible U-Net and its plain twin, the twin loaded from the reversible one's state_dict."""
    torch.manual_seed(0)
    rev = UNet3D(reversible=True, **kwargs).to(dtype)
    plain = UNet3D(reversible=False, **kwargs).to(dtype)
    plain.load_state_dict(rev.state_dict(), strict=True)
    return rev, plain


def step(model: UNet3D, x: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict]:
    x = x.clone().requires_grad_(True)
    torch.manual_seed(3)
    y = model(x)
    (y * weight).sum().backward()
    return y.detach(), x.grad, {n: p.grad for n, p in model.named_parameters()}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Max deviation relative to the reference's scale (floor 1e-6 for gradients that are exactly zero)."""
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-6)).item()


@pytest.mark.parametrize(("head", "classes"), [("regions", 3), ("labels", 4)])
def test_heads_shapes_and_probabilities(head: str, classes: int) -> None:
    model = UNet3D(out_channels=classes, head=head, **SMALL)
    x = torch.randn(2, 4, 16, 8, 24)
    logits = model(x)
    assert logits.shape == (2, classes, 16, 8, 24)
    probs = model.probabilities(logits)
    assert probs.shape == logits.shape and probs.min() >= 0 and probs.max() <= 1
    if head == "labels":
        assert torch.allclose(probs.sum(1), torch.ones(2, 16, 8, 24), atol=1e-5)
    else:
        assert torch.equal(probs, torch.sigmoid(logits))


def test_config_rebuilds_the_network() -> None:
    model = UNet3D(norm="batch", dropout=0.1, norm_kwargs={"momentum": 0.2}, **SMALL).eval()
    clone = UNet3D(**model.config).eval()
    clone.load_state_dict(model.state_dict(), strict=True)
    assert clone.config == model.config and model.config["norm_kwargs"] == {"momentum": 0.2}
    x = torch.randn(1, 4, 8, 8, 8)
    assert torch.equal(model(x), clone(x))


@pytest.mark.parametrize(
    "shape", [(1, 4, 16, 16, 18), (1, 4, 14, 16, 16), (1, 3, 16, 16, 16), (4, 16, 16, 16)]
)
def test_bad_input_raises_value_error(shape: tuple[int, ...]) -> None:
    model = UNet3D(**SMALL)
    with pytest.raises(ValueError, match="UNet3D"):
        model(torch.randn(*shape))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"channels": (8, 15)},
        {"channels": ()},
        {"head": "softmax"},
        {"head": "regions", "out_channels": 0},  # one channel per region of the label scheme, at least one
        {"head": "labels", "out_channels": 1},
        {"blocks_per_level": 0},
    ],
)
def test_bad_arguments_raise_value_error(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        UNet3D(**kwargs)


def test_twin_has_identical_parameters_and_function() -> None:
    rev, plain = pair(dtype=torch.float32, **SMALL)
    assert [(n, p.shape) for n, p in rev.named_parameters()] == [
        (n, p.shape) for n, p in plain.named_parameters()
    ]
    x = torch.randn(1, 4, 16, 16, 16)
    with torch.no_grad():
        assert torch.allclose(rev(x), plain(x), atol=1e-6)


def test_gradients_and_batchnorm_stats_equal_twin_float64() -> None:
    rev, plain = pair(norm="batch", dropout=0.2, **SMALL)
    x = torch.randn(2, 4, 8, 8, 8, dtype=torch.float64)
    weight = torch.randn(2, 3, 8, 8, 8, dtype=torch.float64)
    y_rev, gx_rev, gp_rev = step(rev, x, weight)
    y_plain, gx_plain, gp_plain = step(plain, x, weight)
    assert torch.allclose(y_rev, y_plain, rtol=0, atol=1e-12)
    assert rel_err(gx_rev, gx_plain) <= 1e-5
    for name, grad in gp_plain.items():
        assert rel_err(gp_rev[name], grad) <= 1e-5, name
    buffers = dict(plain.named_buffers())
    tracked = [b for n, b in rev.named_buffers() if n.endswith("num_batches_tracked")]
    assert len(tracked) > 0 and all(b.item() == 1 for b in tracked)
    for name, b in rev.named_buffers():
        assert torch.allclose(b, buffers[name], rtol=0, atol=1e-14), name


@pytest.mark.parametrize("norm", histo.norms.names())
def test_every_registered_norm_trains_like_the_twin(norm: str) -> None:
    rev, plain = pair(channels=(4, 8), blocks_per_level=1, expansion=2, norm=norm)
    x = torch.randn(2, 4, 8, 8, 8, dtype=torch.float64)
    weight = torch.randn(2, 3, 8, 8, 8, dtype=torch.float64)
    if norm == "rn_b":
        mask = torch.zeros(2, 1, 8, 8, 8, dtype=torch.bool)
        mask[:, :, 2:6, 1:7, 2:7] = True
        assert histo.norms.set_region_mask(rev, mask) == histo.norms.set_region_mask(plain, mask) > 0
    y_rev, gx_rev, gp_rev = step(rev, x, weight)
    y_plain, gx_plain, gp_plain = step(plain, x, weight)
    assert torch.isfinite(y_rev).all() and torch.allclose(y_rev, y_plain, rtol=0, atol=1e-12)
    assert rel_err(gx_rev, gx_plain) <= 1e-5
    for name, grad in gp_plain.items():
        assert rel_err(gp_rev[name], grad) <= 1e-5, name


def test_reversible_unet_saves_far_fewer_activations() -> None:
    saved = {}
    x = torch.randn(1, 4, 16, 16, 16)
    for reversible in (True, False):
        torch.manual_seed(0)
        model = UNet3D(reversible=reversible, blocks_per_level=2, **SMALL)
        with SavedTensorMeter(exclude=list(model.parameters())) as meter:
            y = model(x)
        saved[reversible] = meter.bytes
        y.sum().backward()
    assert saved[True] * 5 < saved[False]


def test_mbconv_adds_no_activation_after_self_activating_norms():
    from torch import nn

    from segmentation.mbconv import MBConv

    assert isinstance(MBConv(4, norm="frn").act, nn.Identity)
    assert isinstance(MBConv(4, norm="evonorm_s0").act, nn.Identity)
    assert isinstance(MBConv(4, norm="instance").act, nn.SiLU)
