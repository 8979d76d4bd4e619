"""A network's `norm` argument in any of MONAI's and timm's forms, resolved once to a builder with traits.

Forms: a registered name (`"group"`), a `(name, kwargs)` pair (`("group", {"num_groups": 8})`), or a callable
returning a module: called with the channel count, and with `spatial_dims=` when it takes that parameter
(MONAI's rule for `num_features`). A registry entry (`get_norm(name)`) or a functools.partial of one keeps
the entry's name and traits; any other callable is a plain norm (`NormTraits()`): register it to declare
traits. The three forms of one norm resolve to equal choices, so they build identical networks.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from torch import nn

from histo.norms.registry import NormSpec, get_norm
from histo.norms.traits import NormTraits

NormArg = str | tuple[str | Callable[..., nn.Module], Mapping[str, Any]] | Callable[..., nn.Module]


@dataclass(frozen=True)
class NormChoice:
    """A resolved norm: registry `name` (None for an unregistered callable), its builder, kwargs, traits.

    Calling it builds one block: `choice(channels, spatial_dims, **overrides)`.
    """

    name: str | None
    builder: Callable[..., nn.Module]
    kwargs: Mapping[str, Any] = field(hash=False)
    traits: NormTraits

    def __post_init__(self) -> None:
        object.__setattr__(self, "kwargs", MappingProxyType(dict(self.kwargs)))

    def __call__(self, channels: int, spatial_dims: int = 2, **overrides: Any) -> nn.Module:
        kwargs = {**self.kwargs, **overrides}
        if _takes(self.builder, "spatial_dims"):
            return self.builder(channels, spatial_dims=spatial_dims, **kwargs)
        return self.builder(channels, **kwargs)

    def with_kwargs(self, **kwargs: Any) -> NormChoice:
        """The same norm with these keyword arguments added to (and overriding) its own."""
        return NormChoice(self.name, self.builder, {**self.kwargs, **kwargs}, self.traits)


def resolve_norm(norm: NormArg | NormChoice, kwargs: Mapping[str, Any] | None = None) -> NormChoice:
    """Resolve a `norm` argument (see module docstring); `kwargs` are added to a pair's own kwargs."""
    if isinstance(norm, NormChoice):
        return norm.with_kwargs(**(kwargs or {}))
    if isinstance(norm, tuple):
        if len(norm) != 2 or not isinstance(norm[1], Mapping):
            raise ValueError(f"a norm pair must be (name or callable, kwargs dict), got {norm!r}")
        return resolve_norm(norm[0], {**norm[1], **(kwargs or {})})
    extra = dict(kwargs or {})
    if isinstance(norm, str):
        spec = get_norm(norm)
        return NormChoice(spec.name, spec, extra, spec.traits)
    if isinstance(norm, NormSpec):
        return NormChoice(norm.name, norm, extra, norm.traits)
    if isinstance(norm, functools.partial) and isinstance(norm.func, NormSpec) and not norm.args:
        return NormChoice(norm.func.name, norm.func, {**norm.keywords, **extra}, norm.func.traits)
    if callable(norm):
        return NormChoice(None, norm, extra, NormTraits())
    raise ValueError(f"norm must be a registered name, a (name, kwargs) pair or a callable, got {norm!r}")


def _takes(fn: Callable[..., Any], parameter: str) -> bool:
    """Whether `fn` has a parameter named `parameter` (False when its signature cannot be read)."""
    try:
        return parameter in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
