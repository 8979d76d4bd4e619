"""Shared normalization blocks: `make_norm(name, channels, spatial_dims)` builds any registered block.

Names: batch, instance, group, layer, ibn_a, ibn_b, rn_b, rn_l, bcn, evonorm_b0, evonorm_s0, frn (one
module per family; formulas in ../shared/REFERENCE.md §6 and each module's docstring). Keyword arguments use
PyTorch's names (num_groups, eps, momentum, affine). Each name is registered with its `NormTraits`
(`norm_traits(name)`), which networks read through `resolve_norm` (a name, a `(name, kwargs)` pair or a
callable), `make_norm_act` (no activation after a norm that has its own) and `conv_for` (bcn's
weight-standardised convolution); networks put ibn_a/ibn_b where IBN-Net does through
`histo.norms.placement` (their `placement` trait). Calibration, the reversible recompute and
`set_region_mask` find modules by the protocols in `histo.norms.protocols`; `norm_layers` and
`norm_parameters` (`histo.norms.affine`) find the normalization layers and their scale/shift parameters. Every name is also in MONAI's `Norm` factory under
`monai_name(name)` (the name itself, or `histo_<name>` where MONAI already defines it: batch, instance,
group, layer). Blocks with running statistics (BN parts, evonorm_b0) update them only when
`updates_stats(self)`, so `frozen_running_stats(model)` covers them.
"""

from histo.norms import bcn, evonorm, frn, ibn, region, standard  # noqa: F401  (registers the names)
from histo.norms.affine import is_norm_layer, norm_layers, norm_parameters
from histo.norms.bcn import WS_CONV, BatchChannelNorm, WSConv1d, WSConv2d, WSConv3d, standardize_weight
from histo.norms.choice import NormArg, NormChoice, resolve_norm
from histo.norms.common import resolve_groups
from histo.norms.evonorm import EvoNormB0, EvoNormS0
from histo.norms.frn import FilterResponseNorm
from histo.norms.ibn import IBN
from histo.norms.monai_factory import monai_name
from histo.norms.norm_act import NormAct, conv_for, make_norm_act
from histo.norms.protocols import CalibratableNorm, RecomputeState, RegionMaskedNorm
from histo.norms.region import RegionMask, RegionNormB, RegionNormL, region_mask, set_region_mask
from histo.norms.registry import NormSpec, get_norm, make_norm, names, norm_traits, register, unregister
from histo.norms.standard import GroupNorm, SpatialLayerNorm
from histo.norms.stats import frozen_running_stats, updates_stats
from histo.norms.traits import IBN_A, IBN_B, NormTraits

__all__ = [
    "IBN",
    "IBN_A",
    "IBN_B",
    "WS_CONV",
    "BatchChannelNorm",
    "CalibratableNorm",
    "EvoNormB0",
    "EvoNormS0",
    "FilterResponseNorm",
    "GroupNorm",
    "NormAct",
    "NormArg",
    "NormChoice",
    "NormSpec",
    "NormTraits",
    "RecomputeState",
    "RegionMask",
    "RegionMaskedNorm",
    "RegionNormB",
    "RegionNormL",
    "SpatialLayerNorm",
    "WSConv1d",
    "WSConv2d",
    "WSConv3d",
    "conv_for",
    "frozen_running_stats",
    "get_norm",
    "is_norm_layer",
    "make_norm",
    "make_norm_act",
    "monai_name",
    "names",
    "norm_layers",
    "norm_parameters",
    "norm_traits",
    "region_mask",
    "register",
    "resolve_groups",
    "resolve_norm",
    "set_region_mask",
    "standardize_weight",
    "unregister",
    "updates_stats",
]
