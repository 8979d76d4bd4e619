"""Shared normalization blocks: `make_norm(name, channels, spatial_dims)` builds any registered block.

Names: batch, instance, group, layer, ibn_a, ibn_b, rn_b, rn_l, bcn, evonorm_b0, evonorm_s0, frn (one
module per family; formulas in ../shared/REFERENCE.md §6 and each module's docstring). Keyword arguments use
PyTorch's names (num_groups, eps, momentum, affine). Every name is also in MONAI's `Norm` factory under
`monai_name(name)` (the name itself, or `histo_<name>` where MONAI already defines it: batch, instance,
group, layer). Blocks with running statistics (BN parts, evonorm_b0) update them only when
`updates_stats(self)`, so `frozen_running_stats(model)` covers them.
"""

from histo.norms import bcn, evonorm, frn, ibn, region, standard  # noqa: F401  (registers the names)
from histo.norms.bcn import WS_CONV, BatchChannelNorm, WSConv1d, WSConv2d, WSConv3d, standardize_weight
from histo.norms.common import resolve_groups
from histo.norms.evonorm import EvoNormB0, EvoNormS0
from histo.norms.frn import FilterResponseNorm
from histo.norms.ibn import IBN
from histo.norms.monai_factory import monai_name
from histo.norms.region import RegionMask, RegionNormB, RegionNormL, region_mask, set_region_mask
from histo.norms.registry import ACTIVATING_NORMS, make_norm, names, register
from histo.norms.standard import GroupNorm, SpatialLayerNorm
from histo.norms.stats import frozen_running_stats, updates_stats

__all__ = [
    "ACTIVATING_NORMS",
    "IBN",
    "WS_CONV",
    "BatchChannelNorm",
    "EvoNormB0",
    "EvoNormS0",
    "FilterResponseNorm",
    "GroupNorm",
    "RegionMask",
    "RegionNormB",
    "RegionNormL",
    "SpatialLayerNorm",
    "WSConv1d",
    "WSConv2d",
    "WSConv3d",
    "frozen_running_stats",
    "make_norm",
    "monai_name",
    "names",
    "region_mask",
    "register",
    "resolve_groups",
    "set_region_mask",
    "standardize_weight",
    "updates_stats",
]
