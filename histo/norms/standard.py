"""The standard norms: batch, instance, group, layer (torch layers) and ibn_b (the IN of IBN-b placement).

group: G = the largest divisor of C not above `num_groups` (default 32), see `resolve_groups`.
layer: one group, i.e. statistics over channels and space per sample, per-channel affine (GroupNorm(1, C)).
"""

from __future__ import annotations

from torch import nn

from histo.norms.common import BATCH_NORM, INSTANCE_NORM, resolve_groups
from histo.norms.registry import register
from histo.norms.traits import IBN_B, NormTraits

NO_RESIDUAL_SUMS = (
    "IBN-b puts IN after the stem and after residual sums, and this network has no residual sums "
    "(use ibn_a, placed as IBN-Net places it)"
)


class GroupNorm(nn.GroupNorm):
    """torch GroupNorm taking the channel count first; the group count follows `resolve_groups`."""

    def __init__(self, num_features: int, num_groups: int = 32, eps: float = 1e-5, affine: bool = True):
        super().__init__(resolve_groups(num_features, num_groups), num_features, eps=eps, affine=affine)


class SpatialLayerNorm(nn.GroupNorm):
    """Layer norm over channels and space of each sample with per-channel affine (= GroupNorm(1, C))."""

    def __init__(self, num_features: int, eps: float = 1e-5, affine: bool = True):
        super().__init__(1, num_features, eps=eps, affine=affine)


@register("batch", traits=NormTraits(calibratable=True))
def _batch(channels: int, spatial_dims: int, **kwargs) -> nn.Module:
    return BATCH_NORM[spatial_dims](channels, **kwargs)


@register("instance")
def _instance(channels: int, spatial_dims: int, affine: bool = True, **kwargs) -> nn.Module:
    return INSTANCE_NORM[spatial_dims](channels, affine=affine, **kwargs)


@register(
    "ibn_b",
    traits=NormTraits(placement=IBN_B, unsupported={"densenet": NO_RESIDUAL_SUMS, "cbr": NO_RESIDUAL_SUMS}),
)
def _ibn_b(channels: int, spatial_dims: int, affine: bool = True, **kwargs) -> nn.Module:
    """The affine IN that IBN-b places after the stem and the last residual sums of stages 1-2."""
    return INSTANCE_NORM[spatial_dims](channels, affine=affine, **kwargs)


@register("group")
def _group(channels: int, spatial_dims: int, **kwargs) -> nn.Module:
    return GroupNorm(channels, **kwargs)


@register("layer")
def _layer(channels: int, spatial_dims: int, **kwargs) -> nn.Module:
    return SpatialLayerNorm(channels, **kwargs)
