"""KimiaNet: models, training variants, checkpoints and the feature extractor used by the slide index.

The feature is the global average pool of DenseNet-121's final norm (`norm5`) output *without* the
final ReLU (Riasatian et al. 2021), 1024-d; torchvision's penultimate feature (ReLU, then pool) differs.
Variants (KimiaNet-I ... IV): I trains dense block 4, II blocks 3-4, III blocks 2-4 (each with everything
after it: transitions between trained blocks, `norm5`, head; the transition feeding the first trained
block stays frozen, as when Keras' DenseNet is frozen up to `conv5_block1`); IV and `scratch` train
everything (IV from imported weights, scratch from random ones). Frozen parts keep their BN statistics
(eval mode on every `.train()`).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, get_args

import torch

from histo.errors import HistoError, InputFileError
from histo.io import file_sha256
from histo.norms import names as norm_names
from histo.norms import norm_traits
from histo.norms.placement import stale_placement_hint
from pathology import encoders
from pathology.augment import IMAGENET_MEAN, IMAGENET_STD
from pathology.cbr import CBR_SPECS, cbr
from pathology.cbr import FAMILY as CBR_FAMILY
from pathology.config import Variant
from pathology.densenet import FAMILY as DENSENET_FAMILY
from pathology.densenet import FeatureClassifier, densenet121
from pathology.encoders.extractor import weights_hash
from pathology.encoders.preprocess import Preprocess, crops_per_side

KIND = "kimianet"  # histo.checkpoint kind of a trained (or imported) feature extractor
ARCHS = ("densenet121", *sorted(CBR_SPECS))
VARIANTS = get_args(Variant)
_FIRST_TRAINED_BLOCK = {"I": 4, "II": 3, "III": 2}
NO_MASK = "tiles come without one"  # why this trainer gives region-masked norms (rn_b) no mask


def build_model(
    arch: str = "densenet121", norm: str = "batch", num_classes: int = 30, variant: str = "IV"
) -> FeatureClassifier:
    """A model with `.features(x)` -> pooled feature and `forward(x)` -> logits, frozen per `variant`."""
    if arch not in ARCHS:
        raise HistoError(f"unknown arch {arch!r}; known: {', '.join(ARCHS)}")
    if variant not in VARIANTS:
        raise HistoError(f"unknown variant {variant!r}; known: {', '.join(VARIANTS)}")
    _check_norm(norm, arch)
    model = densenet121(norm, num_classes) if arch == "densenet121" else cbr(arch, norm, num_classes)
    model.freeze(frozen_modules(model, arch, variant))
    return model


def norm_refusal(norm: str, arch: str) -> str | None:
    """Why this trainer cannot serve a registered norm on `arch` (its traits: rn_b, ibn_b), or None."""
    family = DENSENET_FAMILY if arch == "densenet121" else CBR_FAMILY
    return norm_traits(norm).refusal(family, no_mask=NO_MASK)


def _check_norm(norm: str, arch: str) -> None:
    """Refuse an unknown norm, or one whose traits this trainer cannot serve (rn_b, ibn_b), in one line."""
    if norm not in norm_names():
        usable = [n for n in norm_names() if norm_refusal(n, arch) is None]
        raise HistoError(f"unknown norm {norm!r}; known: {', '.join(usable)}")
    reason = norm_refusal(norm, arch)
    if reason is not None:
        raise HistoError(f"norm {norm!r} cannot be used here: {reason}")


def frozen_modules(model: FeatureClassifier, arch: str, variant: str) -> list[str]:
    """Names of the submodules a variant keeps frozen (all of `features` before the first trained block)."""
    if variant in ("IV", "scratch"):
        return []
    if arch != "densenet121":
        raise HistoError(f"variant {variant} freezes dense blocks; {arch} has none (use IV or scratch)")
    first = f"denseblock{_FIRST_TRAINED_BLOCK[variant]}"
    names = []
    for name, _ in model.features.named_children():
        if name == first:
            break
        names.append(f"features.{name}")
    return names


def feature_definition(arch: str, norm: str, variant: str, input_px: int) -> dict[str, Any]:
    """What a feature vector means; an index refuses features made under another definition."""
    pooling = "avgpool(norm5) without ReLU" if arch == "densenet121" else "avgpool(last conv-norm-ReLU)"
    return {
        "arch": arch,
        "norm": norm,
        "variant": variant,
        "pooling": pooling,
        "input_px": int(input_px),
        "mean": list(IMAGENET_MEAN),
        "std": list(IMAGENET_STD),
    }


def model_config(
    arch: str,
    norm: str,
    variant: str,
    classes: list[str],
    input_px: int,
    data_hash: str | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """The JSON-able config stored beside the weights (enough to rebuild the model)."""
    return {
        "arch": arch,
        "norm": norm,
        "variant": variant,
        "classes": list(classes),
        "input_px": int(input_px),
        "feature_definition": feature_definition(arch, norm, variant, input_px),
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
        model = build_model(cfg["arch"], cfg["norm"], len(cfg["classes"]), cfg["variant"])
        model.load_state_dict(ckpt.weights)
    except KeyError as e:
        raise InputFileError(path, f"its config has no {e} entry") from None
    except HistoError as e:
        raise InputFileError(path, str(e)) from None
    except RuntimeError as e:
        problem = f"weights do not match its config: {str(e).splitlines()[0]}"
        raise InputFileError(path, problem + stale_placement_hint(cfg["norm"])) from None
    return model, cfg


def random_init_checkpoint(
    path: str | Path, arch: str = "densenet121", norm: str = "batch", input_px: int = 224, seed: int = 0
) -> Path:
    """Write a valid checkpoint of an untrained network (no head), for baselines and tests."""
    torch.manual_seed(seed)
    model = build_model(arch, norm, num_classes=0, variant="scratch")
    save_model(path, model, model_config(arch, norm, "scratch", [], input_px, untrained=True, seed=seed))
    return Path(path)


class FeatureExtractor(encoders.FeatureExtractor):
    """The extractor of a histo KimiaNet / CBR model: `model.features` on tiles resized to the config's
    input_px with ImageNet mean/std (or a grid of `grid` x `grid` crops per tile, embeddings averaged)."""

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
        pre = Preprocess(int(config["input_px"]), IMAGENET_MEAN, IMAGENET_STD, crops_per_side=n)
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
