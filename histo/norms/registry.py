"""Name -> builder registry behind `make_norm`; every name is mirrored into MONAI's `Norm` factory."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from histo.norms.monai_factory import add_to_monai

Builder = Callable[..., nn.Module]
_REGISTRY: dict[str, Builder] = {}


def register(name: str) -> Callable[[Builder], Builder]:
    """Decorator adding a builder `fn(channels, spatial_dims, **kwargs) -> nn.Module` to the registry.

    The name is also added to MONAI's `Norm` factory (see `histo.norms.monai_factory.monai_name`).
    """

    def add(fn: Builder) -> Builder:
        _REGISTRY[name] = fn
        add_to_monai(name, make_norm)
        return fn

    return add


def names() -> list[str]:
    """The registered norm names."""
    return sorted(_REGISTRY)


# Blocks that end in their own nonlinearity (EvoNorm's x * sigmoid(v x) or max; FRN's TLU): networks put no
# activation after them, as the EvoNorm and FRN papers replace the norm-activation pair as a whole.
ACTIVATING_NORMS = frozenset({"evonorm_b0", "evonorm_s0", "frn"})


def make_norm(name: str, channels: int, spatial_dims: int = 2, **kwargs) -> nn.Module:
    """Build the norm block `name` for `channels` channels-first features with 1, 2 or 3 spatial dims."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown norm {name!r}; registered: {', '.join(names())}")
    if spatial_dims not in (1, 2, 3):
        raise ValueError(f"norm {name!r}: spatial_dims must be 1, 2 or 3, got {spatial_dims!r}")
    if not isinstance(channels, int) or channels < 1:
        raise ValueError(f"norm {name!r}: channels must be a positive int, got {channels!r}")
    return _REGISTRY[name](channels, spatial_dims, **kwargs)
