"""IBN-a (Pan et al., ECCV 2018): InstanceNorm (affine) on a fraction r of the channels, BatchNorm on the rest.

The split and order follow the authors' code per architecture (XingangPan/IBN-Net): the ResNet family
(`ibnnet/modules.py`) puts IN on the first int(r*C) channels and BN on the rest (`in_first=True`, r = 0.5);
DenseNet (`ibnnet/densenet_ibn.py`) puts BN on the first int((1 - r)*C) channels and IN on the rest
(`in_first=False`, r = 0.4), so 64 channels give 38 BN + 26 IN, not 25 IN + 39 BN. Where the block goes in
a network is the `IBN_A` placement (`histo.norms.placement`).
"""

from __future__ import annotations

import torch
from torch import nn

from histo.norms.common import BATCH_NORM, INSTANCE_NORM
from histo.norms.registry import register
from histo.norms.traits import IBN_A, NormTraits


class IBN(nn.Module):
    """Split channels into an IN part and a BN part (IN first or last), normalise each, concatenate back.

    `half` is the size of the first part (as in the authors' code): int(ratio*C) IN channels when
    `in_first`, else int((1 - ratio)*C) BN channels. Submodules are named `IN` and `BN` as in the IBN-Net
    code, so its checkpoints' keys and shapes load unchanged. The BN part is a torch BatchNorm:
    `frozen_running_stats` and `alpha_bn` handle it like any other.
    """

    def __init__(
        self,
        num_features: int,
        spatial_dims: int = 2,
        ratio: float = 0.5,
        in_first: bool = True,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
    ):
        super().__init__()
        self.half = int(num_features * ratio) if in_first else int(num_features * (1 - ratio))
        n_in = self.half if in_first else num_features - self.half
        if not 0 < n_in < num_features:
            raise ValueError(
                f"IBN: ratio {ratio} of {num_features} channels gives {n_in} IN channels; "
                "need at least one IN and one BN channel"
            )
        self.num_features, self.spatial_dims = num_features, spatial_dims
        self.ratio, self.in_first = ratio, in_first
        self.IN = INSTANCE_NORM[spatial_dims](n_in, eps=eps, affine=affine)
        self.BN = BATCH_NORM[spatial_dims](
            num_features - n_in,
            eps=eps,
            momentum=momentum,
            affine=affine,
            track_running_stats=track_running_stats,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = torch.split(x, [self.half, self.num_features - self.half], dim=1)
        first, second = (self.IN, self.BN) if self.in_first else (self.BN, self.IN)
        return torch.cat([first(a.contiguous()), second(b.contiguous())], dim=1)


@register("ibn_a", traits=NormTraits(calibratable=True, placement=IBN_A))
def _ibn_a(channels: int, spatial_dims: int, **kwargs) -> nn.Module:
    return IBN(channels, spatial_dims, **kwargs)
