"""Mirror of the registry in MONAI's `Norm` factory so MONAI networks accept `norm=(name, {...})`.

MONAI's own entries (batch, instance, group, layer, ...) are left untouched: overriding them on import would
silently change every MONAI network of the process (e.g. MONAI's `instance` is affine=False). A histo name
that MONAI already defines is registered as `histo_<name>`; `monai_name(name)` gives the key to use.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

from monai.networks.layers.factories import Norm
from torch import nn

_MONAI_OWN = frozenset(n.lower() for n in Norm.names)


def monai_name(name: str) -> str:
    """The key under which histo's norm `name` is registered in MONAI's `Norm` factory."""
    return f"histo_{name}" if name in _MONAI_OWN else name


def _build(num_features: int, *, histo_name: str, spatial_dims: int, make: Callable, **kwargs) -> nn.Module:
    """MONAI-facing constructor: `get_norm_layer` fills `num_features` with the channel count."""
    return make(histo_name, num_features, spatial_dims, **kwargs)


def add_to_monai(name: str, make: Callable[..., nn.Module]) -> None:
    """Register `name` in MONAI's Norm factory: `fn(dim)` returns a constructor taking `num_features`."""

    def factory(dim: int | None = None) -> Callable[..., nn.Module]:
        return functools.partial(_build, histo_name=name, spatial_dims=dim, make=make)

    factory.__doc__ = f"histo norm {name!r} (histo.norms.make_norm)"
    Norm.add_factory_callable(monai_name(name), factory)


def remove_from_monai(name: str) -> None:
    """Take histo's norm `name` out of MONAI's Norm factory again (MONAI's own entries are never touched)."""
    Norm.components.pop(monai_name(name).upper(), None)
