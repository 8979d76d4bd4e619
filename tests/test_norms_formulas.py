"""EvoNorm-B0/S0, FRN+TLU, BCN and WS against their published formulas in float64 (numpy loops);
train/eval behaviour, frozen running statistics and float64 gradcheck for every registered block."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from histo.norms import WS_CONV, frozen_running_stats, make_norm, names, region_mask, standardize_weight


def _randomize(m: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.5 + 0.5)
    return m


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().numpy()


def _x(shape, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64) * 2 + 0.5


@pytest.mark.parametrize("spatial_dims", [1, 2, 3])
def test_evonorm_b0_formula_train_running_var_and_eval(spatial_dims):
    x = _x((3, 4, *([5] * spatial_dims)))
    m = _randomize(make_norm("evonorm_b0", 4, spatial_dims).double())
    v, g, b = (_np(p) for p in (m.v, m.weight, m.bias))
    xn, eps = _np(x), 1e-3
    assert m.eps == eps
    ref = np.zeros_like(xn)
    for c in range(4):
        var_b = xn[:, c].var()
        for n in range(3):
            var_i = xn[n, c].var()
            den = np.maximum(np.sqrt(var_b + eps), v[c] * xn[n, c] + np.sqrt(var_i + eps))
            ref[n, c] = xn[n, c] / den * g[c] + b[c]
    np.testing.assert_allclose(_np(m(x)), ref, rtol=0, atol=1e-12)
    run = 0.9 * 1.0 + 0.1 * np.array([xn[:, c].var(ddof=1) for c in range(4)])
    np.testing.assert_allclose(_np(m.running_var), run, rtol=1e-12)
    m.eval()
    ref_eval = np.zeros_like(xn)
    for c in range(4):
        for n in range(3):
            den = np.maximum(np.sqrt(run[c] + eps), v[c] * xn[n, c] + np.sqrt(xn[n, c].var() + eps))
            ref_eval[n, c] = xn[n, c] / den * g[c] + b[c]
    np.testing.assert_allclose(_np(m(x)), ref_eval, rtol=0, atol=1e-12)
    np.testing.assert_allclose(_np(m.running_var), run, rtol=1e-12)  # eval does not update


@pytest.mark.parametrize("spatial_dims", [1, 2, 3])
def test_evonorm_s0_formula(spatial_dims):
    x = _x((2, 8, *([4] * spatial_dims)), seed=1)
    m = _randomize(make_norm("evonorm_s0", 8, spatial_dims, num_groups=4).double())
    assert m.num_groups == 4 and m.eps == 1e-5
    v, g, b = (_np(p) for p in (m.v, m.weight, m.bias))
    xn = _np(x)
    ref = np.zeros_like(xn)
    for n in range(2):
        for grp in range(4):
            chans = range(2 * grp, 2 * grp + 2)
            var = xn[n, 2 * grp : 2 * grp + 2].var()
            for c in chans:
                sig = 1 / (1 + np.exp(-v[c] * xn[n, c]))
                ref[n, c] = xn[n, c] * sig / np.sqrt(var + 1e-5) * g[c] + b[c]
    np.testing.assert_allclose(_np(m(x)), ref, rtol=0, atol=1e-12)
    assert make_norm("evonorm_s0", 64).num_groups == 32


@pytest.mark.parametrize("spatial_dims", [1, 2, 3])
def test_frn_tlu_formula(spatial_dims):
    x = _x((2, 3, *([4] * spatial_dims)), seed=2)
    m = _randomize(make_norm("frn", 3, spatial_dims).double())
    g, b, tau = (_np(p) for p in (m.weight, m.bias, m.tau))
    xn = _np(x)
    ref = np.zeros_like(xn)
    for n in range(2):
        for c in range(3):
            nu2 = np.mean(xn[n, c] ** 2)
            ref[n, c] = np.maximum(g[c] * xn[n, c] / np.sqrt(nu2 + 1e-5) + b[c], tau[c])
    clipped = ref == tau.reshape(1, 3, *([1] * spatial_dims))
    assert 0 < clipped.mean() < 1, "TLU threshold must be active somewhere"
    np.testing.assert_allclose(_np(m(x)), ref, rtol=0, atol=1e-12)
    fresh = make_norm("frn", 3)
    assert torch.equal(fresh.tau, torch.zeros(3)) and fresh.eps == 1e-5


@pytest.mark.parametrize("spatial_dims", [1, 2, 3])
def test_bcn_is_bn_then_group_norm_with_per_group_affine(spatial_dims):
    x = _x((3, 8, *([4] * spatial_dims)), seed=3)
    m = _randomize(make_norm("bcn", 8, spatial_dims, num_groups=2).double())
    assert m.num_groups == 2 and m.weight.shape == (2,)
    bw, bb, gw, gb = (_np(p) for p in (m.bn.weight, m.bn.bias, m.weight, m.bias))
    xn = _np(x)
    bn = np.zeros_like(xn)
    for c in range(8):
        bn[:, c] = (xn[:, c] - xn[:, c].mean()) / np.sqrt(xn[:, c].var() + 1e-5) * bw[c] + bb[c]
    ref = np.zeros_like(xn)
    for n in range(3):
        for grp in range(2):
            block = bn[n, 4 * grp : 4 * grp + 4]
            ref[n, 4 * grp : 4 * grp + 4] = (block - block.mean()) / np.sqrt(block.var() + 1e-5) * gw[
                grp
            ] + gb[grp]
    np.testing.assert_allclose(_np(m(x)), ref, rtol=0, atol=1e-11)
    assert make_norm("bcn", 64).num_groups == 32


@pytest.mark.parametrize("spatial_dims", [1, 2, 3])
def test_ws_conv_standardises_each_output_filter(spatial_dims):
    torch.manual_seed(4)
    conv = WS_CONV[spatial_dims](4, 6, 3, padding=1, groups=2).double()
    with torch.no_grad():
        conv.weight.mul_(3).add_(torch.arange(6, dtype=torch.float64).view(6, *([1] * (spatial_dims + 1))))
    w = _np(conv.weight)
    w_hat = np.stack([(f - f.mean()) / np.sqrt(f.var() + 1e-5) for f in w])
    np.testing.assert_allclose(_np(standardize_weight(conv.weight)), w_hat, rtol=0, atol=1e-12)
    x = _x((2, 4, *([5] * spatial_dims)), seed=5)
    fn = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[spatial_dims]
    ref = fn(x, torch.from_numpy(w_hat), conv.bias, padding=1, groups=2)
    torch.testing.assert_close(conv(x), ref, rtol=0, atol=1e-12)
    flat = w_hat.reshape(6, -1)
    np.testing.assert_allclose(flat.mean(1), 0, atol=1e-12)
    assert np.all(np.abs(flat.var(1) - 1) < 1e-3)


RUNNING = {"batch", "bcn", "evonorm_b0", "ibn_a"}
BATCH_INDEPENDENT_OR_RN = {"evonorm_s0", "frn", "group", "ibn_b", "instance", "layer", "rn_b", "rn_l"}


def _buffers(m: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in m.named_buffers()}


def test_blocks_with_running_statistics_are_exactly_the_bn_family():
    with_running = {n for n in names() if any("running" in k for k, _ in make_norm(n, 8).named_buffers())}
    assert with_running == RUNNING
    assert set(names()) == RUNNING | BATCH_INDEPENDENT_OR_RN


@pytest.mark.parametrize("name", sorted(RUNNING | BATCH_INDEPENDENT_OR_RN))
def test_train_eval_behaviour(name):
    m = _randomize(make_norm(name, 8, 2).double())
    x = _x((4, 8, 5, 5), seed=6)
    with region_mask(m, torch.rand(4, 1, 5, 5) > 0.5):
        y_train = m(x)
        m.eval()
        y_eval = m(x)
    if name in RUNNING:  # eval uses running statistics, so it differs right after one update
        assert not torch.allclose(y_train, y_eval)
    else:  # no running statistics: identical (RN uses batch statistics in train and eval, as the paper)
        torch.testing.assert_close(y_train, y_eval, rtol=0, atol=0)


@pytest.mark.parametrize("name", sorted(RUNNING))
def test_frozen_running_stats_leaves_statistics_unchanged(name):
    m = make_norm(name, 8, 3).train()
    x = torch.randn(2, 8, 4, 4, 4) * 3 + 1
    before = _buffers(m)
    with frozen_running_stats(m):
        y_frozen = m(x)
    for k, v in _buffers(m).items():
        assert torch.equal(v, before[k]), f"{name}: {k} changed under frozen_running_stats"
    y = m(x)  # same batch statistics, and now the statistics move
    torch.testing.assert_close(y_frozen, y)
    assert any(not torch.equal(v, before[k]) for k, v in _buffers(m).items() if "running" in k)


def _mask(shape) -> torch.Tensor:
    return torch.rand(shape[0], 1, *shape[2:], generator=torch.Generator().manual_seed(7)) > 0.5


@pytest.mark.parametrize("spatial_dims", [1, 2, 3])
@pytest.mark.parametrize("name", sorted(RUNNING | BATCH_INDEPENDENT_OR_RN))
def test_gradcheck_float64(name, spatial_dims):
    """Analytic gradients w.r.t. input and every parameter match finite differences (train mode).

    Full Jacobians in 2D; in 1D, 3D and for rn_l (its convs) gradcheck's fast mode (random directional
    derivatives) keeps it quick.
    """
    kwargs = {"num_groups": 2} if name in ("group", "bcn", "evonorm_s0") else {}
    kwargs |= {"kernel_size": 3} if name == "rn_l" else {}  # fewer conv taps to difference, same code path
    m = _randomize(make_norm(name, 4, spatial_dims, **kwargs).double(), seed=8)
    size = {1: 6, 2: 3, 3: 2}[spatial_dims]
    x = _x((2, 4, *([size] * spatial_dims)), seed=9).requires_grad_()
    params = dict(m.named_parameters())

    def f(inp, *ps):
        return functional_call(m, dict(zip(params, ps, strict=True)), (inp,))

    with region_mask(m, _mask(x.shape)):
        assert torch.autograd.gradcheck(
            f,
            (x, *params.values()),
            eps=1e-6,
            atol=1e-6,
            fast_mode=spatial_dims != 2 or name == "rn_l",
        )
