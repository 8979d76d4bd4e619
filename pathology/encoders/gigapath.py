"""Prov-GigaPath's tile encoder (Xu et al., Nature 2024; prov-gigapath/prov-gigapath).

ViT-g (timm vit_giant_patch14_dinov2 with patch 16, 40 blocks, width 1536, 24 heads, mlp ratio 5.33334
packed SwiGLU, layer scale 1e-5) at 224 px; timm's class-token pooling, 1536-d. Tiles of 256 px at 20x:
Resize(256) bicubic + CenterCrop(224) (crop_pct 0.875), ImageNet mean/std. Released as a timm state dict.
"""

from __future__ import annotations

from pathology.augment import IMAGENET_MEAN, IMAGENET_STD
from pathology.encoders.registry import Encoder, register
from pathology.encoders.timm_models import TIMM_LAYOUT, builder

register(
    Encoder(
        name="prov-gigapath",
        family="gigapath",
        summary="Prov-GigaPath tile encoder, ViT-g DINOv2 on 1.3 B tiles (prov-gigapath/prov-gigapath)",
        build=builder("pooled"),
        arch={
            "timm": "vit_giant_patch14_dinov2",
            "img_size": 224,
            "in_chans": 3,
            "patch_size": 16,
            "embed_dim": 1536,
            "depth": 40,
            "num_heads": 24,
            "init_values": 1e-5,
            "mlp_ratio": 5.33334,
            "num_classes": 0,
        },
        input_px=224,
        mpp=0.5,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        interpolation="bicubic",
        crop_pct=224 / 256,
        feature_dim=1536,
        pooling="class token after the final norm",
        layouts=(TIMM_LAYOUT,),
        weights="pytorch_model.bin of prov-gigapath/prov-gigapath",
        requires=("timm",),
    )
)
