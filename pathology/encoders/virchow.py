"""Virchow and Virchow2 (Vorontsov et al. 2024; Zimmermann et al. 2024; paige-ai model cards).

ViT-H/14 (timm vit_huge_patch14_224, layer scale 1e-5, mlp ratio 5.3375 packed SwiGLU, SiLU, no pooling:
the model returns every token); Virchow2 adds 4 register tokens. 224 px at 20x, Resize(224) bicubic,
ImageNet mean/std. The feature is the class token concatenated with the mean of the patch tokens
(Virchow2: tokens 5 onwards, the 4 registers excluded), 2560-d. Released as a timm state dict.
"""

from __future__ import annotations

from pathology.augment import IMAGENET_MEAN, IMAGENET_STD
from pathology.encoders.registry import Encoder, register
from pathology.encoders.timm_models import TIMM_LAYOUT, builder

_ARCH = {
    "timm": "vit_huge_patch14_224",
    "img_size": 224,
    "init_values": 1e-5,
    "num_classes": 0,
    "mlp_ratio": 5.3375,
    "global_pool": "",
    "dynamic_img_size": True,
    "mlp_layer": "swiglu_packed",
    "act_layer": "silu",
}
_COMMON = {
    "family": "virchow",
    "build": builder("cls+mean"),
    "input_px": 224,
    "mpp": 0.5,
    "mean": IMAGENET_MEAN,
    "std": IMAGENET_STD,
    "interpolation": "bicubic",
    "feature_dim": 2560,
    "pooling": "class token concatenated with the mean of the patch tokens (registers excluded), final norm",
    "layouts": (TIMM_LAYOUT,),
    "flexible_input": True,
    "requires": ("timm",),
}

register(
    Encoder(
        name="virchow",
        summary="Virchow, ViT-H/14 DINOv2 on 1.5 M slides (paige-ai/Virchow)",
        arch=_ARCH,
        weights="pytorch_model.bin of paige-ai/Virchow",
        **_COMMON,
    )
)
register(
    Encoder(
        name="virchow2",
        summary="Virchow2, ViT-H/14 with 4 registers, mixed magnifications (paige-ai/Virchow2)",
        arch={**_ARCH, "reg_tokens": 4},
        weights="pytorch_model.bin of paige-ai/Virchow2",
        **_COMMON,
    )
)
