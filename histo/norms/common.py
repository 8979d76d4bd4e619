"""Small helpers shared by the norm families: per-dim torch classes, shape checks, group-count rule."""

from __future__ import annotations

import torch
from torch import nn

BATCH_NORM = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
INSTANCE_NORM = {1: nn.InstanceNorm1d, 2: nn.InstanceNorm2d, 3: nn.InstanceNorm3d}
CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


def resolve_groups(channels: int, num_groups: int = 32) -> int:
    """Group count actually used for `channels`: the largest divisor of `channels` that is <= `num_groups`.

    So 32 groups for 64 channels, 16 for 16 channels (GN becomes IN), 24 for 48, 25 for 100, 1 for 37.
    """
    if num_groups < 1:
        raise ValueError(f"num_groups must be >= 1, got {num_groups}")
    return max(g for g in range(1, min(num_groups, channels) + 1) if channels % g == 0)


def channel_view(p: torch.Tensor, ndim: int) -> torch.Tensor:
    """Per-channel vector (C,) reshaped to broadcast against an (N, C, *spatial) tensor of `ndim` dims."""
    return p.view(1, -1, *([1] * (ndim - 2)))


def spatial_axes(x: torch.Tensor) -> tuple[int, ...]:
    """The spatial axes of a channels-first tensor."""
    return tuple(range(2, x.ndim))


def check_input(module: nn.Module, x: torch.Tensor) -> None:
    """Raise ValueError unless x is (N, num_features, *spatial) with the module's spatial_dims."""
    want = module.spatial_dims + 2
    if x.ndim != want or x.shape[1] != module.num_features:
        raise ValueError(
            f"{type(module).__name__}: expected input (N, {module.num_features}, "
            f"{module.spatial_dims} spatial dims), got shape {tuple(x.shape)}"
        )
