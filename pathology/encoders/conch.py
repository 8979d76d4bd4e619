"""CONCH's image tower (Lu et al., Nature Medicine 2024; mahmoodlab/CONCH), as TRIDENT's `conch_v1` uses it.

A ViT-B/16 at 448 px (timm VisionTransformer defaults, class token, no layer scale, dynamic image size)
whose tokens go through CoCa's contrastive attentional pooler: one learned query (512-d) attends, with
8 heads, over the layer-normed tokens; the pooled query is layer-normed again: 512-d, the output of
`encode_image(x, proj_contrast=False, normalize=False)`. Input: Resize(448) bicubic + CenterCrop(448),
OpenAI CLIP mean/std. The released `pytorch_model.bin` is the whole CoCa model: only the tower's
`visual.trunk`, `visual.attn_pool_contrast` and `visual.ln_contrast` are loaded; the caption pooler, the
contrastive projection and the text tower and decoder are not part of this feature.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from pathology.encoders.registry import Encoder, register
from pathology.encoders.timm_models import create
from pathology.encoders.weights import Layout, State

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class AttentionalPooler(nn.Module):
    """Learned queries attending over layer-normed context tokens (CoCa; parameter names as open_clip)."""

    def __init__(self, width: int, context_width: int, heads: int, queries: int) -> None:
        super().__init__()
        self.query = nn.Parameter(torch.randn(queries, width))
        self.attn = nn.MultiheadAttention(
            width, heads, kdim=context_width, vdim=context_width, batch_first=True
        )
        self.ln_q = nn.LayerNorm(width)
        self.ln_k = nn.LayerNorm(context_width)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        context = self.ln_k(tokens)
        query = self.ln_q(self.query).unsqueeze(0).expand(tokens.shape[0], -1, -1)
        return self.attn(query, context, context, need_weights=False)[0]


class ConchImageTower(nn.Module):
    """timm ViT trunk -> contrastive attentional pooler (first query) -> LayerNorm."""

    def __init__(self, arch: Mapping[str, Any]) -> None:
        super().__init__()
        pool = arch["pooler"]
        self.trunk = create(arch["trunk"])
        width = self.trunk.num_features
        self.attn_pool_contrast = AttentionalPooler(pool["width"], width, pool["heads"], pool["queries"])
        self.ln_contrast = nn.LayerNorm(pool["width"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = self.attn_pool_contrast(self.trunk.forward_features(x))[:, 0]
        return self.ln_contrast(pooled)


def _visual(state: State) -> State:
    return {k.removeprefix("visual."): v for k, v in state.items()}


register(
    Encoder(
        name="conch-v1",
        family="conch",
        summary="CONCH v1 image tower, CoCa ViT-B/16 on 1.17 M image-caption pairs (MahmoodLab/CONCH)",
        build=ConchImageTower,
        arch={
            "trunk": {
                "timm": "vit_base_patch16_224",
                "img_size": 448,
                "num_classes": 0,
                "dynamic_img_size": True,
            },
            "pooler": {"width": 512, "heads": 8, "queries": 1},
        },
        input_px=448,
        mpp=0.5,
        mean=OPENAI_CLIP_MEAN,
        std=OPENAI_CLIP_STD,
        interpolation="bicubic",
        feature_dim=512,
        pooling="contrastive attentional pooler (1 query, 8 heads) + LayerNorm, no projection",
        layouts=(
            Layout(
                "CONCH CoCa",
                "visual.trunk.",
                _visual,
                ignored=(
                    r"visual\.attn_pool_caption\.",
                    r"visual\.ln_caption\.",
                    r"visual\.proj_contrast$",
                    r"text\.",
                    r"text_decoder\.",
                    r"logit_scale$",
                ),
            ),
        ),
        weights="pytorch_model.bin of MahmoodLab/conch",
        flexible_input=True,
        requires=("timm",),
    )
)
