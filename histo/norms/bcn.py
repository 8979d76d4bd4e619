"""Batch-Channel Normalization and Weight Standardization (Qiao et al., "Micro-Batch Training with
Batch-Channel Normalization and Weight Standardization", 2019/2020).

BCN(x) = GN_G(BN(x)) * w_g + b_g: a BatchNorm (torch layer, affine), then a group norm without affine
(G = 32 by `resolve_groups`) followed by one scale/shift per group, as in the authors' BCNorm
(`weight`/`bias` of shape (1, G, 1)). WS: W_hat = (W - mean(W)) / sqrt(var(W) + eps) per output filter,
biased variance, eps = 1e-5 inside the root (the paper's equation; the authors' code divides by the unbiased
std + 1e-5, a negligible difference). bcn is registered with `WSConv{1,2,3}d` as its paired convolution
(`histo.norms.conv_for("bcn", dims)`), the convolution networks put before it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from histo.norms.common import BATCH_NORM, check_input, resolve_groups
from histo.norms.registry import register
from histo.norms.traits import NormTraits


def standardize_weight(weight: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Zero mean, unit (biased) variance over every output filter's weights (all dims but the first)."""
    axes = tuple(range(1, weight.ndim))
    mean = weight.mean(axes, keepdim=True)
    var = weight.var(axes, unbiased=False, keepdim=True)
    return (weight - mean) * torch.rsqrt(var + eps)


class _WeightStandardized:
    """Mixin for torch ConvNd: convolve with the standardised weight; `eps` is an extra keyword."""

    def __init__(self, *args, eps: float = 1e-5, **kwargs):
        super().__init__(*args, **kwargs)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, standardize_weight(self.weight, self.eps), self.bias)


class WSConv1d(_WeightStandardized, nn.Conv1d):
    """nn.Conv1d with weight standardisation."""


class WSConv2d(_WeightStandardized, nn.Conv2d):
    """nn.Conv2d with weight standardisation."""


class WSConv3d(_WeightStandardized, nn.Conv3d):
    """nn.Conv3d with weight standardisation."""


WS_CONV = {1: WSConv1d, 2: WSConv2d, 3: WSConv3d}


class BatchChannelNorm(nn.Module):
    """BN (torch layer, so frozen_running_stats / alpha_bn apply) -> non-affine GN -> per-group affine."""

    def __init__(
        self,
        num_features: int,
        spatial_dims: int = 2,
        num_groups: int = 32,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
    ):
        super().__init__()
        self.num_features, self.spatial_dims, self.eps = num_features, spatial_dims, eps
        self.num_groups = resolve_groups(num_features, num_groups)
        self.bn = BATCH_NORM[spatial_dims](num_features, eps=eps, momentum=momentum, affine=affine)
        self.weight = nn.Parameter(torch.ones(self.num_groups)) if affine else None
        self.bias = nn.Parameter(torch.zeros(self.num_groups)) if affine else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(self, x)
        per_group = self.num_features // self.num_groups
        w = None if self.weight is None else self.weight.repeat_interleave(per_group)
        b = None if self.bias is None else self.bias.repeat_interleave(per_group)
        return F.group_norm(self.bn(x), self.num_groups, w, b, self.eps)


@register("bcn", traits=NormTraits(conv=WS_CONV, calibratable=True))
def _bcn(channels: int, spatial_dims: int, **kwargs) -> nn.Module:
    return BatchChannelNorm(channels, spatial_dims, **kwargs)
