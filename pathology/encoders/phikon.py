"""Phikon and Phikon-v2 (Owkin; Filiot et al. 2023, 2024), released in the transformers layout.

Phikon: iBOT ViT-B/16, a transformers `ViTModel` (LayerNorm eps 1e-12, the ViTConfig default);
Phikon-v2: DINOv2 ViT-L/16, a transformers `Dinov2Model` (layer scale, eps 1e-6, no registers). Both take
224 px at 20x with ImageNet mean/std; the feature is `last_hidden_state[:, 0]`, the class token after the
final norm (768-d, 1024-d). histo builds the same networks with timm (vit_base/large_patch16_224) and maps
the keys: query/key/value are concatenated into timm's `qkv`; `pooler.*` (Phikon, unused by the class-token
feature) and `embeddings.mask_token` (Phikon-v2, used only in masked pre-training) are not loaded.
"""

from __future__ import annotations

from pathology.augment import IMAGENET_MEAN, IMAGENET_STD
from pathology.encoders.registry import Encoder, register
from pathology.encoders.timm_models import TIMM_LAYOUT, builder, renamed
from pathology.encoders.weights import Layout

_QKV = r"^encoder\.layer\.(\d+)\.attention\.attention\.(query|key|value)\.(weight|bias)$"
_EMBEDDINGS = [
    (r"^embeddings\.cls_token$", "cls_token"),
    (r"^embeddings\.position_embeddings$", "pos_embed"),
    (r"^embeddings\.patch_embeddings\.projection\.", "patch_embed.proj."),
    (r"^encoder\.layer\.(\d+)\.attention\.output\.dense\.", r"blocks.\1.attn.proj."),
    (r"^layernorm\.", "norm."),
]
VIT_RULES = [
    *_EMBEDDINGS,
    (r"^encoder\.layer\.(\d+)\.layernorm_before\.", r"blocks.\1.norm1."),
    (r"^encoder\.layer\.(\d+)\.layernorm_after\.", r"blocks.\1.norm2."),
    (r"^encoder\.layer\.(\d+)\.intermediate\.dense\.", r"blocks.\1.mlp.fc1."),
    (r"^encoder\.layer\.(\d+)\.output\.dense\.", r"blocks.\1.mlp.fc2."),
]
DINOV2_RULES = [
    *_EMBEDDINGS,
    (r"^encoder\.layer\.(\d+)\.norm([12])\.", r"blocks.\1.norm\2."),
    (r"^encoder\.layer\.(\d+)\.layer_scale([12])\.lambda1$", r"blocks.\1.ls\2.gamma"),
    (r"^encoder\.layer\.(\d+)\.mlp\.fc([12])\.", r"blocks.\1.mlp.fc\2."),
]
_COMMON = {
    "family": "phikon",
    "build": builder("pooled"),
    "input_px": 224,
    "mpp": 0.5,
    "mean": IMAGENET_MEAN,
    "std": IMAGENET_STD,
    "pooling": "class token after the final norm (last_hidden_state[:, 0])",
    "requires": ("timm",),
}

register(
    Encoder(
        name="phikon",
        summary="Phikon, iBOT ViT-B/16 on 40 M TCGA tiles (owkin/phikon)",
        arch={"timm": "vit_base_patch16_224", "img_size": 224, "num_classes": 0, "norm_eps": 1e-12},
        feature_dim=768,
        layouts=(
            Layout(
                "transformers ViTModel",
                "encoder.layer.0.layernorm_before.",
                renamed(VIT_RULES, _QKV),
                ignored=(r"pooler\.",),
            ),
            TIMM_LAYOUT,
        ),
        weights="pytorch_model.bin or model.safetensors of owkin/phikon",
        **_COMMON,
    )
)
register(
    Encoder(
        name="phikon-v2",
        summary="Phikon-v2, DINOv2 ViT-L/16 on 460 M public tiles (owkin/phikon-v2)",
        arch={"timm": "vit_large_patch16_224", "img_size": 224, "num_classes": 0, "init_values": 1e-5},
        feature_dim=1024,
        layouts=(
            Layout(
                "transformers Dinov2Model",
                "encoder.layer.0.norm1.",
                renamed(DINOV2_RULES, _QKV),
                ignored=(r"embeddings\.mask_token$",),
            ),
            TIMM_LAYOUT,
        ),
        weights="model.safetensors of owkin/phikon-v2",
        **_COMMON,
    )
)
