"""UNI and UNI2-h (Chen et al., Nature Medicine 2024; MahmoodLab model cards and TRIDENT's definitions).

UNI: ViT-L/16 (timm vit_large_patch16_224, layer scale 1e-5), 224 px at 20x, ImageNet mean/std,
Resize(224) + CenterCrop(224) (bilinear); the feature is the class token after the final norm, 1024-d.
UNI2-h: ViT-H/14 with SwiGLU (timm vit_giant_patch14_224 overridden to depth 24, 24 heads, width 1536,
mlp ratio 2.66667 x 2 packed, SiLU, 8 register tokens, no position embedding for prefix tokens), same
preprocessing; class token, 1536-d. Both are released as a timm state dict (`pytorch_model.bin`).
"""

from __future__ import annotations

from pathology.augment import IMAGENET_MEAN, IMAGENET_STD
from pathology.encoders.registry import Encoder, register
from pathology.encoders.timm_models import TIMM_LAYOUT, builder

_COMMON = {
    "family": "uni",
    "build": builder("pooled"),
    "input_px": 224,
    "mpp": 0.5,
    "mean": IMAGENET_MEAN,
    "std": IMAGENET_STD,
    "pooling": "class token after the final norm",
    "layouts": (TIMM_LAYOUT,),
    "flexible_input": True,
    "requires": ("timm",),
}

register(
    Encoder(
        name="uni",
        summary="UNI, ViT-L/16 DINOv2 on Mass-100K (MahmoodLab/UNI)",
        arch={
            "timm": "vit_large_patch16_224",
            "img_size": 224,
            "patch_size": 16,
            "init_values": 1e-5,
            "num_classes": 0,
            "dynamic_img_size": True,
        },
        feature_dim=1024,
        weights="pytorch_model.bin of MahmoodLab/UNI",
        **_COMMON,
    )
)
register(
    Encoder(
        name="uni2-h",
        summary="UNI2-h, ViT-H/14 with 8 registers (MahmoodLab/UNI2-h)",
        arch={
            "timm": "vit_giant_patch14_224",
            "img_size": 224,
            "patch_size": 14,
            "depth": 24,
            "num_heads": 24,
            "init_values": 1e-5,
            "embed_dim": 1536,
            "mlp_ratio": 2.66667 * 2,
            "num_classes": 0,
            "no_embed_class": True,
            "mlp_layer": "swiglu_packed",
            "act_layer": "silu",
            "reg_tokens": 8,
            "dynamic_img_size": True,
        },
        feature_dim=1536,
        weights="pytorch_model.bin of MahmoodLab/UNI2-h",
        **_COMMON,
    )
)
