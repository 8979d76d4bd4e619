"""Typed config of `histo segment train|predict|eval` (SegmentConfig); defaults in histo/configs/segment.yaml.

The model holds the types and the valid ranges; the values come from the YAML (see `histo.config`).
A consumer reads `cfg.model.norm`, `cfg.data.roi`, `cfg.infer.threshold`, `cfg.eval.hd95`, `cfg.run.device`.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from histo.config import (
    AsTuple,
    Count,
    Fraction,
    KeyedError,
    NonNegative,
    NormName,
    OpenFraction,
    Overlap,
    PositiveInt,
    Roi,
    Section,
    Seed,
    StageConfig,
)
from histo.training_config import LoopOptions, LoopRun
from segmentation.label_schemes import SCHEMES

EvenChannels = Annotated[int, Field(ge=2, multiple_of=2)]  # reversible blocks split channels in halves
# A task of segmentation.label_schemes.SCHEMES, or "auto": detected from the case IDs and file names.
Labels = Literal[("auto", *SCHEMES)]


def roi_divisor(levels: int) -> int:
    """What every side of a U-Net input must be divisible by: 2 ** (levels - 1) (one halving per level)."""
    return 2 ** (levels - 1)


def roi_problem(roi: tuple[int, ...], levels: int) -> str | None:
    """Why a window does not fit a U-Net of `levels` levels (None when it does)."""
    divisor = roi_divisor(levels)
    if any(side % divisor for side in roi):
        return f"{list(roi)} must be divisible by {divisor} on every side for a {levels}-level U-Net"
    return None


class UNetConfig(Section):
    channels: Annotated[tuple[EvenChannels, ...], AsTuple, Field(min_length=1)]
    blocks_per_level: PositiveInt
    expansion: PositiveInt
    norm: NormName
    se_ratio: Fraction
    dropout: Annotated[float, Field(ge=0, lt=1)]
    reversible: bool
    head: Literal["regions", "labels"]


class CropAugment(Section):
    pos: NonNegative
    neg: NonNegative
    flip_prob: Fraction
    intensity_scale: NonNegative
    intensity_shift: NonNegative
    corruption_prob: Fraction  # MRI acquisition corruptions per sample (segmentation.corruptions.augment)

    @model_validator(mode="after")
    def _some_crops(self) -> CropAugment:
        if self.pos + self.neg == 0:
            raise KeyedError("pos", "pos and neg cannot both be 0 (no crop centre could be drawn)")
        return self


class SegmentData(Section):
    labels: Labels
    roi: Roi
    val_fraction: Annotated[float, Field(ge=0, lt=1)]
    folds: Count  # 0: hold out val_fraction; K >= 2: patient-level K-fold split
    fold: Count
    augment: CropAugment

    @model_validator(mode="after")
    def _fold_in_folds(self) -> SegmentData:
        if self.folds == 1:
            raise KeyedError("folds", "needs 0 (no folds, val_fraction) or K >= 2 folds, got 1")
        if self.folds and self.fold >= self.folds:
            raise KeyedError("fold", f"must be below data.folds ({self.folds}), got {self.fold}")
        if not self.folds and self.fold:
            raise KeyedError("fold", f"{self.fold} needs data.folds (--folds K)")
        return self


# The mean validation Dice, or the Dice of one channel region of any scheme (train checks it is the task's).
_CHANNELS = dict.fromkeys(c for s in SCHEMES.values() for c in s.channels)  # TC, WT, ET, RC, CC, GTV
SegMonitor = Literal[("val_dice_mean", *(f"val_dice_{c}" for c in _CHANNELS))]


class SegmentTrain(LoopOptions):
    """The loop options of `segment train` (`batch_size` is the global batch, split over processes)."""

    samples_per_epoch: Count
    val_hd95: bool
    monitor: SegMonitor


class InferConfig(Section):
    """What changes a predicted label map (recorded in the output folder's settings.json)."""

    roi: Annotated[tuple[PositiveInt, ...], AsTuple]
    overlap: Overlap
    tta: bool
    threshold: OpenFraction
    save_probabilities: bool
    overlay_slices: Count

    @model_validator(mode="after")
    def _roi_size(self) -> InferConfig:
        if len(self.roi) not in (0, 3):
            raise KeyedError("roi", f"needs 3 sides (or [] for the training crop), got {list(self.roi)}")
        return self


class SegmentEvalConfig(Section):
    """`histo segment eval`: which metrics are computed per case."""

    hd95: bool


class SegmentRun(LoopRun):
    """Every trainer's run options (histo.training_config.LoopRun) and segmentation's own."""

    cache: bool
    sw_batch_size: PositiveInt


class SegmentConfig(StageConfig):
    """`histo segment`: everything but `run` is recorded in the checkpoint (and checked on --resume)."""

    stage = "segment"
    seed: Seed
    model: UNetConfig
    data: SegmentData
    train: SegmentTrain
    infer: InferConfig
    eval: SegmentEvalConfig
    run: SegmentRun

    @model_validator(mode="after")
    def _crop_fits(self) -> SegmentConfig:
        problem = roi_problem(self.data.roi, len(self.model.channels))
        if problem:
            raise KeyedError("data.roi", problem)
        return self  # infer.roi is checked against the checkpoint's U-Net, which may differ from `model`
