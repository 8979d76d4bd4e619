"""CBR baselines: small conv-norm-ReLU stacks, the lightweight models of Raghu et al. 2019 ("Transfusion").

Specs (appendix of the paper): stride-1 convolutions, each conv-norm-ReLU followed by 3x3/2 max pooling
(CBR-LargeT has none after its last layer), then global average pooling and a linear head.
  cbr-large-t: 7x7 conv 32, 64, 128, 256, 512      cbr-large-w: 7x7 conv 64, 128, 256, 512
  cbr-small:   7x7 conv 32, 64, 128, 256           cbr-tiny:    5x5 conv 64, 128, 256, 512
Every norm comes from the shared registry with its traits (paired convolution, own activation), so CBR and
DenseNet are compared with the same norm. IBN-a follows IBN-Net's ResNet rule (`IBN_LAYOUT`,
`histo.norms.placement`) with each conv-norm-ReLU layer a one-norm block at its own stage: IBN (IN on the
first half) in the first three layers but never the last, BN after the others. IBN-b is refused: a CBR
stack has no residual sums to put its IN after.
"""

from __future__ import annotations

from collections import OrderedDict

from torch import nn

from histo.norms import NormArg, NormChoice, conv_for, make_norm_act, resolve_norm
from histo.norms.placement import FIRST, IBNLayout, Site, place
from pathology.densenet import FeatureClassifier, Trunk, init_weights, inplace_relu

FAMILY = "cbr"  # the family name norms' `unsupported` trait refers to
IBN_LAYOUT = IBNLayout(FAMILY)  # IBN-Net's ResNet split: IN on the first half
# name -> (widths, kernel size, max pooling after the last layer)
CBR_SPECS: dict[str, tuple[tuple[int, ...], int, bool]] = {
    "cbr-large-t": ((32, 64, 128, 256, 512), 7, False),
    "cbr-large-w": ((64, 128, 256, 512), 7, True),
    "cbr-small": ((32, 64, 128, 256), 7, True),
    "cbr-tiny": ((64, 128, 256, 512), 5, True),
}


def cbr_trunk(name: str, norm: NormArg | NormChoice = "batch") -> Trunk:
    """The conv-norm-ReLU(-maxpool) stack of CBR model `name` (no ReLU after a norm with its own)."""
    widths, kernel, last_pool = CBR_SPECS[name]
    choice = resolve_norm(norm)
    conv = conv_for(choice, 2)
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    in_channels = 3
    for i, width in enumerate(widths):
        layers[f"conv{i}"] = conv(in_channels, width, kernel_size=kernel, padding=kernel // 2, bias=False)
        site_norm = place(choice, FIRST, IBN_LAYOUT, Site(i, len(widths)))
        layers[f"norm{i}"], layers[f"relu{i}"] = make_norm_act(site_norm, width, 2, act=inplace_relu)
        if i < len(widths) - 1 or last_pool:
            layers[f"pool{i}"] = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        in_channels = width
    return Trunk(layers)


def cbr(name: str, norm: NormArg | NormChoice = "batch", num_classes: int = 0) -> FeatureClassifier:
    """CBR model `name` (see CBR_SPECS) with a linear head on its pooled last map; `norm` in any form."""
    if name not in CBR_SPECS:
        raise ValueError(f"unknown CBR model {name!r}; known: {', '.join(sorted(CBR_SPECS))}")
    model = FeatureClassifier(cbr_trunk(name, norm), CBR_SPECS[name][0][-1], num_classes)
    init_weights(model)
    return model
