"""Training variants: which parameters of an encoder + head `histo train` trains, and how its norms run.

  IV, scratch  every parameter (IV from `--init` weights, scratch from random ones); norms in train mode.
  I, II, III   DenseNet only (KimiaNet-I ... III, Riasatian et al. 2021): dense block 4 / blocks 3-4 /
               blocks 2-4, with everything after the first trained block (transitions between trained
               blocks, norm5, head); the transition feeding the first trained block stays frozen, as when
               Keras' DenseNet is frozen up to conv5_block1. Frozen parts stay in eval mode (their BN
               statistics are kept). Other encoders have no dense blocks: the variant is refused.
  norm_only    the scale and shift of every normalization layer, and the head ("Training BatchNorm and
               only BatchNorm", Frankle et al. 2021). Norms stay in train mode, as in the paper: BatchNorm
               normalises with batch statistics and its running statistics keep updating.
  norm_shift   the shift (bias) of every normalization layer, and the head (MobileTL, Chiang et al. 2023:
               "only train shifts, and freeze scales and global statistics"). Every normalization layer is
               kept in eval mode: BatchNorm normalises with its frozen running statistics, which never move.
Normalization layers and their scale/shift parameters: `histo.norms.norm_parameters` (one definition).
"""

from __future__ import annotations

from typing import Any, get_args

from histo.norms import norm_layers, norm_parameters, norm_traits
from pathology.config import Variant
from pathology.densenet import FeatureClassifier

VARIANTS = get_args(Variant)
BLOCK_VARIANTS = {"I": 4, "II": 3, "III": 2}  # variant -> first trained dense block
NORM_VARIANTS = {"norm_only": ("scale", "shift"), "norm_shift": ("shift",)}
NEEDS_NO_INIT = ("scratch", "norm_only")  # norm_only from random weights: Frankle's random features


def network_refusal(variant: str, family: str, norm: str | None) -> str | None:
    """Why `variant` cannot train an encoder of `family` whose network has `norm` (None: fixed), or None."""
    if variant in BLOCK_VARIANTS and family != "densenet":
        return (
            f"variant {variant} freezes dense blocks; a {family} encoder has none "
            "(use IV, norm_only or norm_shift)"
        )
    if variant in NORM_VARIANTS and norm is not None and not norm_traits(norm).affine:
        return f"variant {variant} trains normalization scales/shifts and norm {norm!r} has none"
    return None


def init_refusal(variant: str, has_init: bool) -> str | None:
    """Why `variant` cannot start from (or without) `--init` weights, or None."""
    if variant == "scratch" and has_init:
        return "--variant scratch trains from random weights; drop --init or use --variant IV"
    if variant not in NEEDS_NO_INIT and not has_init:
        return (
            f"variant {variant} fine-tunes pretrained weights: give --init PATH "
            "(the encoder's weight file, see `histo encoders`) or use --variant scratch"
        )
    return None


def frozen_blocks(model: FeatureClassifier, variant: str) -> list[str]:
    """The submodules KimiaNet-I/II/III keep frozen: all of `features` before the first trained block."""
    first = f"denseblock{BLOCK_VARIANTS[variant]}"
    names = []
    for name, _ in model.features.named_children():
        if name == first:
            break
        names.append(f"features.{name}")
    return names


def _head(model: FeatureClassifier) -> set[str]:
    return {f"classifier.{n}" for n, _ in model.classifier.named_parameters()}


def trainable_parameters(model: FeatureClassifier, variant: str) -> set[str]:
    """Names of the parameters `variant` trains (the rule in the module docstring)."""
    everything = {n for n, _ in model.named_parameters()}
    if variant in BLOCK_VARIANTS:
        frozen = tuple(f"{m}." for m in frozen_blocks(model, variant))
        return {n for n in everything if not n.startswith(frozen)}
    if variant in NORM_VARIANTS:
        roles = NORM_VARIANTS[variant]
        norms = {f"features.{n}" for n, r in norm_parameters(model.features).items() if r in roles}
        return norms | _head(model)
    return everything


def eval_modules(model: FeatureClassifier, variant: str) -> list[str]:
    """Submodules kept in eval mode while training: frozen blocks, or (norm_shift) every norm layer."""
    if variant in BLOCK_VARIANTS:
        return frozen_blocks(model, variant)
    if variant == "norm_shift":
        return [f"features.{n}" if n else "features" for n in norm_layers(model.features)]
    return []


def apply_variant(model: FeatureClassifier, variant: str) -> FeatureClassifier:
    """Set which parameters train and which submodules stay in eval mode, per `variant`."""
    model.set_trainable(trainable_parameters(model, variant), eval_modules(model, variant))
    return model


def parameter_counts(model: FeatureClassifier) -> dict[str, Any]:
    """Total, trainable (encoder / head) and frozen parameter counts of a model under its variant."""
    head = _head(model)
    counts = {"total": 0, "trainable": 0, "trainable_encoder": 0, "trainable_head": 0}
    for name, p in model.named_parameters():
        counts["total"] += p.numel()
        if p.requires_grad:
            counts["trainable"] += p.numel()
            counts["trainable_head" if name in head else "trainable_encoder"] += p.numel()
    counts["frozen"] = counts["total"] - counts["trainable"]
    counts["trainable_percent"] = round(100.0 * counts["trainable"] / max(counts["total"], 1), 3)
    return counts


def counts_line(variant: str, counts: dict[str, Any]) -> str:
    """One line for the log: what the variant trains."""
    return (
        f"variant {variant}: trains {counts['trainable']:,} of {counts['total']:,} parameters "
        f"({counts['trainable_percent']:.2f} %: encoder {counts['trainable_encoder']:,}, "
        f"head {counts['trainable_head']:,})"
    )
