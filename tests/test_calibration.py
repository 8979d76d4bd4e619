"""α-BN: α=0 is the source model, α=1 is pure test-batch statistics, the float64 mixing formula, revert."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from histo.calibration import alpha_bn, alpha_bn_mode, revert_alpha_bn
from histo.norms import EvoNormB0, frozen_running_stats, make_norm


def _bn_family_model() -> nn.Module:
    """Every BN-family layer kind: torch BN, IBN-a's BN, BCN's BN, EvoNorm-B0 (plus non-BN layers)."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1), make_norm("ibn_a", 8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1), make_norm("bcn", 8, num_groups=4),
        nn.Conv2d(8, 8, 3, padding=1), make_norm("evonorm_b0", 8), make_norm("group", 8),
    ).double()  # fmt: skip


def _trained(model: nn.Module) -> nn.Module:
    """Source running statistics from a few 'source domain' batches, then eval."""
    g = torch.Generator().manual_seed(1)
    model.train()
    with torch.no_grad():
        for _ in range(5):
            model(torch.randn(4, 3, 8, 8, generator=g, dtype=torch.float64))
    return model.eval()


def _shifted_batch() -> torch.Tensor:
    g = torch.Generator().manual_seed(2)
    return torch.randn(4, 3, 8, 8, generator=g, dtype=torch.float64) * 2.5 + 1.5


def _stats(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_counts_every_bn_family_layer():
    model = _trained(_bn_family_model())
    assert alpha_bn(model, 0.1) == 4  # BatchNorm2d, IBN.BN, BCN.bn, EvoNormB0
    assert revert_alpha_bn(model) == 4


def test_alpha_zero_reproduces_source_eval_exactly():
    model = _trained(_bn_family_model())
    x = _shifted_batch()
    source = model(x)
    alpha_bn(model, 0.0)
    assert torch.equal(model(x), source)


def test_alpha_one_equals_pure_test_batch_statistics():
    model = _trained(_bn_family_model())
    x = _shifted_batch()
    with frozen_running_stats(model):
        model.train()
        batch_stats = model(x)  # train-mode forward = test-batch statistics, statistics not moved
        model.eval()
    before = _stats(model)
    alpha_bn(model, 1.0)
    out = model(x)
    torch.testing.assert_close(out, batch_stats, rtol=1e-10, atol=1e-10)
    revert_alpha_bn(model)
    assert not torch.allclose(out, model(x))
    for k, v in _stats(model).items():
        assert torch.equal(v, before[k]), f"{k} changed by an alpha-BN forward"


def test_mixing_formula_against_float64_reference():
    bn = nn.BatchNorm2d(3).double()
    with torch.no_grad():
        bn.running_mean.copy_(torch.tensor([0.5, -1.0, 2.0]))
        bn.running_var.copy_(torch.tensor([1.5, 0.3, 4.0]))
        bn.weight.copy_(torch.tensor([1.2, 0.7, -0.4]))
        bn.bias.copy_(torch.tensor([0.1, 0.0, 0.3]))
    bn.eval()
    x = _shifted_batch()
    a = 0.3
    alpha_bn(bn, a)
    xn = x.numpy()
    ref = np.zeros_like(xn)
    for c in range(3):
        mu = (1 - a) * bn.running_mean[c].item() + a * xn[:, c].mean()
        var = (1 - a) * bn.running_var[c].item() + a * xn[:, c].var()
        ref[:, c] = (xn[:, c] - mu) / np.sqrt(var + bn.eps) * bn.weight[c].item() + bn.bias[c].item()
    np.testing.assert_allclose(bn(x).detach().numpy(), ref, rtol=0, atol=1e-12)
    small = x[:2, :, :3, :3].clone().requires_grad_()  # gradients flow through the batch statistics too
    assert torch.autograd.gradcheck(bn, (small,), eps=1e-6, atol=1e-6)


def test_evonorm_b0_variance_mixing():
    m = make_norm("evonorm_b0", 3).double().eval()
    with torch.no_grad():
        m.running_var.copy_(torch.tensor([0.5, 2.0, 1.0]))
    x = _shifted_batch()
    a = 0.25
    mixed = (1 - a) * m.running_var + a * x.transpose(0, 1).reshape(3, -1).var(1, unbiased=False)
    ref = make_norm("evonorm_b0", 3).double().eval()
    with torch.no_grad():
        ref.running_var.copy_(mixed)
    alpha_bn(m, a)
    torch.testing.assert_close(m(x), ref(x), rtol=0, atol=1e-12)


def test_revert_restores_source_model():
    model = _trained(_bn_family_model())
    x = _shifted_batch()
    source = model(x)
    alpha_bn(model, 0.5)
    assert not torch.allclose(model(x), source)
    revert_alpha_bn(model)
    assert torch.equal(model(x), source)
    assert type(model[1]) is nn.BatchNorm2d and type(model[4].BN) is nn.BatchNorm2d
    assert model[9].calibration_alpha is None and isinstance(model[9], EvoNormB0)


def test_conversion_keeps_state_dict_and_training_forward():
    model = _trained(_bn_family_model())
    keys = list(model.state_dict())
    alpha_bn(model, 0.2)
    assert list(model.state_dict()) == keys
    assert isinstance(model[1], nn.BatchNorm2d)
    x = _shifted_batch()
    model.train()
    with frozen_running_stats(model):
        converted_train = model(x)
    revert_alpha_bn(model)
    with frozen_running_stats(model):
        assert torch.equal(model(x), converted_train)


def test_context_manager_restores_previous_state():
    model = _trained(_bn_family_model())
    x = _shifted_batch()
    source = model(x)
    with alpha_bn_mode(model, 1.0) as n:
        assert n == 4
        inside = model(x)
    assert not torch.allclose(inside, source)
    assert torch.equal(model(x), source)
    alpha_bn(model, 0.3)
    at_03 = model(x)
    with alpha_bn_mode(model, 1.0):
        pass
    assert torch.equal(model(x), at_03)


def test_group_norm_model_has_nothing_to_calibrate():
    torch.manual_seed(3)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3), make_norm("group", 8), make_norm("instance", 8), make_norm("evonorm_s0", 8),
        make_norm("frn", 8), make_norm("layer", 8), nn.BatchNorm2d(8, track_running_stats=False),
    ).eval()  # fmt: skip
    x = torch.randn(2, 3, 8, 8)
    before = model(x)
    assert alpha_bn(model, 0.5) == 0
    assert torch.equal(model(x), before)
    assert revert_alpha_bn(model) == 0


def test_alpha_out_of_range_is_rejected():
    with pytest.raises(ValueError, match=r"alpha must be in \[0, 1\]"):
        alpha_bn(nn.BatchNorm2d(2), 1.5)
