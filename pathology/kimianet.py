"""Trainable encoders with a head: models, training variants, checkpoints and the index's feature extractor.

The network is the encoder registry's (`pathology.encoders`: kimianet, densenet121-imagenet, the CBR nets,
resnet50-trunc, and in lane 2 the timm ViT/Swin entries): `build_model` puts a linear head on the entry's
pooled feature (KimiaNet: avgpool of `norm5` without the final ReLU, Riasatian et al. 2021) and freezes it
per training variant (`pathology.variants`). The DenseNet and CBR entries take any registered norm
(`norm`); the others keep their published norms. A checkpoint records the encoder, its architecture, the
feature definition (preprocessing as trained: the store's tiles resized bilinearly to `input_px`, the
entry's mean/std and colour order; pooling; dimension), the variant and the `--init` file's sha256, so
`histo index --model CKPT` makes the feature the network was trained on. Checkpoints from before the
registry record `arch` densenet121 (the kimianet entry) or a CBR name and still load.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from histo.errors import HistoError, InputFileError
from histo.io import file_sha256
from histo.norms import names as norm_names
from histo.norms import norm_traits
from histo.norms.placement import stale_placement_hint
from pathology import encoders
from pathology.cbr import CBR_SPECS
from pathology.densenet import FeatureClassifier
from pathology.encoders import Encoder, encoder_definition, get_encoder
from pathology.encoders.extractor import weights_hash
from pathology.encoders.preprocess import Preprocess, crops_per_side
from pathology.variants import VARIANTS, apply_variant, network_refusal

KIND = "kimianet"  # histo.checkpoint kind of a trained (or untrained baseline) feature extractor
# `arch` names before the registry (checkpoints, `histo train --arch`, `model.arch`) -> registry entries
LEGACY_ARCHS = {"densenet121": "kimianet", **{name: name for name in sorted(CBR_SPECS)}}
NO_MASK = "tiles come without one"  # why this trainer gives region-masked norms (rn_b) no mask


def encoder_of_arch(arch: str) -> str:
    """The registry entry a pre-registry `arch` name means (densenet121: kimianet; a CBR net: itself)."""
    if arch not in LEGACY_ARCHS:
        raise HistoError(f"unknown arch {arch!r}; the arch names were {', '.join(LEGACY_ARCHS)}")
    return LEGACY_ARCHS[arch]


def norm_refusal(norm: str, encoder: str) -> str | None:
    """Why this trainer cannot serve a registered norm on `encoder` (its traits: rn_b, ibn_b), or None."""
    return norm_traits(norm).refusal(get_encoder(LEGACY_ARCHS.get(encoder, encoder)).family, no_mask=NO_MASK)


def _check_norm(norm: str, encoder: str) -> None:
    """Refuse an unknown norm, or one whose traits this trainer cannot serve (rn_b, ibn_b), in one line."""
    if norm not in norm_names():
        usable = [n for n in norm_names() if norm_refusal(n, encoder) is None]
        raise HistoError(f"unknown norm {norm!r}; known: {', '.join(usable)}")
    reason = norm_refusal(norm, encoder)
    if reason is not None:
        raise HistoError(f"norm {norm!r} cannot be used here: {reason}")


def encoder_entry(name: str | Encoder, norm: str | None = None) -> Encoder:
    """The registry entry `name` (a pre-registry arch name, or an Encoder as is) with `norm` in its network
    (None: its own)."""
    enc = get_encoder(LEGACY_ARCHS.get(name, name) if isinstance(name, str) else name)
    if norm is None or norm == enc.arch.get("norm"):
        return enc
    if "norm" not in enc.arch:
        raise HistoError(
            f"encoder {enc.name!r} keeps its published norms; a norm is chosen for the DenseNet and CBR entries"
        )
    _check_norm(norm, enc.name)
    return enc.with_arch(norm=norm)


def build_model(
    encoder: str | Encoder = "kimianet", norm: str | None = None, num_classes: int = 30, variant: str = "IV"
) -> FeatureClassifier:
    """The entry's network with a linear head for `num_classes` (0: none), trainable per `variant`."""
    if variant not in VARIANTS:
        raise HistoError(f"unknown variant {variant!r}; known: {', '.join(VARIANTS)}")
    enc = encoder_entry(encoder, norm)
    reason = network_refusal(variant, enc.family, enc.arch.get("norm"))
    if reason is not None:
        raise HistoError(reason)
    model = FeatureClassifier(enc.network(), enc.feature_dim, num_classes)
    if num_classes > 0:
        nn.init.zeros_(model.classifier.bias)
    return apply_variant(model, variant)


def training_preprocess(enc: Encoder, input_px: int, crops: int = 1) -> Preprocess:
    """The preprocessing `histo train` feeds the entry (pathology.data.TileDataset) and its index repeats."""
    return Preprocess(int(input_px), enc.mean, enc.std, "bilinear", 1.0, enc.colour, crops)


def feature_definition(
    enc: Encoder, variant: str, input_px: int, init_sha256: str | None = None
) -> dict[str, Any]:
    """What a trained checkpoint's feature means; an index refuses features made under another definition."""
    definition = encoder_definition(enc, training_preprocess(enc, input_px), "float32")
    return json.loads(json.dumps({**definition, "variant": variant, "init_sha256": init_sha256}))


def model_config(
    encoder: str,
    norm: str | None,
    variant: str,
    classes: list[str],
    input_px: int,
    data_hash: str | None = None,
    init_sha256: str | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """The JSON-able config stored beside the weights (enough to rebuild the model and its feature)."""
    enc = encoder_entry(encoder, norm)
    return {
        "encoder": enc.name,
        "architecture": json.loads(json.dumps(dict(enc.arch))),
        "arch": enc.histo_arch or enc.name,
        "norm": enc.arch.get("norm"),
        "variant": variant,
        "classes": list(classes),
        "input_px": int(input_px),
        "feature_definition": feature_definition(enc, variant, input_px, init_sha256),
        "data_hash": data_hash,
        **extra,
    }


def save_model(path: str | Path, model: FeatureClassifier, config: Mapping[str, Any]) -> None:
    """Atomically write a `kimianet` checkpoint: the weights and the JSON-able config that rebuilds them."""
    from histo import checkpoint

    checkpoint.save(path, KIND, checkpoint.KINDS[KIND].version, model.state_dict(), config)


def load_model(path: str | Path) -> tuple[FeatureClassifier, dict[str, Any]]:
    """Rebuild the model of a `kimianet` checkpoint (InputFileError naming the file when it is not one)."""
    from histo import checkpoint

    ckpt = checkpoint.load(path, KIND)
    cfg = ckpt.config
    try:
        model = build_model(
            cfg.get("encoder") or cfg["arch"], cfg["norm"], len(cfg["classes"]), cfg["variant"]
        )
        model.load_state_dict(ckpt.weights)
    except KeyError as e:
        raise InputFileError(path, f"its config has no {e} entry") from None
    except HistoError as e:
        raise InputFileError(path, str(e)) from None
    except RuntimeError as e:
        problem = f"weights do not match its config: {str(e).splitlines()[0]}"
        raise InputFileError(path, problem + stale_placement_hint(cfg["norm"] or "")) from None
    return model, cfg


def random_init_checkpoint(
    path: str | Path, arch: str = "kimianet", norm: str | None = None, input_px: int = 224, seed: int = 0
) -> Path:
    """Write a valid checkpoint of an untrained network (no head), for baselines and tests."""
    torch.manual_seed(seed)
    model = build_model(arch, norm, num_classes=0, variant="scratch")
    save_model(path, model, model_config(arch, norm, "scratch", [], input_px, untrained=True, seed=seed))
    return Path(path)


class FeatureExtractor(encoders.FeatureExtractor):
    """The extractor of a histo checkpoint: `model.features` on tiles prepared as in training (resized to
    the config's input_px, the entry's mean/std; or a grid of `grid` x `grid` crops, embeddings averaged)."""

    def __init__(
        self,
        model: FeatureClassifier,
        config: Mapping[str, Any],
        device: str | torch.device = "auto",
        model_hash: str | None = None,
        tile_rule: str = "resize",
        grid: int | None = None,
        precision: str = "float32",
    ) -> None:
        # A histo-trained network has no native µm/px: it saw its store's tiles resized, so a grid needs `grid`.
        n = crops_per_side(tile_rule, grid, field_px=None, mpp=None, tiling=None)
        enc = encoder_entry(config.get("encoder") or config["arch"], config.get("norm"))
        pre = training_preprocess(enc, int(config["input_px"]), n)
        definition = dict(config["feature_definition"])  # as written at training time (histo 0.1 indexes)
        if n > 1:
            definition["tile_rule"] = pre.definition()["tile_rule"]
        if precision != "float32":
            definition["precision"] = precision
        self.config = dict(config)
        self._model = model
        super().__init__(
            model.features,
            pre,
            definition,
            model.feature_dim,
            device,
            model_hash or weights_hash(model),
            precision,
        )
        self._model.to(self.device).eval()

    @property
    def model(self) -> FeatureClassifier:
        """The whole network (head included); `.network` is the part that makes features."""
        return self._model

    @classmethod
    def from_checkpoint(
        cls, path: str | Path, device: str | torch.device = "auto", **rule: Any
    ) -> FeatureExtractor:
        """Load a histo checkpoint; `.model_hash` is the sha256 of the file. `rule`: tile_rule, grid, precision."""
        model, cfg = load_model(path)
        return cls(model, cfg, device, model_hash=file_sha256(path), **rule)
