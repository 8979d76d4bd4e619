"""Region Normalization: RN-B against a float64 per-region loop, mask mechanism, no leakage; RN-L."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from histo.norms import RegionNormB, RegionNormL, make_norm, region_mask, set_region_mask


def _rn_reference(x: np.ndarray, inside: np.ndarray, eps: float = 1e-5) -> np.ndarray:
    """Per channel, per region: (x - mean) / sqrt(var + eps) over all (N, spatial) positions of the region."""
    out = np.zeros_like(x)
    full = np.broadcast_to(inside, (x.shape[0], 1, *x.shape[2:]))[:, 0]
    for c in range(x.shape[1]):
        xc = x[:, c]
        for region in (full, ~full):
            vals = xc[region]
            if vals.size:
                out[:, c][region] = (vals - vals.mean()) / np.sqrt(vals.var() + eps)
    return out


def _affine_reference(y, inside, weight, bias):
    full = np.broadcast_to(inside, (y.shape[0], 1, *y.shape[2:]))
    view = (1, -1) + (1,) * (y.ndim - 2)
    w_in, w_out = weight[1].reshape(view), weight[0].reshape(view)
    b_in, b_out = bias[1].reshape(view), bias[0].reshape(view)
    return np.where(full, y * w_in + b_in, y * w_out + b_out)


@pytest.mark.parametrize("spatial_dims", [1, 2, 3])
def test_rn_b_equals_float64_region_loop(spatial_dims):
    torch.manual_seed(0)
    shape = (2, 3, *([5] * spatial_dims))
    x = torch.randn(shape, dtype=torch.float64) * 2
    x = x + 5 * (torch.rand(shape[0], 1, *shape[2:]) > 0.5)  # regions with different statistics
    inside = torch.rand(shape[0], 1, *shape[2:]) > 0.4
    m = make_norm("rn_b", 3, spatial_dims).double()
    with torch.no_grad():
        m.weight.copy_(torch.rand(2, 3) + 0.5)
        m.bias.copy_(torch.randn(2, 3))
    m.set_mask(inside)
    ref = _affine_reference(_rn_reference(x.numpy(), inside.numpy()), inside.numpy(),
                            m.weight.detach().numpy(), m.bias.detach().numpy())  # fmt: skip
    np.testing.assert_allclose(m(x).detach().numpy(), ref, rtol=0, atol=1e-12)


def test_rn_b_starts_as_identity_affine_and_uses_batch_statistics_in_eval():
    m = make_norm("rn_b", 4)
    assert torch.equal(m.weight, torch.ones(2, 4)) and torch.equal(m.bias, torch.zeros(2, 4))
    assert not list(m.buffers())
    x, inside = torch.randn(2, 4, 6, 6, dtype=torch.float64), torch.rand(2, 1, 6, 6) > 0.5
    m = m.double()
    m.set_mask(inside)
    y_train = m(x)
    m.eval()
    torch.testing.assert_close(m(x), y_train, rtol=0, atol=0)
    np.testing.assert_allclose(y_train.detach().numpy(), _rn_reference(x.numpy(), inside.numpy()), atol=1e-12)


def test_rn_b_regions_do_not_leak():
    torch.manual_seed(1)
    x = torch.randn(2, 4, 8, 8)
    inside = torch.zeros(2, 1, 8, 8, dtype=torch.bool)
    inside[:, :, 2:6, 1:7] = True
    m = make_norm("rn_b", 4)
    m.set_mask(inside)
    y = m(x)
    x2 = x.clone()
    x2[~inside.expand_as(x)] = torch.randn(int((~inside).sum()) * 4) * 100 + 50  # change only the outside
    y2 = m(x2)
    full = inside.expand_as(x)
    assert torch.equal(y[full], y2[full])
    assert not torch.allclose(y[~full], y2[~full])
    x3 = x.clone()
    x3[full] = x3[full] * 7 - 3  # change only the inside: outside output is unchanged
    assert torch.equal(m(x3)[~full], y[~full])


def test_rn_b_without_mask_raises_clearly():
    m = make_norm("rn_b", 4)
    with pytest.raises(RuntimeError, match=r"no region mask.*set_region_mask"):
        m(torch.randn(2, 4, 6, 6))


def test_rn_b_mask_validation():
    m = make_norm("rn_b", 4)
    with pytest.raises(ValueError, match="mask must be N x 1"):
        m.set_mask(torch.ones(2, 6, 6))
    m.set_mask(torch.ones(3, 1, 6, 6))
    with pytest.raises(ValueError, match="mask batch 3"):
        m(torch.randn(2, 4, 6, 6))


def test_rn_b_mask_resized_nearest_and_float_masks():
    torch.manual_seed(2)
    x = torch.randn(2, 4, 4, 4, dtype=torch.float64)
    fine = torch.rand(2, 1, 16, 16) > 0.5
    m = make_norm("rn_b", 4).double()
    m.set_mask(fine)
    coarse = F.interpolate(fine.float(), size=(4, 4), mode="nearest") > 0.5
    np.testing.assert_allclose(m(x).detach().numpy(), _rn_reference(x.numpy(), coarse.numpy()), atol=1e-12)
    m.set_mask(fine.float())  # float 0/1 masks select the same region
    np.testing.assert_allclose(m(x).detach().numpy(), _rn_reference(x.numpy(), coarse.numpy()), atol=1e-12)
    m.set_mask(torch.ones(1, 1, 4, 4, dtype=torch.bool))  # one mask broadcast over the batch = one region
    np.testing.assert_allclose(
        m(x).detach().numpy(), _rn_reference(x.numpy(), np.ones((1, 1, 4, 4), dtype=bool)), atol=1e-12
    )


def test_set_region_mask_and_context_reach_every_rn_b_block():
    net = nn.Sequential(make_norm("rn_b", 4), nn.Conv2d(4, 4, 3, padding=1, stride=2), make_norm("rn_b", 4))
    x, mask = torch.randn(2, 4, 8, 8), torch.rand(2, 1, 8, 8) > 0.5
    with region_mask(net, mask) as n:
        assert n == 2
        assert net(x).shape == (2, 4, 4, 4)
    assert all(b.mask is None for b in net if isinstance(b, RegionNormB))
    with pytest.raises(RuntimeError, match="no region mask"):
        net(x)
    assert set_region_mask(net, mask) == 2
    assert net(x).shape == (2, 4, 4, 4)
    assert set_region_mask(nn.Linear(2, 2), mask) == 0


def test_blocks_share_one_resized_mask_per_size():
    """set_region_mask gives all blocks one RegionMask: each feature-map size is interpolated once."""
    net = nn.Sequential(make_norm("rn_b", 4), make_norm("rn_b", 4), nn.AvgPool2d(2), make_norm("rn_b", 4))
    mask = torch.rand(2, 1, 16, 16) > 0.5
    set_region_mask(net, mask)
    net(torch.randn(2, 4, 8, 8))
    region = net[0].region
    assert (
        net[1].region is region
        and net[3].region is region
        and set(region._resized)
        == {
            ((8, 8), "cpu"),
            ((4, 4), "cpu"),
        }
    )
    expected = F.interpolate(mask.float(), size=(4, 4), mode="nearest") > 0.5
    assert torch.equal(region.at(torch.Size((4, 4)), torch.device("cpu")), expected)


def _rn_l_reference(m: RegionNormL, x: torch.Tensor) -> np.ndarray:
    """Independent RN-L: soft map from conv over [channel mean, channel max], threshold, loop RN, modulation."""
    xn = x.detach().numpy()
    pooled = torch.from_numpy(np.concatenate([xn.mean(1, keepdims=True), xn.max(1, keepdims=True)], axis=1))
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[x.ndim - 2]
    with torch.no_grad():
        soft = torch.sigmoid(conv(pooled, m.attention.weight, padding=3))
        w, b = m.modulation.weight, m.modulation.bias
        gamma = conv(soft, w[:1], b[:1], padding=3).numpy()
        beta = conv(soft, w[1:], b[1:], padding=3).numpy()
    inside = soft.numpy() >= 0.8
    return _rn_reference(xn, inside) * (1 + gamma) + beta, inside


@pytest.mark.parametrize("spatial_dims", [1, 2, 3])
def test_rn_l_equals_reference(spatial_dims):
    torch.manual_seed(3)
    m = make_norm("rn_l", 3, spatial_dims).double()
    with torch.no_grad():  # a response that puts part of the map above the 0.8 threshold
        m.attention.weight.normal_(0.0, 2.0 / (2 * 7**spatial_dims) ** 0.5)
    x = torch.randn(2, 3, *([7] * spatial_dims), dtype=torch.float64)
    ref, inside = _rn_l_reference(m, x)
    assert 0 < inside.mean() < 1, "test needs both regions non-empty"
    np.testing.assert_allclose(m(x).detach().numpy(), ref, rtol=0, atol=1e-10)


def test_rn_l_gradient_flows_through_the_soft_map():
    torch.manual_seed(4)
    m = make_norm("rn_l", 4, 2)
    x = torch.randn(2, 4, 9, 9)
    (m(x) * torch.randn(2, 4, 9, 9)).sum().backward()
    grads = [m.attention.weight.grad, m.modulation.weight.grad]
    assert all(g is not None for g in grads)
    for g in (grads[0], grads[1][0], grads[1][1]):  # the soft map, the gamma map's and the beta map's taps
        assert g.abs().sum() > 0


def test_rn_statistics_stay_in_input_precision_under_autocast():
    """bf16 autocast must not round the region statistics of an fp32 input (mean 50: ~0.2 sigma off)."""
    torch.manual_seed(5)
    x = torch.randn(2, 4, 6, 6, 6) * 2 + 50
    m = make_norm("rn_b", 4, 3)
    m.set_mask(torch.rand(2, 1, 6, 6, 6) > 0.5)
    ref = m(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = m(x)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)
