"""CTransPath (Wang et al., Medical Image Analysis 2022; Xiyue-Wang/TransPath).

A Swin-T (timm swin_tiny_patch4_window7_224) whose patch embedding is a small convolutional stem: two
3x3/2 conv-BN-ReLU (embed/8, embed/4 channels), a 1x1 conv to the embedding width, LayerNorm. Its feature
is the average of the final-norm tokens, 768-d; 224 px, Resize(224), ImageNet mean/std; the authors
recommend 1.0 µm/px. The released `ctranspath.pth` holds {'model': state dict} in the layout of the
authors' timm 0.5.4 fork: patch merging at the end of a stage (timm >= 0.9 puts it at the start of the
next: `layers.i.downsample` -> `layers.i+1.downsample`), and the persisted buffers `attn_mask` and
`relative_position_index`, which timm recomputes (not loaded).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from pathology.augment import IMAGENET_MEAN, IMAGENET_STD
from pathology.encoders.registry import Encoder, register
from pathology.encoders.timm_models import TokenPooled, create, prefixed
from pathology.encoders.weights import Layout, State


class ConvStem(nn.Module):
    """CTransPath's patch embedding, with the constructor timm's Swin calls (NHWC output)."""

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 4,
        in_chans: int = 3,
        embed_dim: int = 96,
        norm_layer: type[nn.Module] | None = None,
        **_: Any,  # timm's strict_img_size, output_fmt (always NHWC here), device, dtype
    ) -> None:
        super().__init__()
        if patch_size != 4 or embed_dim % 8:
            raise ValueError("the CTransPath stem is defined for patch size 4 and a width divisible by 8")
        self.img_size = (img_size, img_size)
        self.patch_size = (patch_size, patch_size)
        self.grid_size = (img_size // patch_size, img_size // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        layers: list[nn.Module] = []
        width_in, width = in_chans, embed_dim // 8
        for _ in range(2):
            layers += [nn.Conv2d(width_in, width, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(width)]
            layers.append(nn.ReLU(inplace=True))
            width_in, width = width, width * 2
        layers.append(nn.Conv2d(width_in, embed_dim, 1))
        self.proj = nn.Sequential(*layers)
        self.norm = norm_layer(embed_dim) if norm_layer else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x).permute(0, 2, 3, 1))


def _build(arch: Mapping[str, Any]) -> nn.Module:
    timm_args = {
        k: v for k, v in arch.items() if k != "embed_layer"
    }  # recorded as a name, passed as the class
    return TokenPooled(create(timm_args, embed_layer=ConvStem), "pooled")


_DOWNSAMPLE = re.compile(r"^layers\.(\d+)\.downsample\.")
_BUFFERS = (r".*\.attn_mask$", r".*\.relative_position_index$")


def _from_timm054(state: State) -> State:
    """The authors' timm 0.5.4 keys -> timm's (patch merging moves to the next stage), under `trunk.`."""
    out = {}
    for key, value in state.items():
        key = _DOWNSAMPLE.sub(lambda m: f"layers.{int(m.group(1)) + 1}.downsample.", key)
        out[f"trunk.{key}"] = value
    return out


register(
    Encoder(
        name="ctranspath",
        family="ctranspath",
        summary="CTransPath, Swin-T with a conv stem, semantic contrastive learning on TCGA+PAIP",
        build=_build,
        arch={
            "timm": "swin_tiny_patch4_window7_224",
            "img_size": 224,
            "num_classes": 0,
            "embed_layer": "ConvStem",
        },
        input_px=224,
        mpp=1.0,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        feature_dim=768,
        pooling="average of the final-norm tokens",
        layouts=(
            Layout(
                "CTransPath (timm 0.5.4)",
                "layers.0.downsample.",
                _from_timm054,
                ignored=_BUFFERS,
            ),
            Layout("timm", "layers.1.downsample.", prefixed("trunk."), ignored=_BUFFERS),
        ),
        weights="ctranspath.pth (TransPath release; also CHIEF_CTransPath.pth)",
        requires=("timm",),
    )
)
