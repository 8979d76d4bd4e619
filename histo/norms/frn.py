"""Filter Response Normalization with TLU (Singh & Krishnan, CVPR 2020).

nu2 = mean over space of x^2 (per sample and channel); y = gamma * x / sqrt(nu2 + eps) + beta;
z = max(y, tau) with a learnable per-channel tau (init 0); eps = 1e-5; gamma 1, beta 0 at init.
"""

from __future__ import annotations

import torch
from torch import nn

from histo.norms.common import channel_view, check_input, spatial_axes
from histo.norms.registry import register
from histo.norms.traits import NormTraits


class FilterResponseNorm(nn.Module):
    """FRN followed by the thresholded linear unit (TLU)."""

    def __init__(self, num_features: int, spatial_dims: int = 2, eps: float = 1e-5, affine: bool = True):
        super().__init__()
        self.num_features, self.spatial_dims, self.eps = num_features, spatial_dims, eps
        self.weight = nn.Parameter(torch.ones(num_features)) if affine else None
        self.bias = nn.Parameter(torch.zeros(num_features)) if affine else None
        self.tau = nn.Parameter(torch.zeros(num_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(self, x)
        y = x * torch.rsqrt(x.pow(2).mean(dim=spatial_axes(x), keepdim=True) + self.eps)
        if self.weight is not None:
            y = y * channel_view(self.weight, x.ndim) + channel_view(self.bias, x.ndim)
        return torch.maximum(y, channel_view(self.tau, x.ndim))


@register("frn", traits=NormTraits(activating=True))
def _frn(channels: int, spatial_dims: int, **kwargs) -> nn.Module:
    return FilterResponseNorm(channels, spatial_dims, **kwargs)
