"""Region Normalization (Yu et al., AAAI 2020): normalise a region and its complement separately.

Statistics: per channel, mean and (biased) variance over (N, spatial) positions inside each region, taken
from the current batch in training AND in eval, as in the authors' code (their BN has
track_running_stats=False). There are no running statistics, so `alpha_bn` and `frozen_running_stats`
have nothing to do here; note that eval outputs therefore depend on the other samples of the batch.

rn_b: the region mask comes from outside (brain / tissue mask) through `set_region_mask(model, mask)` or
the `region_mask(model, mask)` context; each block resizes it with nearest interpolation to its feature
map, takes mask > 0.5 as the region, and applies a separate affine per region (initialised to identity).
rn_l: the mask is learned: sigmoid(kxk conv([mean_c(x), max_c(x)])) >= threshold (0.8) selects the region;
the output is modulated by spatial maps gamma, beta = conv(sigmoid map), through which gradients flow.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from histo.norms.common import CONV, check_input
from histo.norms.protocols import RegionMaskedNorm
from histo.norms.registry import register
from histo.norms.traits import NormTraits


def region_normalize(
    x: torch.Tensor,
    inside: torch.Tensor,
    eps: float,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Normalise x where `inside` (bool, N|1 x 1 x *spatial) and where not, each with its own statistics.

    Mean and biased variance per channel over (N, spatial) of the region (two-pass); an empty region gets
    mean 0 and variance 0 (it has no output positions, so they are never used). Optional `weight`/`bias`
    (2, C) give each region its own affine (row 1: the region, row 0: its complement), folded into the
    per-position scale and shift. The per-region sums are one matmul against the 0/1 indicators of the two
    regions (x is read once, not masked into full-size copies), in x's own dtype: autocast is off here.
    """
    n, c = x.shape[:2]
    m = inside.reshape(inside.shape[0], 1, -1)
    where = inside.expand(n, 1, *x.shape[2:]).reshape(n, 1, -1)
    with torch.autocast(x.device.type, enabled=False):
        regions = torch.cat([m, ~m], dim=1).to(x.dtype)  # (N|1, 2, S): the region, its complement
        counts = (regions.sum((0, 2)) * (n // m.shape[0])).clamp(min=1)

        def region_means(t: torch.Tensor) -> torch.Tensor:
            return torch.matmul(t, regions.transpose(1, 2)).sum(0) / counts  # (C, 2)

        def per_position(v: torch.Tensor) -> torch.Tensor:
            return torch.where(where, v[:, 0, None], v[:, 1, None])  # (C, 2) -> (N, C, S)

        flat = x.reshape(n, c, -1)
        centred = flat - per_position(region_means(flat))
        scale = torch.rsqrt(region_means(centred * centred) + eps)
        if weight is not None:
            scale = scale * weight.flip(0).t()
        y = centred * per_position(scale)
        if bias is not None:
            y = y + per_position(bias.flip(0).t())
    return y.reshape(x.shape)


class RegionMask:
    """A region mask shared by every rn_b block of a model, resized once per feature-map size and device.

    A U-Net has several rn_b blocks at each resolution; they all read the same cached nearest-neighbour
    resizing instead of interpolating the full-resolution mask in every block on every forward.
    """

    def __init__(self, mask: torch.Tensor):
        self.mask = mask
        self._resized: dict[tuple, torch.Tensor] = {}

    def at(self, size: torch.Size, device: torch.device) -> torch.Tensor:
        """The region (mask > 0.5, bool) at spatial `size` on `device`."""
        key = (tuple(size), str(device))
        if key not in self._resized:
            m = self.mask.to(device=device, dtype=torch.float32)
            if m.shape[2:] != size:
                m = F.interpolate(m, size=size, mode="nearest")
            self._resized[key] = m > 0.5
        return self._resized[key]


class RegionNormB(nn.Module):
    """RN-B: region-wise normalisation with an external mask and a separate affine per region.

    `weight`/`bias` have shape (2, C): row 1 for the region (mask > 0.5), row 0 for its complement.
    Without a mask the forward raises RuntimeError (never silently one region).
    """

    def __init__(self, num_features: int, spatial_dims: int = 2, eps: float = 1e-5, affine: bool = True):
        super().__init__()
        self.num_features, self.spatial_dims, self.eps = num_features, spatial_dims, eps
        self.weight = nn.Parameter(torch.ones(2, num_features)) if affine else None
        self.bias = nn.Parameter(torch.zeros(2, num_features)) if affine else None
        self.region: RegionMask | None = None

    @property
    def mask(self) -> torch.Tensor | None:
        """The full-resolution region mask as given (None when unset)."""
        return None if self.region is None else self.region.mask

    def set_mask(self, mask: torch.Tensor | RegionMask | None) -> None:
        """Set (or clear with None) the region mask: N x 1 x *spatial (or 1 x 1 x ...), bool or float."""
        region = RegionMask(mask) if isinstance(mask, torch.Tensor) else mask
        if region is not None and (region.mask.ndim != self.spatial_dims + 2 or region.mask.shape[1] != 1):
            raise ValueError(
                f"RegionNormB: mask must be N x 1 x {self.spatial_dims} spatial dims, "
                f"got {tuple(region.mask.shape)}"
            )
        self.region = region

    def save_state(self) -> RegionMask | None:
        """`RecomputeState`: the mask the forward used, for a reversible recompute in backward."""
        return self.region

    def restore_state(self, state: RegionMask | None) -> None:
        """`RecomputeState`: use the mask `save_state` returned (the caller may have changed it since)."""
        self.region = state

    def _resized_mask(self, x: torch.Tensor) -> torch.Tensor:
        if self.region is None:
            raise RuntimeError(
                "RegionNormB (rn_b) has no region mask: call histo.norms.set_region_mask(model, mask) "
                "or use `with histo.norms.region_mask(model, mask):` before the forward pass"
            )
        if self.region.mask.shape[0] not in (1, x.shape[0]):
            raise ValueError(
                f"RegionNormB: mask batch {self.region.mask.shape[0]} does not match input {x.shape[0]}"
            )
        return self.region.at(x.shape[2:], x.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(self, x)
        return region_normalize(x, self._resized_mask(x), self.eps, self.weight, self.bias)


class RegionNormL(nn.Module):
    """RN-L: region-wise normalisation with a learned mask and learned spatial modulation maps.

    a = sigmoid(conv([mean_c x, max_c x])); region = a >= threshold (a hard, detached mask);
    y = RN(x, region) * (1 + gamma) + beta with [gamma, beta] = conv(a) (one conv, two output maps), following
    the authors' RN_L / SelfAware_Affine (which uses two one-map convs: the same function).
    """

    def __init__(
        self,
        num_features: int,
        spatial_dims: int = 2,
        eps: float = 1e-5,
        threshold: float = 0.8,
        kernel_size: int = 7,
    ):
        super().__init__()
        self.num_features, self.spatial_dims = num_features, spatial_dims
        self.eps, self.threshold = eps, threshold
        conv, pad = CONV[spatial_dims], kernel_size // 2
        self.attention = conv(2, 1, kernel_size, padding=pad, bias=False)
        self.modulation = conv(1, 2, kernel_size, padding=pad)  # output channels: gamma map, beta map

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(self, x)
        pooled = torch.cat([x.mean(1, keepdim=True), x.amax(1, keepdim=True)], dim=1)
        soft = torch.sigmoid(self.attention(pooled))
        y = region_normalize(x, soft.detach() >= self.threshold, self.eps)
        gamma, beta = self.modulation(soft).split(1, dim=1)
        return y * (1 + gamma) + beta


def set_region_mask(model: nn.Module, mask: torch.Tensor | None) -> int:
    """Give `mask` (N x 1 x *spatial, any resolution) to every region-masked block (rn_b) in `model`.

    None clears it. Returns the number of blocks reached (those implementing `RegionMaskedNorm`).
    """
    blocks = [m for m in model.modules() if isinstance(m, RegionMaskedNorm)]
    shared = None if mask is None else RegionMask(mask)  # one resizing cache for all blocks
    for block in blocks:
        block.set_mask(shared)
    return len(blocks)


@contextlib.contextmanager
def region_mask(model: nn.Module, mask: torch.Tensor) -> Iterator[int]:
    """Context: `set_region_mask(model, mask)` on entry (yields the block count), cleared on exit."""
    try:
        yield set_region_mask(model, mask)
    finally:
        set_region_mask(model, None)


@register("rn_b", traits=NormTraits(region_mask=True, recompute_state=True))
def _rn_b(channels: int, spatial_dims: int, **kwargs) -> nn.Module:
    return RegionNormB(channels, spatial_dims, **kwargs)


@register("rn_l", traits=NormTraits(affine=False))
def _rn_l(channels: int, spatial_dims: int, **kwargs) -> nn.Module:
    return RegionNormL(channels, spatial_dims, **kwargs)
