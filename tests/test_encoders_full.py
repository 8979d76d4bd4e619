"""Lane 2 (`make test-full`): every encoder against its authors' reference implementation.

For each entry a weight file is written the way its authors distribute it (a timm / torchvision state
dict as `pytorch_model.bin`, transformers' `save_pretrained` / `model.safetensors`, CTransPath's
{'model': ...}, CONCH's whole CoCa state dict), from a randomly initialised reference model built with the
model card's arguments; histo loads it and its features must equal the reference forward, preprocessing
included (torchvision transforms on the same tiles), to 1e-5. ViTs are compared at a reduced depth (2
blocks; the full width, patch size, tokens and heads) to keep CPU time low; the full-size architecture
is built once on the meta device to check the complete key layout and the published parameter count.
timm, torchvision, transformers, open_clip and timm_ctp are imported inside the tests: lane 1 collects
this file and deselects it by its marker.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from pathology import encoders

pytestmark = pytest.mark.full
DEPTH = 2


def tiles(px: int, n: int = 2, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, px, px, 3), dtype=np.uint8)


IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
# The model cards' eval transforms, written out here: (Resize to, CenterCrop to, interpolation, mean, std).
CARD_TRANSFORMS = {
    "uni": (224, 224, "bilinear", *IMAGENET),
    "uni2-h": (224, 224, "bilinear", *IMAGENET),
    "virchow": (224, None, "bicubic", *IMAGENET),
    "virchow2": (224, None, "bicubic", *IMAGENET),
    "h-optimus-0": (224, None, "bilinear", (0.707223, 0.578729, 0.703617), (0.211883, 0.230117, 0.177517)),
    "h-optimus-1": (224, None, "bilinear", (0.707223, 0.578729, 0.703617), (0.211883, 0.230117, 0.177517)),
    "prov-gigapath": (256, 224, "bicubic", *IMAGENET),
    "phikon": (224, None, "bilinear", *IMAGENET),
    "phikon-v2": (224, 224, "bilinear", *IMAGENET),
    "ctranspath": (224, None, "bilinear", *IMAGENET),
    "conch-v1": (
        448,
        448,
        "bicubic",
        (0.48145466, 0.4578275, 0.40821073),
        (0.26862954, 0.26130258, 0.27577711),
    ),
    "resnet50-trunc": (256, None, "bilinear", *IMAGENET),  # CLAM: 256 px patches at 20x
    "kimianet": (1000, None, "bilinear", *IMAGENET),  # the official code: 1000 px tiles at 20x
}


def authors_transform(x: np.ndarray, name: str, size: int | None = None) -> torch.Tensor:
    """The card's torchvision Resize (antialiased) [+ CenterCrop] + Normalize on tensors; bicubic resizes are
    clamped to [0, 1] as PIL's uint8 resampling is. `size` replaces the card's size (CNNs at a small input)."""
    from torchvision import transforms as T

    resize, crop, interpolation, mean, std = CARD_TRANSFORMS[name]
    resize, crop = (size, None) if size else (resize, crop)
    mode = {"bilinear": T.InterpolationMode.BILINEAR, "bicubic": T.InterpolationMode.BICUBIC}[interpolation]
    t = T.Resize(resize, interpolation=mode, antialias=True)(
        torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255
    )
    if interpolation == "bicubic":
        t = t.clamp(0, 1)
    return T.Normalize(mean, std)(T.CenterCrop(crop)(t) if crop else t)


def assert_same_features(
    enc: encoders.Encoder, path: Path, forward, tile_px: int
) -> encoders.FeatureExtractor:
    """histo's features from `path` equal `forward(the card's transform of the tiles)` to 1e-5."""
    fx = encoders.open_extractor(enc, path, "cpu")
    x = tiles(tile_px)
    with torch.no_grad():
        expected = forward(authors_transform(x, enc.name))
    got = torch.from_numpy(fx.extract(x))
    assert got.shape == (len(x), enc.feature_dim)
    torch.testing.assert_close(got, expected.float(), rtol=1e-5, atol=1e-5)
    return fx


def shapes(state: dict, prefix: str = "") -> dict:
    return {k.removeprefix(prefix): tuple(v.shape) for k, v in state.items()}


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ---- timm state dicts (UNI, UNI2-h, Virchow, Virchow2, H-optimus, Prov-GigaPath) --------------------
def _card(name: str) -> tuple[str, dict]:
    """The model card's timm.create_model arguments (written from the cards, not from histo's entries)."""
    import timm

    swiglu = {"mlp_layer": timm.layers.SwiGLUPacked, "act_layer": nn.SiLU}
    virchow = {"img_size": 224, "init_values": 1e-5, "num_classes": 0, "mlp_ratio": 5.3375, "global_pool": "",
               "dynamic_img_size": True, **swiglu}  # fmt: skip
    hoptimus = {
        "num_classes": 0,
        "img_size": 224,
        "global_pool": "token",
        "init_values": 1e-5,
        "dynamic_img_size": False,
    }
    return {
        "uni": ("vit_large_patch16_224", {"img_size": 224, "patch_size": 16, "init_values": 1e-5, "num_classes": 0,
                                          "dynamic_img_size": True}),
        "uni2-h": ("vit_giant_patch14_224", {"img_size": 224, "patch_size": 14, "depth": 24, "num_heads": 24,
                                             "init_values": 1e-5, "embed_dim": 1536, "mlp_ratio": 2.66667 * 2,
                                             "num_classes": 0, "no_embed_class": True, "reg_tokens": 8,
                                             "dynamic_img_size": True, **swiglu}),
        "virchow": ("vit_huge_patch14_224", virchow),
        "virchow2": ("vit_huge_patch14_224", {**virchow, "reg_tokens": 4}),
        "h-optimus-0": ("vit_giant_patch14_reg4_dinov2", hoptimus),
        "h-optimus-1": ("vit_giant_patch14_reg4_dinov2", hoptimus),
        "prov-gigapath": ("vit_giant_patch14_dinov2", {"img_size": 224, "in_chans": 3, "patch_size": 16,
                                                       "embed_dim": 1536, "depth": 40, "num_heads": 24,
                                                       "init_values": 1e-5, "mlp_ratio": 5.33334, "num_classes": 0}),
    }[name]  # fmt: skip


def _recipe(name: str, model: nn.Module):
    """The authors' feature: model(x), or Virchow's class token + mean of the patch tokens."""
    if name == "virchow":
        return lambda x: (lambda out: torch.cat([out[:, 0], out[:, 1:].mean(1)], -1))(model(x))
    if name == "virchow2":
        return lambda x: (lambda out: torch.cat([out[:, 0], out[:, 5:].mean(1)], -1))(model(x))
    return model


# Published sizes (model cards / papers), to 0.5 %.
PUBLISHED_PARAMS = {"uni": 303e6, "uni2-h": 681e6, "virchow": 631e6, "virchow2": 632e6, "h-optimus-0": 1.1347e9,
                    "h-optimus-1": 1.1347e9, "prov-gigapath": 1.135e9}  # fmt: skip
TIMM_ENTRIES = list(PUBLISHED_PARAMS)


@pytest.mark.parametrize("name", TIMM_ENTRIES)
def test_timm_entry_full_layout_and_size(name):
    import timm

    model_name, kwargs = _card(name)
    with torch.device("meta"):
        ref = timm.create_model(model_name, pretrained=False, **kwargs)
        ours = encoders.get_encoder(name).network()
    assert shapes(ours.state_dict(), "trunk.") == shapes(ref.state_dict())
    assert abs(n_params(ref) - PUBLISHED_PARAMS[name]) / PUBLISHED_PARAMS[name] < 0.005


@pytest.mark.parametrize("name", TIMM_ENTRIES)
def test_timm_entry_features_equal_the_model_card_recipe(name, tmp_path):
    import timm

    model_name, kwargs = _card(name)
    torch.manual_seed(0)
    ref = timm.create_model(model_name, pretrained=False, **{**kwargs, "depth": DEPTH}).eval()
    torch.save(ref.state_dict(), tmp_path / "pytorch_model.bin")
    enc = encoders.get_encoder(name).with_arch(depth=DEPTH)
    fx = assert_same_features(enc, tmp_path / "pytorch_model.bin", _recipe(name, ref), tile_px=256)
    assert fx.weights["layout"] == "timm" and fx.weights["ignored"]["tensors"] == 0


# ---- transformers layouts (Phikon, Phikon-v2) -----------------------------------------------------
def _phikon(layers: int):
    from transformers import ViTConfig, ViTModel

    config = ViTConfig(hidden_size=768, num_hidden_layers=layers, num_attention_heads=12, intermediate_size=3072,
                       image_size=224, patch_size=16, qkv_bias=True, layer_norm_eps=1e-12)  # fmt: skip
    return ViTModel(config)  # with its pooler, as owkin/phikon is saved


def _phikon_v2(layers: int):
    from transformers import Dinov2Config, Dinov2Model

    config = Dinov2Config(hidden_size=1024, num_hidden_layers=layers, num_attention_heads=16, mlp_ratio=4,
                          image_size=224, patch_size=16, layerscale_value=1e-5, use_swiglu_ffn=False)  # fmt: skip
    return Dinov2Model(config)


HF = {"phikon": (_phikon, 12, 86e6), "phikon-v2": (_phikon_v2, 24, 304e6)}


def hub_state(model: nn.Module) -> dict:
    """The state dict in the released (hub) key layout, as save_pretrained writes it on any version."""
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:  # transformers 4: module names are the hub's
        return model.state_dict()
    return revert_weight_conversion(model, model.state_dict())


@pytest.mark.parametrize("name", list(HF))
def test_transformers_layout_maps_every_key_of_the_full_model(name):
    make, layers, published = HF[name]
    enc = encoders.get_encoder(name)
    with torch.device("meta"):
        ref = make(layers)
        ours = enc.network()
    layout = enc.layouts[0]
    kept = {k: v for k, v in hub_state(ref).items() if not layout.is_ignored(k)}
    assert shapes(layout.convert(kept)) == shapes(ours.state_dict())
    assert abs(n_params(ours) - published) / published < 0.01


@pytest.mark.parametrize("name", list(HF))
@pytest.mark.parametrize("saved", ["torch.save", "save_pretrained"])
def test_transformers_file_features_equal_last_hidden_state_cls(name, saved, tmp_path):
    make, _, _ = HF[name]
    torch.manual_seed(0)
    ref = make(DEPTH).eval()
    if saved == "torch.save":
        path = tmp_path / "pytorch_model.bin"
        torch.save(hub_state(ref), path)
    else:
        ref.save_pretrained(tmp_path, safe_serialization=True)
        path = tmp_path / "model.safetensors"
    enc = encoders.get_encoder(name).with_arch(depth=DEPTH)
    fx = assert_same_features(enc, path, lambda x: ref(pixel_values=x).last_hidden_state[:, 0], tile_px=256)
    assert fx.weights["layout"].startswith("transformers")


# ---- CTransPath (the authors' timm 0.5.4 fork) ----------------------------------------------------
class AuthorsConvStem(nn.Module):
    """The stem as the TransPath repository defines it for timm 0.5.4 (token output, B x L x C)."""

    def __init__(self, img_size=224, patch_size=4, in_chans=3, embed_dim=768, norm_layer=None, flatten=True):
        super().__init__()
        self.img_size, self.patch_size = (img_size, img_size), (patch_size, patch_size)
        self.grid_size = (img_size // patch_size, img_size // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        layers, c_in, c_out = [], 3, embed_dim // 8
        for _ in range(2):
            layers += [
                nn.Conv2d(c_in, c_out, 3, 2, 1, bias=False),
                nn.BatchNorm2d(c_out),
                nn.ReLU(inplace=True),
            ]
            c_in, c_out = c_out, c_out * 2
        layers.append(nn.Conv2d(c_in, embed_dim, 1))
        self.proj = nn.Sequential(*layers)
        self.norm = norm_layer(embed_dim) if norm_layer else nn.Identity()

    def forward(self, x):
        return self.norm(self.proj(x).flatten(2).transpose(1, 2))


def _ctranspath_reference() -> nn.Module:
    from timm_ctp import create_model

    torch.manual_seed(0)
    model = create_model(
        "swin_tiny_patch4_window7_224", embed_layer=AuthorsConvStem, pretrained=False, img_size=224
    )
    model.head = nn.Identity()
    with torch.no_grad():  # non-trivial BN statistics in the stem
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return model.eval()


def test_ctranspath_release_layout_loads_and_equals_the_authors_model(tmp_path):
    ref = _ctranspath_reference()
    torch.save({"model": ref.state_dict()}, tmp_path / "ctranspath.pth")
    enc = encoders.get_encoder("ctranspath")
    fx = assert_same_features(enc, tmp_path / "ctranspath.pth", ref, tile_px=256)
    assert fx.weights["layout"] == "CTransPath (timm 0.5.4)"
    buffers = sum(1 for k in ref.state_dict() if k.endswith(("attn_mask", "relative_position_index")))
    assert fx.weights["ignored"]["tensors"] == buffers > 0
    assert abs(n_params(fx.network) - 27.5e6) / 27.5e6 < 0.02  # CTransPath: 27.5 M parameters


# ---- CONCH (open_clip's attentional pooler over a timm ViT) -----------------------------------------
def _conch_reference(depth: int) -> tuple[nn.Module, dict]:
    """CONCH's vision tower as its repository builds it, and a whole CoCa-like state dict."""
    from open_clip.transformer import AttentionalPooler, LayerNorm
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    visual = nn.Module()
    visual.trunk = VisionTransformer(embed_dim=768, depth=depth, num_heads=12, mlp_ratio=4, img_size=448,
                                     patch_size=16, num_classes=0, dynamic_img_size=True)  # fmt: skip
    visual.attn_pool_contrast = AttentionalPooler(512, 768, n_head=8, n_queries=1, norm_layer=LayerNorm)
    visual.ln_contrast = nn.LayerNorm(512)
    visual.proj_contrast = nn.Parameter(torch.randn(512, 512) * 768**-0.5)
    visual.attn_pool_caption = AttentionalPooler(768, 768, n_head=8, n_queries=256, norm_layer=LayerNorm)
    visual.ln_caption = nn.LayerNorm(768)
    state = {f"visual.{k}": v for k, v in visual.state_dict().items()}
    state |= {"text.positional_embedding": torch.randn(128, 768), "text.ln_final.weight": torch.ones(768),
              "text_decoder.ln_final.weight": torch.ones(768), "logit_scale": torch.tensor(2.659)}  # fmt: skip
    return visual.eval(), state


def test_conch_image_tower_layout_and_features(tmp_path):
    visual, state = _conch_reference(DEPTH)
    torch.save(state, tmp_path / "pytorch_model.bin")
    enc = encoders.get_encoder("conch-v1")
    enc = enc.with_arch(trunk={**enc.arch["trunk"], "depth": DEPTH})

    def forward(x):
        return visual.ln_contrast(visual.attn_pool_contrast(visual.trunk.forward_features(x))[:, 0])

    fx = assert_same_features(enc, tmp_path / "pytorch_model.bin", forward, tile_px=512)
    w = fx.weights
    assert w["layout"] == "CONCH CoCa" and w["ignored"]["tensors"] == len(state) - w["tensors_loaded"]
    assert len(w["ignored"]["patterns"]) == 6  # caption pooler and LN, projection, text, decoder, logit scale
    with torch.device("meta"):
        full_ref, _ = _conch_reference(12)
        ours = encoders.get_encoder("conch-v1").network()
    kept = {k: tuple(v.shape) for k, v in full_ref.state_dict().items() if k.split(".")[0] in
            ("trunk", "attn_pool_contrast", "ln_contrast")}  # fmt: skip
    assert kept == shapes(ours.state_dict())


# ---- the CNNs against torchvision (and timm for CLAM's ResNet, as TRIDENT builds it) ---------------
def test_densenet_entries_equal_torchvision_features_and_penultimate(tmp_path):
    import torch.nn.functional as F
    from torchvision.models import densenet121

    torch.manual_seed(0)
    ref = densenet121().eval()
    with torch.no_grad():
        for m in ref.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
    torch.save(ref.state_dict(), tmp_path / "densenet121.pth")
    x = tiles(80)
    t = authors_transform(x, "kimianet", size=64)
    with torch.no_grad():
        feats = ref.features(t)
        penultimate = torch.flatten(F.adaptive_avg_pool2d(F.relu(feats), 1), 1)  # torchvision's forward
    for name, expected in (("kimianet", feats.mean(dim=(2, 3))), ("densenet121-imagenet", penultimate)):
        fx = encoders.open_extractor(name, tmp_path / "densenet121.pth", "cpu", input_px=64)
        torch.testing.assert_close(torch.from_numpy(fx.extract(x)), expected, rtol=1e-5, atol=1e-5)


def test_resnet50_trunc_equals_torchvision_and_timm_through_layer3(tmp_path):
    import timm
    from torchvision.models import resnet50

    torch.manual_seed(0)
    ref = resnet50().eval()
    torch.save(ref.state_dict(), tmp_path / "resnet50.pth")
    enc = encoders.get_encoder("resnet50-trunc")
    cut = nn.Sequential(ref.conv1, ref.bn1, ref.relu, ref.maxpool, ref.layer1, ref.layer2, ref.layer3)
    fx = assert_same_features(enc, tmp_path / "resnet50.pth", lambda x: cut(x).mean(dim=(2, 3)), tile_px=300)
    trident = timm.create_model("resnet50", pretrained=False, features_only=True, out_indices=[3]).eval()
    trident.load_state_dict(
        {k: v for k, v in ref.state_dict().items() if not k.startswith(("layer4.", "fc."))}
    )
    x = torch.randn(2, 3, 256, 256)
    with torch.no_grad():
        torch.testing.assert_close(fx.network(x), trident(x)[0].mean(dim=(2, 3)), rtol=1e-5, atol=1e-5)
    assert shapes(fx.network.state_dict()) == {
        k: s for k, s in shapes(ref.state_dict()).items() if not k.startswith(("layer4.", "fc."))}  # fmt: skip
