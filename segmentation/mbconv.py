"""MBConv body for 3D volumes: 1x1x1 expand -> depthwise kxkxk -> squeeze-excitation -> 1x1x1 project.

The body has no residual of its own: the reversible coupling (or the plain twin) adds it. Every norm comes
from the shared registry (`histo.norms.resolve_norm`), so any registered name, `(name, kwargs)` pair or
callable works here, and its traits choose the convolution and whether SiLU follows it. IBN-a follows
IBN-Net's ResNet block (`histo.norms.placement`): IBN at the first norm of a block in an early stage
(`site`), BatchNorm at the others; the U-Net places IBN-b, which acts outside the blocks.
"""

from __future__ import annotations

import torch
from torch import nn

from histo.norms import NormArg, NormChoice, conv_for, make_norm_act, resolve_norm
from histo.norms.placement import EARLY, FIRST, OTHER, RESNET, IBNLayout, Site, place


class SqueezeExcite(nn.Module):
    """Channel gating from the spatial mean: x * sigmoid(W2 silu(W1 mean(x))) (Hu et al.; EfficientNet)."""

    def __init__(self, channels: int, squeeze: int) -> None:
        super().__init__()
        self.reduce = nn.Conv3d(channels, squeeze, 1)
        self.expand = nn.Conv3d(squeeze, channels, 1)
        self.act = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.mean(dim=(2, 3, 4), keepdim=True)
        return x * torch.sigmoid(self.expand(self.act(self.reduce(s))))


class MBConv(nn.Module):
    """Inverted bottleneck without residual: expand x`expansion`, depthwise conv, optional SE, linear project.

    Layout: conv1x1 -> norm -> SiLU -> depthwise conv -> norm -> SiLU -> [SE] -> conv1x1 -> norm -> [dropout]
    (no SiLU after norms that carry their own nonlinearity: the `activating` trait, e.g. evonorm_*, frn).
    The squeeze width is `se_ratio` x the body's input channels (EfficientNet convention); `dropout` is
    element-wise dropout on the branch output, before the caller's residual sum. The convolutions are the
    norm's paired ones (`conv_for`: weight-standardised for bcn, WS + BCN as in Qiao et al.). `site` and
    `layout` say where the block sits for a placed norm (ibn_a); a standalone block is a first-stage one.
    """

    def __init__(
        self,
        channels: int,
        out_channels: int | None = None,
        expansion: int = 4,
        norm: NormArg | NormChoice = "instance",
        norm_kwargs: dict | None = None,
        se_ratio: float = 0.25,
        dropout: float = 0.0,
        kernel_size: int = 3,
        site: Site = EARLY,
        layout: IBNLayout = RESNET,
    ) -> None:
        super().__init__()
        out_channels = channels if out_channels is None else out_channels
        hidden = channels * expansion
        choice = resolve_norm(norm, norm_kwargs)
        conv = conv_for(choice, 3)
        self.expand = conv(channels, hidden, 1, bias=False)
        later = place(choice, OTHER, layout, site)
        self.norm1, act = make_norm_act(place(choice, FIRST, layout, site), hidden, 3, act=nn.SiLU)
        self.depthwise = conv(
            hidden, hidden, kernel_size, padding=kernel_size // 2, groups=hidden, bias=False
        )
        self.norm2 = later(hidden, 3)
        self.se = SqueezeExcite(hidden, max(1, int(channels * se_ratio))) if se_ratio > 0 else nn.Identity()
        self.project = conv(hidden, out_channels, 1, bias=False)
        self.norm3 = later(out_channels, 3)
        self.act = act  # shared by norm1 and norm2 (SiLU has no state)
        self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.norm1(self.expand(x)))
        h = self.se(self.act(self.norm2(self.depthwise(h))))
        return self.drop(self.norm3(self.project(h)))
