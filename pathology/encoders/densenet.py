"""KimiaNet and the DenseNet-121 ImageNet baseline: one network (pathology.densenet), two poolings of norm5.

kimianet              avgpool(norm5) without ReLU, 1024-d (Riasatian et al. 2021; the official KimiaNet
                      code): the released KimiaNet-IV takes 1000 px tiles at 20x, /255, ImageNet mean/std.
densenet121-imagenet  ReLU, then avgpool (torchvision's penultimate feature, Keras `pooling='avg'`): the
                      KimiaNet paper's ImageNet baseline (TCGA vertical search 63.8 against KimiaNet's 81.3).
Both read the official KimiaNet file (`module.model.0.*`; its 30-class head `module.fc_4.*` is not
loaded), torchvision's DenseNet-121 (`features.*`, old-style `norm.1` keys renamed; `classifier.*` not
loaded), histo checkpoints of a BatchNorm densenet121 (torchvision's names) and, with norm ibn_a, the
IBN-Net authors' densenet121_ibn_a (torchvision's names, `norm1.BN` / `norm1.IN` in IBN layers).
"""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F

from pathology.augment import IMAGENET_MEAN, IMAGENET_STD
from pathology.densenet import Trunk, densenet121_trunk, init_weights
from pathology.encoders.registry import Encoder, register
from pathology.encoders.weights import Layout, State

ARCH = {"network": "densenet121", "norm": "batch"}
# torchvision's released densenet121-a639ec97.pth names `denselayer1.norm.1`, its module now `norm1`
_OLD_STYLE = re.compile(r"(denselayer\d+\.(?:norm|relu|conv))\.([12])\.")


class ReluPooledTrunk(Trunk):
    """A DenseNet trunk whose feature is avgpool(ReLU(norm5)) instead of avgpool(norm5)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.feature_map(x)).mean(dim=(2, 3))


def _trunk(arch: Mapping[str, Any]) -> Trunk:
    trunk = densenet121_trunk(arch["norm"])
    init_weights(trunk)
    return trunk


def _relu_trunk(arch: Mapping[str, Any]) -> Trunk:
    return ReluPooledTrunk(OrderedDict(_trunk(arch).named_children()))


def _backbone(prefix: str) -> Callable[[State], State]:
    """Keys under `prefix` made relative to the trunk, old-style names (`norm.1`) renamed (`norm1`); other
    keys are kept, so they are reported as unexpected."""

    def convert(state: State) -> State:
        trunk = {
            _OLD_STYLE.sub(r"\1\2.", k[len(prefix) :]): v for k, v in state.items() if k.startswith(prefix)
        }
        return {**trunk, **{k: v for k, v in state.items() if not k.startswith(prefix)}}

    return convert


LAYOUTS = (
    Layout("KimiaNet (official)", "model.0.", _backbone("model.0."), ignored=(r"fc_4\.",)),
    Layout("torchvision", "features.", _backbone("features."), ignored=(r"classifier\.",)),
)
_COMMON = {
    "family": "densenet",
    "arch": ARCH,
    "input_px": 1000,
    "mpp": 0.5,
    "mean": IMAGENET_MEAN,
    "std": IMAGENET_STD,
    "feature_dim": 1024,
    "layouts": LAYOUTS,
    "flexible_input": True,
    "histo_arch": "densenet121",
}

register(
    Encoder(
        name="kimianet",
        summary="KimiaNet (DenseNet-121 fine-tuned on TCGA, Riasatian et al. 2021)",
        build=_trunk,
        pooling="avgpool(norm5) without ReLU",
        weights="KimiaNetPyTorchWeights.pth (official KimiaNet release)",
        **_COMMON,
    )
)
register(
    Encoder(
        name="densenet121-imagenet",
        summary="DenseNet-121 ImageNet baseline of the KimiaNet paper (Keras pooling='avg')",
        build=_relu_trunk,
        pooling="avgpool(ReLU(norm5))",
        weights="torchvision densenet121-*.pth (ImageNet)",
        **_COMMON,
    )
)
