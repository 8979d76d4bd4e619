"""Shared normalization blocks: `make_norm(name, channels, spatial_dims)` builds any registered block.

Minimal first version (batch, instance, group); the full library is being built in this package.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register(name: str) -> Callable:
    """Decorator adding a builder `fn(channels, spatial_dims, **kwargs) -> nn.Module` to the registry."""

    def add(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        _REGISTRY[name] = fn
        return fn

    return add


def names() -> list[str]:
    """The registered norm names."""
    return sorted(_REGISTRY)


def make_norm(name: str, channels: int, spatial_dims: int = 2, **kwargs) -> nn.Module:
    """Build the norm block `name` for `channels` channels-first features with 1, 2 or 3 spatial dims."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown norm {name!r}; registered: {', '.join(names())}")
    return _REGISTRY[name](channels, spatial_dims, **kwargs)


@register("batch")
def _batch(channels: int, spatial_dims: int, **kwargs) -> nn.Module:
    return {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[spatial_dims](channels, **kwargs)


@register("instance")
def _instance(channels: int, spatial_dims: int, **kwargs) -> nn.Module:
    kwargs.setdefault("affine", True)
    cls = {1: nn.InstanceNorm1d, 2: nn.InstanceNorm2d, 3: nn.InstanceNorm3d}[spatial_dims]
    return cls(channels, **kwargs)


@register("group")
def _group(channels: int, spatial_dims: int, num_groups: int = 32, **kwargs) -> nn.Module:
    return nn.GroupNorm(min(num_groups, channels), channels, **kwargs)


from histo.norms.stats import frozen_running_stats, updates_stats  # noqa: E402

__all__ = ["frozen_running_stats", "make_norm", "names", "register", "updates_stats"]
