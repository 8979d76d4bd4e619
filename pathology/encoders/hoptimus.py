"""H-optimus-0 and H-optimus-1 (Bioptimus; model cards and bioptimus/releases).

ViT-g/14 with 4 registers (timm vit_giant_patch14_reg4_dinov2: 40 blocks, 24 heads, width 1536, packed
SwiGLU, layer scale 1e-5) at img_size 224 without dynamic size, class-token pooling, 1536-d. 224 px at
0.5 µm/px, Resize(224), mean (0.707223, 0.578729, 0.703617), std (0.211883, 0.230117, 0.177517).
"""

from __future__ import annotations

from pathology.encoders.registry import Encoder, register
from pathology.encoders.timm_models import TIMM_LAYOUT, builder

_COMMON = {
    "family": "hoptimus",
    "build": builder("pooled"),
    "arch": {
        "timm": "vit_giant_patch14_reg4_dinov2",
        "img_size": 224,
        "num_classes": 0,
        "global_pool": "token",
        "init_values": 1e-5,
        "dynamic_img_size": False,
    },
    "input_px": 224,
    "mpp": 0.5,
    "mean": (0.707223, 0.578729, 0.703617),
    "std": (0.211883, 0.230117, 0.177517),
    "feature_dim": 1536,
    "pooling": "class token after the final norm",
    "layouts": (TIMM_LAYOUT,),
    "requires": ("timm",),
}

register(
    Encoder(
        name="h-optimus-0",
        summary="H-optimus-0, ViT-g/14 on 500k slides (bioptimus/H-optimus-0)",
        weights="pytorch_model.bin of bioptimus/H-optimus-0",
        **_COMMON,
    )
)
register(
    Encoder(
        name="h-optimus-1",
        summary="H-optimus-1, ViT-g/14 on 1M slides (bioptimus/H-optimus-1)",
        weights="pytorch_model.bin of bioptimus/H-optimus-1",
        **_COMMON,
    )
)
