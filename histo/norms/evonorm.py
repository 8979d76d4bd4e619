"""EvoNorm-B0 and EvoNorm-S0 (Liu et al., "Evolving Normalization-Activation Layers", NeurIPS 2020).

B0: y = x / max(sqrt(var_batch + eps), v*x + sqrt(var_instance + eps)) * gamma + beta, eps = 1e-3.
    var_batch: biased variance per channel over (N, spatial) in training; in eval the running variance
    (updated like BatchNorm: unbiased batch variance, momentum 0.1, only when `updates_stats(self)`).
    With `calibration_alpha` = a (`calibrate(a)`, as `histo.calibration.alpha_bn` does) eval uses
    (1-a) running + a batch.
S0: y = x * sigmoid(v*x) / sqrt(var_group + eps) * gamma + beta, var_group biased per sample over each group
    of C/G channels and space, G = 32 by `resolve_groups`, eps = 1e-5. v, gamma initialised to 1, beta to 0.
"""

from __future__ import annotations

import torch
from torch import nn

from histo.norms.common import channel_view, check_input, resolve_groups, spatial_axes
from histo.norms.registry import register
from histo.norms.stats import updates_stats
from histo.norms.traits import NormTraits


class _EvoNorm(nn.Module):
    """Shared parameters: per-channel v (init 1) and, with affine, gamma (1) and beta (0)."""

    def __init__(self, num_features: int, spatial_dims: int, eps: float, affine: bool):
        super().__init__()
        self.num_features, self.spatial_dims, self.eps = num_features, spatial_dims, eps
        self.v = nn.Parameter(torch.ones(num_features))
        self.weight = nn.Parameter(torch.ones(num_features)) if affine else None
        self.bias = nn.Parameter(torch.zeros(num_features)) if affine else None

    def _affine(self, y: torch.Tensor) -> torch.Tensor:
        if self.weight is None:
            return y
        return y * channel_view(self.weight, y.ndim) + channel_view(self.bias, y.ndim)


class EvoNormB0(_EvoNorm):
    """EvoNorm-B0 with a running variance for eval (see module docstring)."""

    def __init__(
        self,
        num_features: int,
        spatial_dims: int = 2,
        eps: float = 1e-3,
        momentum: float = 0.1,
        affine: bool = True,
    ):
        super().__init__(num_features, spatial_dims, eps, affine)
        self.momentum = momentum
        self.calibration_alpha: float | None = None
        self.register_buffer("running_var", torch.ones(num_features))

    def calibrate(self, alpha: float | None) -> None:
        """`CalibratableNorm`: eval forwards mix running and batch variance with weight `alpha` (None: off)."""
        self.calibration_alpha = None if alpha is None else float(alpha)

    def batch_var(self, x: torch.Tensor) -> torch.Tensor:
        """Biased variance per channel over (N, spatial), shape (C,)."""
        return x.var(dim=(0, *spatial_axes(x)), unbiased=False)

    def _var_for_forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            var = self.batch_var(x)
            n = x.numel() // self.num_features
            if n < 2:
                raise ValueError("EvoNormB0: need more than 1 value per channel in training")
            if updates_stats(self):
                with torch.no_grad():
                    unbiased = var.detach() * (n / (n - 1))
                    self.running_var.mul_(1 - self.momentum).add_(
                        unbiased.to(self.running_var.dtype), alpha=self.momentum
                    )
            return var
        if self.calibration_alpha is None:
            return self.running_var.to(x.dtype)
        a = self.calibration_alpha
        return (1 - a) * self.running_var.to(x.dtype) + a * self.batch_var(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(self, x)
        var_b = channel_view(self._var_for_forward(x), x.ndim)
        var_i = x.var(dim=spatial_axes(x), unbiased=False, keepdim=True)
        den = torch.maximum(
            torch.sqrt(var_b + self.eps), channel_view(self.v, x.ndim) * x + torch.sqrt(var_i + self.eps)
        )
        return self._affine(x / den)


class EvoNormS0(_EvoNorm):
    """EvoNorm-S0: batch-independent, group statistics (see module docstring)."""

    def __init__(
        self,
        num_features: int,
        spatial_dims: int = 2,
        num_groups: int = 32,
        eps: float = 1e-5,
        affine: bool = True,
    ):
        super().__init__(num_features, spatial_dims, eps, affine)
        self.num_groups = resolve_groups(num_features, num_groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(self, x)
        n = x.shape[0]
        var_g = x.reshape(n, self.num_groups, -1).var(dim=2, unbiased=False, keepdim=True)
        num = x * torch.sigmoid(channel_view(self.v, x.ndim) * x)
        y = (num.reshape(n, self.num_groups, -1) * torch.rsqrt(var_g + self.eps)).reshape(x.shape)
        return self._affine(y)


@register("evonorm_b0", traits=NormTraits(activating=True, calibratable=True))
def _evonorm_b0(channels: int, spatial_dims: int, **kwargs) -> nn.Module:
    return EvoNormB0(channels, spatial_dims, **kwargs)


@register("evonorm_s0", traits=NormTraits(activating=True))
def _evonorm_s0(channels: int, spatial_dims: int, **kwargs) -> nn.Module:
    return EvoNormS0(channels, spatial_dims, **kwargs)
