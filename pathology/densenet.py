"""DenseNet-121 built from the shared norm registry, with torchvision's module names so its weights load.

No torchvision: it replaces the CPU torch here (ENVIRONMENT.md). Module names follow torchvision
(`features.conv0`, `features.denseblock1.denselayer1.norm1`, `features.transition1.conv`, `features.norm5`)
so ImageNet and KimiaNet checkpoints map one to one. Unlike torchvision, the head sees the KimiaNet feature:
global average pool of `norm5` *without* the final ReLU (Riasatian et al. 2021; official KimiaNet code).

IBN-a placement follows the IBN-Net authors' `densenet_ibn.py` (`IBN_LAYOUT`, `histo.norms.placement`): in
dense blocks 1-3 the first norm (`norm1`) of every third dense layer (denselayer1, 4, 7, ...) is IBN with
BN on the first int(0.6 C) channels and IN on the remaining C - int(0.6 C), as the authors split it, so
their DenseNet-121-IBN-a state dict loads; every other norm stays BatchNorm. IBN-b (IN after residual
sums) is refused: DenseNet has none. Norms come with their traits (`histo.norms`): the convolutions are
the norm's paired ones (`conv_for`: bcn's weight-standardised convolutions); norms with their own
nonlinearity (EvoNorm, FRN) get no ReLU after them (`make_norm_act`).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Collection, Iterable

import torch
from torch import nn

from histo.norms import NormArg, NormChoice, conv_for, make_norm_act, resolve_norm
from histo.norms.placement import FIRST, OTHER, STEM, IBNLayout, Site, place

GROWTH_RATE = 32
BLOCK_CONFIG = (6, 12, 24, 16)
NUM_INIT_FEATURES = 64
BN_SIZE = 4
FAMILY = "densenet"  # the family name norms' `unsupported` trait refers to
IBN_LAYOUT = IBNLayout(FAMILY, ratio=0.4, in_first=False, every=3)  # densenet_ibn.py: IBN(C, 0.4)


class Trunk(nn.Sequential):
    """A convolutional trunk: calling it returns the globally average-pooled last map (the feature)."""

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        """The last feature map (N, C, h, w), e.g. DenseNet's `norm5` output."""
        return super().forward(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.feature_map(x).mean(dim=(2, 3))


class FeatureClassifier(nn.Module):
    """`features` (a network returning the pooled feature) followed by a linear `classifier`.

    `num_classes=0` builds no head (forward returns the feature), for untrained feature extractors.
    `set_trainable` says which parameters train and which submodules stay in eval mode on every `.train()`
    (frozen parts keep their BN statistics; a training variant's rule, `pathology.variants`).
    """

    def __init__(self, features: nn.Module, feature_dim: int, num_classes: int) -> None:
        super().__init__()
        self.features = features
        self.feature_dim = feature_dim
        self.classifier = nn.Linear(feature_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.eval_modules: tuple[str, ...] = ()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))

    def set_trainable(self, trainable: Collection[str], eval_modules: Iterable[str] = ()) -> None:
        """Train exactly the parameters named in `trainable`; keep `eval_modules` in eval mode."""
        unknown = set(trainable) - {n for n, _ in self.named_parameters()}
        if unknown:
            raise ValueError(f"no such parameters: {', '.join(sorted(unknown)[:3])}")
        for name, p in self.named_parameters():
            p.requires_grad_(name in trainable)
        self.eval_modules = tuple(eval_modules)
        self.train(self.training)

    def train(self, mode: bool = True) -> FeatureClassifier:
        super().train(mode)
        for name in self.eval_modules:
            self.get_submodule(name).eval()
        return self


def inplace_relu() -> nn.Module:
    """torchvision's in-place ReLU after a norm."""
    return nn.ReLU(inplace=True)


class DenseLayer(nn.Sequential):
    """Bottleneck layer norm1-relu1-conv1(1x1)-norm2-relu2-conv2(3x3) producing `growth_rate` new maps."""

    def __init__(self, in_channels: int, norm: NormChoice, site: Site) -> None:
        conv = conv_for(norm, 2)
        width = BN_SIZE * GROWTH_RATE
        norm1, relu1 = make_norm_act(place(norm, FIRST, IBN_LAYOUT, site), in_channels, 2, act=inplace_relu)
        conv1 = conv(in_channels, width, kernel_size=1, bias=False)
        norm2, relu2 = make_norm_act(place(norm, OTHER, IBN_LAYOUT), width, 2, act=inplace_relu)
        conv2 = conv(width, GROWTH_RATE, kernel_size=3, padding=1, bias=False)
        super().__init__(
            OrderedDict(norm1=norm1, relu1=relu1, conv1=conv1, norm2=norm2, relu2=relu2, conv2=conv2)
        )


class DenseBlock(nn.ModuleDict):
    """Dense connectivity: each layer sees the concatenation of the block input and all earlier outputs."""

    def __init__(self, num_layers: int, in_channels: int, norm: NormChoice, stage: int) -> None:
        super().__init__(
            {
                f"denselayer{i + 1}": DenseLayer(
                    in_channels + i * GROWTH_RATE, norm, Site(stage, len(BLOCK_CONFIG), block=i)
                )
                for i in range(num_layers)
            }
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        maps = [x]
        for layer in self.values():
            maps.append(layer(torch.cat(maps, 1)))
        return torch.cat(maps, 1)


class Transition(nn.Sequential):
    """norm-relu-conv(1x1) halving the channels, then 2x2 average pooling."""

    def __init__(self, in_channels: int, out_channels: int, norm: NormChoice) -> None:
        layer, relu = make_norm_act(place(norm, OTHER, IBN_LAYOUT), in_channels, 2, act=inplace_relu)
        conv = conv_for(norm, 2)(in_channels, out_channels, kernel_size=1, bias=False)
        super().__init__(
            OrderedDict(norm=layer, relu=relu, conv=conv, pool=nn.AvgPool2d(kernel_size=2, stride=2))
        )


def densenet121_trunk(norm: NormArg | NormChoice = "batch") -> Trunk:
    """The DenseNet-121 `features` trunk ending in `norm5` (no final ReLU): 1024 channels."""
    choice, stem = resolve_norm(norm), NUM_INIT_FEATURES
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    layers["conv0"] = conv_for(choice, 2)(3, stem, kernel_size=7, stride=2, padding=3, bias=False)
    layers["norm0"], layers["relu0"] = make_norm_act(
        place(choice, STEM, IBN_LAYOUT), stem, 2, act=inplace_relu
    )
    layers["pool0"] = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
    channels = NUM_INIT_FEATURES
    for i, num_layers in enumerate(BLOCK_CONFIG):
        layers[f"denseblock{i + 1}"] = DenseBlock(num_layers, channels, choice, stage=i)
        channels += num_layers * GROWTH_RATE
        if i < len(BLOCK_CONFIG) - 1:
            layers[f"transition{i + 1}"] = Transition(channels, channels // 2, choice)
            channels //= 2
    layers["norm5"] = place(choice, OTHER, IBN_LAYOUT)(channels, 2)
    return Trunk(layers)


def init_weights(model: nn.Module) -> None:
    """torchvision's DenseNet initialisation: Kaiming-normal convolutions, unit norms, zero biases."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight)
        elif isinstance(m, nn.Linear):
            nn.init.zeros_(m.bias)


def densenet121(norm: NormArg | NormChoice = "batch", num_classes: int = 0) -> FeatureClassifier:
    """DenseNet-121 with every norm from the registry and a linear head on the 1024-d KimiaNet feature.

    `norm`: a registered name, a `(name, kwargs)` pair or a callable (`histo.norms.resolve_norm`).
    """
    model = FeatureClassifier(densenet121_trunk(norm), 1024, num_classes)
    init_weights(model)
    return model
