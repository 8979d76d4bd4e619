"""What a network must know about a norm besides building it: its traits, declared once at registration.

Networks read these instead of testing names: the activation after the norm (`activating`), the convolution
before it (`conv`), where it is placed (`placement`), whether the caller must supply a region mask
(`region_mask`), and which network families refuse it (`unsupported`). `calibratable` and `recompute_state`
say which run-time protocols (`histo.norms.protocols`) its modules implement, so the registry's claims can
be checked against the modules (tests/test_norm_traits.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from torch import nn

ALL_DIMS = frozenset({1, 2, 3})
# placements (`histo.norms.placement`): the norm goes to IBN-Net's sites of the network, BatchNorm elsewhere
IBN_A = "ibn-a"  # IBN at the first norm of the early stages' blocks
IBN_B = "ibn-b"  # IN at the stem and after the last residual sum of the early stages


@dataclass(frozen=True)
class NormTraits:
    """Traits of a registered norm with its default arguments (all off: a plain norm like GroupNorm).

    activating: it ends in its own nonlinearity (EvoNorm, FRN+TLU), so networks put no activation after it.
    conv: the convolution classes to pair with it, by spatial dims (bcn: weight-standardised); None: plain.
    region_mask: its modules need a region mask from the caller (`set_region_mask`), or the forward raises.
    calibratable: it keeps running batch statistics that α-BN (`histo.calibration`) blends with the batch's.
    recompute_state: its modules hold state (`RecomputeState`) that a reversible recompute must restore.
    spatial_dims: the spatial dims it is defined for.
    placement: a placement rule (`IBN_A`, `IBN_B`) networks follow per site; None: at every norm site.
    unsupported: network family -> the reason that family cannot use it (e.g. a ResNet-only placement).
    affine: its blocks have a per-channel scale `weight` and shift `bias` (`histo.norms.affine`), which the
        norm_only / norm_shift training variants train; False: none (RN-L's come from convolutions).
    """

    activating: bool = False
    conv: Mapping[int, type[nn.Module]] | None = field(default=None, hash=False)
    region_mask: bool = False
    calibratable: bool = False
    recompute_state: bool = False
    spatial_dims: frozenset[int] = ALL_DIMS
    placement: str | None = None
    unsupported: Mapping[str, str] = field(default_factory=dict, hash=False)
    affine: bool = True

    def __post_init__(self) -> None:
        if not self.spatial_dims or not self.spatial_dims <= ALL_DIMS:
            raise ValueError(
                f"spatial_dims must be a non-empty subset of {{1, 2, 3}}, got {self.spatial_dims}"
            )
        if self.conv is not None and not self.spatial_dims <= set(self.conv):
            raise ValueError(f"conv must give a class for every spatial dim {sorted(self.spatial_dims)}")
        object.__setattr__(self, "spatial_dims", frozenset(self.spatial_dims))
        object.__setattr__(self, "unsupported", MappingProxyType(dict(self.unsupported)))
        if self.conv is not None:
            object.__setattr__(self, "conv", MappingProxyType(dict(self.conv)))

    def refusal(self, family: str, *, no_mask: str | None = None) -> str | None:
        """Why networks of `family` cannot use this norm, or None when they can.

        `no_mask` says why that network is given no region mask (None: it is given one).
        """
        if self.region_mask and no_mask is not None:
            return f"it needs a region mask per image and {no_mask}"
        return self.unsupported.get(family)
