"""IBN-a (Pan et al., ECCV 2018): InstanceNorm (affine) on the first int(r*C) channels, BatchNorm on the rest."""

from __future__ import annotations

import torch
from torch import nn

from histo.norms.common import BATCH_NORM, INSTANCE_NORM
from histo.norms.registry import register
from histo.norms.traits import IBN_A, NormTraits


class IBN(nn.Module):
    """Split channels: IN on the first int(ratio*C), BN on the others, concatenated back in order.

    Submodules are named `IN` and `BN` as in the IBN-Net code, so its checkpoints' keys load unchanged.
    The BN part is a torch BatchNorm: `frozen_running_stats` and `alpha_bn` handle it like any other.
    """

    def __init__(
        self,
        num_features: int,
        spatial_dims: int = 2,
        ratio: float = 0.5,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
    ):
        super().__init__()
        self.half = int(ratio * num_features)
        if not 0 < self.half < num_features:
            raise ValueError(
                f"IBN: ratio {ratio} of {num_features} channels gives {self.half} IN channels; "
                "need at least one IN and one BN channel"
            )
        self.num_features, self.spatial_dims, self.ratio = num_features, spatial_dims, ratio
        self.IN = INSTANCE_NORM[spatial_dims](self.half, eps=eps, affine=affine)
        self.BN = BATCH_NORM[spatial_dims](
            num_features - self.half,
            eps=eps,
            momentum=momentum,
            affine=affine,
            track_running_stats=track_running_stats,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = torch.split(x, [self.half, self.num_features - self.half], dim=1)
        return torch.cat([self.IN(a.contiguous()), self.BN(b.contiguous())], dim=1)


@register("ibn_a", traits=NormTraits(calibratable=True, placement=IBN_A))
def _ibn_a(channels: int, spatial_dims: int, **kwargs) -> nn.Module:
    return IBN(channels, spatial_dims, **kwargs)
