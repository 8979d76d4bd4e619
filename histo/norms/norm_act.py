"""The norm-activation pair and the convolution before it, as a norm's traits ask (cf. timm's norm_act).

`make_norm_act` returns the two modules separately so networks keep their own submodule names (DenseNet's
`norm1`/`relu1`, as torchvision names them, so checkpoints load); the activation is `nn.Identity` after a
norm that supplies its own (EvoNorm, FRN+TLU: the papers replace the pair as a whole).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

from torch import nn

from histo.norms.choice import NormArg, NormChoice, resolve_norm
from histo.norms.common import CONV


class NormAct(NamedTuple):
    """A norm block and the activation to put after it."""

    norm: nn.Module
    act: nn.Module


def make_norm_act(
    norm: NormArg | NormChoice,
    channels: int,
    spatial_dims: int = 2,
    act: Callable[[], nn.Module] = nn.ReLU,
    **kwargs: Any,
) -> NormAct:
    """The norm `norm` for `channels` features, then `act()` unless the norm supplies its own activation."""
    choice = resolve_norm(norm)
    return NormAct(
        choice(channels, spatial_dims, **kwargs), nn.Identity() if choice.traits.activating else act()
    )


def conv_for(norm: NormArg | NormChoice, spatial_dims: int = 2) -> type[nn.Module]:
    """The convolution class to put before `norm`: its paired one (bcn: weight-standardised) or torch's."""
    traits = resolve_norm(norm).traits
    if spatial_dims not in traits.spatial_dims:
        dims = ", ".join(map(str, sorted(traits.spatial_dims)))
        raise ValueError(f"conv_for: spatial_dims must be one of {dims}, got {spatial_dims!r}")
    return CONV[spatial_dims] if traits.conv is None else traits.conv[spatial_dims]
