"""Which modules of a network are normalization layers, and which of their parameters scale or shift.

One definition for every caller (the `norm_only` / `norm_shift` training variants, parameter counts):
a normalization layer is a block built by the registry (`make_norm` marks each block it builds, so a new
norm needs nothing more than its `@register`) or one of torch's own norm classes (BatchNorm, InstanceNorm,
GroupNorm, LayerNorm, RMSNorm: what networks built outside the registry use, e.g. timm's ViTs or the
ResNet-50 trunk). Its scale is its own `weight` parameter and its shift its own `bias` (PyTorch's names,
used by every registered block); other parameters (EvoNorm's `v`, FRN's threshold `tau`, RN-L's
modulation convolutions) are not affine. A composite block (IBN, BCN) contributes its own parameters and
its torch norm children theirs. The `affine` trait says whether a registered norm has any.
"""

from __future__ import annotations

from typing import Literal

from torch import nn
from torch.nn.modules.batchnorm import _NormBase

Role = Literal["scale", "shift"]
ROLES: dict[str, Role] = {"weight": "scale", "bias": "shift"}
MARK = "_histo_norm"  # attribute `make_norm` sets on each block it builds: the registered name
TORCH_NORMS = (_NormBase, nn.GroupNorm, nn.LayerNorm, nn.RMSNorm)


def mark(module: nn.Module, name: str) -> nn.Module:
    """Record on a block that the registry built it as norm `name`."""
    setattr(module, MARK, name)
    return module


def is_norm_layer(module: nn.Module) -> bool:
    """True for a registry-built block or a torch normalization layer."""
    return hasattr(module, MARK) or isinstance(module, TORCH_NORMS)


def norm_layers(model: nn.Module) -> list[str]:
    """Names (as in `named_modules`) of the normalization layers of `model`."""
    return [name for name, m in model.named_modules() if is_norm_layer(m)]


def norm_parameters(model: nn.Module) -> dict[str, Role]:
    """Parameter name -> "scale" | "shift" for the affine parameters of every normalization layer."""
    roles: dict[str, Role] = {}
    for name in norm_layers(model):
        module = model.get_submodule(name)
        for pname, p in module.named_parameters(recurse=False):
            if pname in ROLES and p is not None:
                roles[f"{name}.{pname}" if name else pname] = ROLES[pname]
    return roles
