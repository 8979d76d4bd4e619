"""α-BN test-time calibration (You et al., "Test-time batch statistics calibration for covariate shift").

In eval mode a converted BN-family layer normalises with mixed statistics
    mu = (1 - α) mu_source + α mu_batch,   var = (1 - α) var_source + α var_batch   (biased batch variance).
BN-family layers: every torch BatchNorm1d/2d/3d (also the BN inside IBN-a and BCN) that tracks running
statistics, and every module implementing `histo.norms.CalibratableNorm` (EvoNorm-B0: its running variance;
B0 has no mean). Training-mode forwards are unchanged. The registry's `calibratable` trait says which norms
have such layers.
GN/IN/LN/FRN/EvoNorm-S0/RN models have nothing to calibrate: `alpha_bn` then returns 0.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from histo.norms.protocols import CalibratableNorm

_ALPHA = "_histo_alpha"


class _AlphaBatchNorm:
    """Mixin swapped in front of a BatchNorm's class: eval forwards use α-mixed statistics.

    α = 0 runs the source layer itself; otherwise the normalisation is written out so gradients also flow
    through the batch statistics (torch's eval kernel takes no gradient for its statistics).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = getattr(self, _ALPHA)
        if self.training or a == 0.0:
            return super().forward(x)
        self._check_input_dim(x)
        axes = (0, *range(2, x.ndim))
        view = (1, -1) + (1,) * (x.ndim - 2)
        mean = (1 - a) * self.running_mean + a * x.mean(axes)
        var = (1 - a) * self.running_var + a * x.var(axes, unbiased=False)
        y = (x - mean.view(view)) * torch.rsqrt(var.view(view) + self.eps)
        return y if self.weight is None else y * self.weight.view(view) + self.bias.view(view)


_ALPHA_CLASSES: dict[type, type] = {}


def _alpha_class(cls: type) -> type:
    """The α-BN subclass of a BatchNorm class (created once per class)."""
    if cls not in _ALPHA_CLASSES:
        _ALPHA_CLASSES[cls] = type(f"Alpha{cls.__name__}", (_AlphaBatchNorm, cls), {"_histo_base": cls})
    return _ALPHA_CLASSES[cls]


class _TorchBatchNorm:
    """`CalibratableNorm` for a torch BatchNorm layer (not ours to extend): swaps the α-BN class in and out."""

    def __init__(self, bn: _BatchNorm) -> None:
        self.bn = bn

    @property
    def calibration_alpha(self) -> float | None:
        return getattr(self.bn, _ALPHA, None)

    def calibrate(self, alpha: float | None) -> None:
        if alpha is None:
            if isinstance(self.bn, _AlphaBatchNorm):
                self.bn.__class__ = self.bn._histo_base
            if hasattr(self.bn, _ALPHA):
                delattr(self.bn, _ALPHA)
            return
        if not isinstance(self.bn, _AlphaBatchNorm):
            self.bn.__class__ = _alpha_class(type(self.bn))
        setattr(self.bn, _ALPHA, float(alpha))


def calibratable_layers(model: nn.Module) -> list[CalibratableNorm]:
    """The layers α-BN calibrates: `CalibratableNorm` modules and torch BatchNorms tracking statistics."""
    layers: list[CalibratableNorm] = []
    for m in model.modules():
        if isinstance(m, CalibratableNorm):
            layers.append(m)
        elif isinstance(m, _BatchNorm) and m.track_running_stats and m.running_mean is not None:
            layers.append(_TorchBatchNorm(m))
    return layers


def alpha_bn(model: nn.Module, alpha: float = 0.1) -> int:
    """Convert every BN-family layer of `model` in place to α-BN; returns how many were converted."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    layers = calibratable_layers(model)
    for layer in layers:
        layer.calibrate(alpha)
    return len(layers)


def revert_alpha_bn(model: nn.Module) -> int:
    """Undo `alpha_bn`: layers use their source running statistics again; returns how many were reverted."""
    layers = [layer for layer in calibratable_layers(model) if layer.calibration_alpha is not None]
    for layer in layers:
        layer.calibrate(None)
    return len(layers)


@contextlib.contextmanager
def alpha_bn_mode(model: nn.Module, alpha: float = 0.1) -> Iterator[int]:
    """Context: α-BN inside (yields the converted-layer count); each layer's previous state is restored."""
    previous = [(layer, layer.calibration_alpha) for layer in calibratable_layers(model)]
    try:
        yield alpha_bn(model, alpha)
    finally:
        for layer, a in previous:
            layer.calibrate(a)
