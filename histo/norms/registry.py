"""Name -> (builder, traits) registry behind `make_norm`; every name is mirrored into MONAI's `Norm` factory.

A new norm is one module with its class and one registration (MONAI's factories and timm's norm-act map
follow the same pattern):

    @register("my_norm", traits=NormTraits(activating=True))
    def _my_norm(channels: int, spatial_dims: int, **kwargs) -> nn.Module:
        return MyNorm(channels, spatial_dims, **kwargs)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from histo.norms.affine import mark
from histo.norms.monai_factory import add_to_monai, remove_from_monai
from histo.norms.traits import NormTraits

Builder = Callable[..., nn.Module]


@dataclass(frozen=True)
class NormSpec:
    """A registered norm: its name, its builder `fn(channels, spatial_dims, **kwargs)` and its traits.

    Calling the spec builds the norm (`spec(channels, spatial_dims, **kwargs)`), so a spec (or a
    functools.partial of one) is also a valid callable `norm` argument that keeps its traits.
    """

    name: str
    builder: Builder
    traits: NormTraits

    def __call__(self, channels: int, spatial_dims: int = 2, **kwargs) -> nn.Module:
        return make_norm(self.name, channels, spatial_dims, **kwargs)


_REGISTRY: dict[str, NormSpec] = {}


def register(name: str, traits: NormTraits | None = None) -> Callable[[Builder], Builder]:
    """Decorator adding a builder `fn(channels, spatial_dims, **kwargs) -> nn.Module` with its traits.

    No traits means a plain norm (`NormTraits()`). The name is also added to MONAI's `Norm` factory (see
    `histo.norms.monai_factory.monai_name`). A name can be registered once.
    """
    if name in _REGISTRY:
        raise ValueError(f"norm {name!r} is already registered")

    def add(fn: Builder) -> Builder:
        _REGISTRY[name] = NormSpec(name, fn, NormTraits() if traits is None else traits)
        add_to_monai(name, make_norm)
        return fn

    return add


def unregister(name: str) -> None:
    """Remove `name` from the registry and MONAI's factory (for tests and interactive sessions)."""
    get_norm(name)
    del _REGISTRY[name]
    remove_from_monai(name)


def names() -> list[str]:
    """The registered norm names."""
    return sorted(_REGISTRY)


def get_norm(name: str) -> NormSpec:
    """The registered norm `name` (ValueError naming the registered ones if there is none)."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown norm {name!r}; registered: {', '.join(names())}")
    return _REGISTRY[name]


def norm_traits(name: str) -> NormTraits:
    """The traits registered with norm `name`."""
    return get_norm(name).traits


def make_norm(name: str, channels: int, spatial_dims: int = 2, **kwargs) -> nn.Module:
    """Build the norm block `name` for `channels` channels-first features with its spatial dims (1-3)."""
    spec = get_norm(name)
    if spatial_dims not in spec.traits.spatial_dims:
        dims = ", ".join(map(str, sorted(spec.traits.spatial_dims)))
        raise ValueError(f"norm {name!r}: spatial_dims must be one of {dims}, got {spatial_dims!r}")
    if not isinstance(channels, int) or channels < 1:
        raise ValueError(f"norm {name!r}: channels must be a positive int, got {channels!r}")
    return mark(spec.builder(channels, spatial_dims, **kwargs), name)
