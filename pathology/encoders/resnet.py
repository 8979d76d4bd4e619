"""CLAM's truncated ResNet-50: ImageNet ResNet-50 through layer3, average pooled, 1024-d (Lu et al. 2021).

Written here (torchvision is not in the core environment) with torchvision's module names, so
torchvision's `resnet50-*.pth` and timm's `resnet50.tv_in1k` files load as they are; their `layer4.*` and
`fc.*` (the part CLAM cuts off) are not loaded. CLAM feeds 256 px patches at 20x, /255, ImageNet mean/std.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from pathology.augment import IMAGENET_MEAN, IMAGENET_STD
from pathology.encoders.registry import Encoder, register
from pathology.encoders.weights import Layout

EXPANSION = 4


class Bottleneck(nn.Module):
    """ResNet v1.5 bottleneck: 1x1, 3x3 (carrying the stride), 1x1 x4, each with BN; ReLU after the sum."""

    def __init__(self, in_channels: int, width: int, stride: int = 1) -> None:
        super().__init__()
        out = width * EXPANSION
        self.conv1 = nn.Conv2d(in_channels, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or in_channels != out:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out, 1, stride=stride, bias=False), nn.BatchNorm2d(out)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return self.relu(y + (x if self.downsample is None else self.downsample(x)))


def stage(in_channels: int, width: int, blocks: int, stride: int) -> nn.Sequential:
    """`blocks` bottlenecks, the first changing resolution/width."""
    layers = [Bottleneck(in_channels, width, stride)]
    layers += [Bottleneck(width * EXPANSION, width) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)


class ResNetTrunk(nn.Module):
    """ResNet stem and the first len(blocks) stages; the feature is the average-pooled last map."""

    def __init__(self, blocks: tuple[int, ...]) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        channels = 64
        for i, n in enumerate(blocks):
            width = 64 * 2**i
            self.add_module(f"layer{i + 1}", stage(channels, width, n, 1 if i == 0 else 2))
            channels = width * EXPANSION
        self.feature_dim = channels
        self.stages = len(blocks)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for i in range(self.stages):
            x = getattr(self, f"layer{i + 1}")(x)
        return x.mean(dim=(2, 3))


def _build(arch: Mapping[str, Any]) -> nn.Module:
    return ResNetTrunk(tuple(arch["blocks"]))


register(
    Encoder(
        name="resnet50-trunc",
        family="resnet",
        summary="ResNet-50 (ImageNet) truncated after layer3, CLAM's default encoder",
        build=_build,
        arch={"network": "resnet50", "blocks": [3, 4, 6], "through": "layer3"},
        input_px=256,
        mpp=0.5,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        feature_dim=1024,
        pooling="avgpool(layer3)",
        layouts=(Layout("torchvision / timm", "layer1.", ignored=(r"layer4\.", r"fc\.")),),
        weights="torchvision resnet50-*.pth or timm resnet50.tv_in1k model.safetensors (ImageNet)",
        flexible_input=True,
    )
)
