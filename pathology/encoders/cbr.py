"""The CBR baselines (Raghu et al. 2019, pathology.cbr) as encoders: avgpool of the last conv-norm-ReLU.

They have no released weights: they read histo checkpoints of a BatchNorm CBR net (`histo train --encoder`),
or a state dict with the same `features.*` names.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pathology.augment import IMAGENET_MEAN, IMAGENET_STD
from pathology.cbr import CBR_SPECS, cbr_trunk
from pathology.densenet import Trunk, init_weights
from pathology.encoders.registry import Encoder, register
from pathology.encoders.weights import Layout, State


def _trunk(arch: Mapping[str, Any]) -> Trunk:
    trunk = cbr_trunk(arch["network"], arch["norm"])
    init_weights(trunk)
    return trunk


def _features(state: State) -> State:
    return {k.removeprefix("features."): v for k, v in state.items()}


for _name in sorted(CBR_SPECS):
    register(
        Encoder(
            name=_name,
            family="cbr",
            summary=f"{_name.upper()} (Raghu et al. 2019), trained by histo",
            build=_trunk,
            arch={"network": _name, "norm": "batch"},
            input_px=224,
            mpp=0.5,
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
            feature_dim=CBR_SPECS[_name][0][-1],
            pooling="avgpool(last conv-norm-ReLU)",
            layouts=(Layout("histo", "features.", _features, ignored=(r"classifier\.",)),),
            weights="a histo checkpoint of this arch (histo train)",
            flexible_input=True,
            histo_arch=_name,
        )
    )
