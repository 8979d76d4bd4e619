"""3D U-Net of reversible MBConv sequences (Pendse et al. 2020 style) and its non-reversible twin.

Each level is a `ReversibleSequence` of coupling blocks whose F and G are MBConv bodies on half the
channels. Between sequences sit the non-reversible parts: a 3x3x3 stem, 2x2x2 stride-2 convolutions down
(which also change the channel count), 2x2x2 stride-2 transposed convolutions up, and a 1x1x1 convolution
merging the up-sampled features with the skip (the encoder sequence's output). `reversible=False` builds the
same modules run under plain autograd: identical parameter names, the same function, more memory.

IBN-Net's placement (`histo.norms.placement`, ResNet rule, the encoder levels as its stages): `ibn_a` puts
IBN (IN on the first half) at the first norm of every MBConv body of the encoder's first three levels, never
the deepest one, and BatchNorm everywhere else, decoder included; `ibn_b` puts an affine IN after the stem
(`stem_norm`) and at the output of the first two encoder levels (`encoder_norm`, after their last coupling
sums: outside the reversible sequences, so the inversion is untouched), with BatchNorm in every body. For
any other norm those two are identities, so parameter names do not change.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
from torch import nn

from histo.norms import NormArg, NormChoice, resolve_norm
from histo.norms.placement import STAGE_END, STEM_END, IBNLayout, Site, place_extra
from segmentation.config import roi_divisor
from segmentation.mbconv import MBConv
from segmentation.reversible import ReversibleBlock, ReversibleSequence

HEADS = ("regions", "labels")
IBN_LAYOUT = IBNLayout("unet3d")  # IBN-Net's ResNet split and rule, encoder levels as stages


class UNet3D(nn.Module):
    """Reversible MBConv 3D U-Net returning logits (N, out_channels, D, H, W).

    head="regions": out_channels independent sigmoid channels, one per region of the label scheme (TC, WT,
    ET for BraTS 2018-2023; segmentation.label_schemes); head="labels": softmax over out_channels classes.
    Spatial sizes must be divisible by 2 ** (len(channels) - 1). `norm` is a registered name, a
    `(name, kwargs)` pair or a callable (`histo.norms.resolve_norm`); `norm_kwargs` add to its kwargs.
    `.config` rebuilds the network: a registered norm is stored as its name and kwargs (so the three forms
    give one config), an unregistered callable as itself (such a config is not JSON-able).
    """

    def __init__(
        self,
        in_channels: int = 4,
        out_channels: int = 3,
        channels: Sequence[int] = (16, 32, 64, 128),
        blocks_per_level: int = 2,
        expansion: int = 4,
        norm: NormArg | NormChoice = "instance",
        norm_kwargs: dict | None = None,
        se_ratio: float = 0.25,
        dropout: float = 0.0,
        reversible: bool = True,
        head: str = "regions",
    ) -> None:
        super().__init__()
        channels = [int(c) for c in channels]
        _check_args(out_channels, channels, blocks_per_level, head)
        choice = resolve_norm(norm, norm_kwargs)
        self.config = {
            "in_channels": in_channels,
            "out_channels": out_channels,
            "channels": channels,
            "blocks_per_level": blocks_per_level,
            "expansion": expansion,
            "norm": choice.builder if choice.name is None else choice.name,
            "norm_kwargs": dict(choice.kwargs) or None,
            "se_ratio": se_ratio,
            "dropout": dropout,
            "reversible": reversible,
            "head": head,
        }
        body = {"expansion": expansion, "norm": choice, "se_ratio": se_ratio, "dropout": dropout}
        levels = len(channels)

        def sequence(c: int, stage: int | None) -> ReversibleSequence:
            def mbconv(block: int) -> MBConv:
                return MBConv(c // 2, **body, site=Site(stage, levels, block), layout=IBN_LAYOUT)

            blocks = [ReversibleBlock(mbconv(b), mbconv(b)) for b in range(blocks_per_level)]
            return ReversibleSequence(blocks, reversible=reversible)

        def extra_norm(position: str, c: int, stage: int | None = None) -> nn.Module:
            norm = place_extra(choice, position, IBN_LAYOUT, Site(stage, levels))
            return nn.Identity() if norm is None else norm(c, 3)

        pairs = list(itertools.pairwise(channels))
        self.stem = nn.Conv3d(in_channels, channels[0], 3, padding=1)
        self.stem_norm = extra_norm(STEM_END, channels[0])
        self.encoder = nn.ModuleList([sequence(c, level) for level, c in enumerate(channels)])
        self.encoder_norm = nn.ModuleList([extra_norm(STAGE_END, c, lv) for lv, c in enumerate(channels)])
        self.down = nn.ModuleList([nn.Conv3d(a, b, 2, stride=2) for a, b in pairs])
        self.up = nn.ModuleList([nn.ConvTranspose3d(b, a, 2, stride=2) for a, b in pairs])
        self.merge = nn.ModuleList([nn.Conv3d(2 * a, a, 1) for a, _ in pairs])
        self.decoder = nn.ModuleList([sequence(a, None) for a, _ in pairs])
        self.out = nn.Conv3d(channels[0], out_channels, 1)

    @property
    def divisor(self) -> int:
        """Every spatial size of the input must be a multiple of this."""
        return roi_divisor(len(self.encoder))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        x = self.stem_norm(self.stem(x))
        skips = []
        for level, sequence in enumerate(self.encoder):
            x = self.encoder_norm[level](sequence(x))
            if level < len(self.down):
                skips.append(x)
                x = self.down[level](x)
        for level in reversed(range(len(self.decoder))):
            x = self.merge[level](torch.cat([self.up[level](x), skips[level]], dim=1))
            x = self.decoder[level](x)
        return self.out(x)

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """Sigmoid per region channel (regions head) or softmax over classes (labels head)."""
        if self.config["head"] == "regions":
            return torch.sigmoid(logits)
        return torch.softmax(logits, dim=1)

    def _check_input(self, x: torch.Tensor) -> None:
        want = self.config["in_channels"]
        if x.ndim != 5 or x.shape[1] != want:
            raise ValueError(f"UNet3D expects input (N, {want}, D, H, W), got {tuple(x.shape)}")
        bad = [s for s in x.shape[2:] if s % self.divisor]
        if bad:
            raise ValueError(
                f"UNet3D input spatial size {tuple(x.shape[2:])} must be divisible by {self.divisor} "
                f"(2 ** (levels - 1)); pad or crop to a multiple"
            )


def _check_args(out_channels: int, channels: list[int], blocks_per_level: int, head: str) -> None:
    if head not in HEADS:
        raise ValueError(f"head must be one of {HEADS}, got {head!r}")
    if head == "regions" and out_channels < 1:
        raise ValueError(f"head='regions' needs at least one region channel, got out_channels={out_channels}")
    if head == "labels" and out_channels < 2:
        raise ValueError(f"head='labels' needs at least 2 classes, got out_channels={out_channels}")
    if not channels or any(c < 2 or c % 2 for c in channels):
        raise ValueError(f"channels must be a non-empty list of even numbers >= 2, got {channels}")
    if blocks_per_level < 1:
        raise ValueError(f"blocks_per_level must be >= 1, got {blocks_per_level}")
