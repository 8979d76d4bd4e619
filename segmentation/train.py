"""Train a UNet3D on BraTS case folders: Dice + BCE on random tumour-biased crops, and per validation the
Dice per region on whole volumes, scored through the label map exactly as `segment eval` scores it.

The task of `histo.training.fit` (which owns the loop, checkpoints, DDP and resume). Every random draw of
epoch e (crop plan, augmentation, dropout) derives from (seed, e, rank), so a resumed run replays the
epochs an uninterrupted run would. `train.batch_size` is the global batch (split over processes).

The label scheme (`data.labels`, or detected from the cases, recorded resolved in the checkpoint) sets the
output channels: one per channel region of the scheme (regions head) or one per label value plus the
background (labels head). `data.folds` K > 0 holds out fold `data.fold` of K patient-level folds for
validation instead of `data.val_fraction` (`segmentation.splits`); the split is recorded in the checkpoint
and the summary.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from histo.errors import ConfigError, HistoError
from segmentation.config import SegmentConfig
from segmentation.data import Case, CropDataset, PlanSampler, epoch_plan, find_cases, load_case
from segmentation.label_schemes import LabelScheme, get_scheme, paint_order
from segmentation.splits import patient_id, split_for

# Where releases before the `run:` section recorded run options (they may change on --resume).
RESUME_IGNORE = ("device", "data.workers", "data.cache", "infer.sw_batch_size")


def monitors(scheme: str | LabelScheme) -> dict[str, str]:
    """The validation metrics a run of `scheme` can monitor: the mean Dice and each channel region's."""
    return {"val_dice_mean": "max", **{f"val_dice_{r}": "max" for r in get_scheme(scheme).channels}}


def build_model(config: SegmentConfig, scheme: str | LabelScheme) -> nn.Module:
    """The UNet3D described by the `model` section (4 input modalities) with the outputs of `scheme`: one
    per channel region (regions head) or per class, background and each label value (labels head)."""
    from segmentation.unet import UNet3D

    m, scheme = config.model, get_scheme(scheme)
    return UNet3D(
        in_channels=4,
        out_channels=len(scheme.channels) if m.head == "regions" else 1 + len(scheme.labels),
        channels=m.channels,
        blocks_per_level=m.blocks_per_level,
        expansion=m.expansion,
        norm=m.norm,
        se_ratio=m.se_ratio,
        dropout=m.dropout,
        reversible=m.reversible,
        head=m.head,
    )


class SegLoss(nn.Module):
    """Soft Dice + cross-entropy: per-region sigmoid Dice + BCE (regions head), or softmax Dice + CE over
    the scheme's classes (labels head). Dice uses smooth_nr=0 so crops without tumour train by BCE;
    `label_smoothing` ε smooths the BCE targets to y(1 - ε) + ε/2 (or the CE as torch does), not the Dice."""

    def __init__(
        self, head: str, label_smoothing: float = 0.0, scheme: str | LabelScheme | None = None
    ) -> None:
        super().__init__()
        from monai.losses import DiceCELoss, DiceLoss

        if head == "labels" and scheme is None:
            raise ValueError("a labels head needs the label scheme of its classes")
        self.head, self.smoothing, self.scheme = head, label_smoothing, scheme
        if head == "regions":
            self.dice = DiceLoss(sigmoid=True, smooth_nr=0.0, smooth_dr=1e-5)
        else:
            self.dice_ce = DiceCELoss(
                to_onehot_y=True, softmax=True, smooth_nr=0.0, smooth_dr=1e-5, label_smoothing=label_smoothing
            )

    def forward(self, logits: torch.Tensor, regions: torch.Tensor) -> torch.Tensor:
        if self.head == "regions":
            target = regions * (1 - self.smoothing) + self.smoothing / 2 if self.smoothing else regions
            return self.dice(logits, regions) + nn.functional.binary_cross_entropy_with_logits(logits, target)
        return self.dice_ce(logits, regions_to_classes(regions, self.scheme))


def regions_to_classes(regions: torch.Tensor, scheme: str | LabelScheme) -> torch.Tensor:
    """(N, C, …) channel masks -> (N, 1, …) class indices: 0 background, k the k-th label value of the
    scheme in ascending order (2021: 1 NCR, 2 ED, 3 ET), painted outermost channel first."""
    scheme = get_scheme(scheme)
    classes = regions.new_zeros((regions.shape[0], 1, *regions.shape[2:]))
    for index, value in paint_order(scheme):
        classes = torch.where(
            regions[:, index : index + 1] > 0.5, float(scheme.values.index(value) + 1), classes
        )
    return classes


def labelled_cases(data_dir: Path, labels: str = "auto") -> tuple[list[Case], str]:
    """(the cases under `data_dir`, every one with a label file, their one label scheme: `labels`, or
    detected when it is auto); HistoError naming cases without labels or of different schemes."""
    cases = find_cases(data_dir, labels=None if labels == "auto" else labels)
    unlabelled = [c.case_id for c in cases if c.seg is None]
    if unlabelled:
        raise HistoError(f"{data_dir}: cases without a label file (*_seg): {', '.join(unlabelled[:5])}")
    schemes: dict[str, list[str]] = {}
    for case in cases:
        schemes.setdefault(case.scheme, []).append(case.case_id)
    if len(schemes) > 1:
        groups = "; ".join(f"{name}: {', '.join(ids[:3])}" for name, ids in schemes.items())
        raise HistoError(
            f"{data_dir}: cases were detected as different label schemes ({groups}); set --labels"
        )
    return cases, cases[0].scheme


def validation_scores(
    model: nn.Module, cases: list[Case], config: SegmentConfig, dist: Any, cache: dict
) -> dict[str, float]:
    """Mean Dice (and with train.val_hd95, HD95 in mm) per region over the validation cases, each scored on
    the label map `segment predict` writes (`segmentation.metrics.label_map_metrics`), sharded over ranks and
    summed with all_reduce. With `run.cache` the loaded cases stay in `cache`."""
    from histo.devices import all_reduce_sum
    from segmentation.data import ras_spacing
    from segmentation.infer import predict_volume
    from segmentation.metrics import label_map_metrics

    with_hd95 = config.train.val_hd95
    scheme = get_scheme(cases[0].scheme)  # the cases of a run share one scheme (labelled_cases)
    names, c = scheme.channels, len(scheme.channels)
    sums = torch.zeros(2 * c + 1, dtype=torch.float64)  # Dice per channel, HD95 per channel, cases
    model.eval()
    for case in cases[dist.rank :: dist.world_size]:
        item = cache.get(case.case_id) or load_case(case)
        if config.run.cache:
            cache[case.case_id] = item
        image, brain, regions, affine, _ = item
        prob = predict_volume(
            model,
            image,
            roi=config.data.roi,
            overlap=config.infer.overlap,
            device=dist.device,
            brain_mask=brain,
            sw_batch_size=config.run.sw_batch_size,
            scheme=scheme,
        )
        scores = label_map_metrics(
            prob >= config.infer.threshold, regions, scheme.name, ras_spacing(affine), with_hd95
        )
        sums[:c] += torch.tensor([scores[f"dice_{r}"] for r in names], dtype=torch.float64)
        if with_hd95:
            sums[c : 2 * c] += torch.tensor([scores[f"hd95_{r}"] for r in names], dtype=torch.float64)
        sums[2 * c] += 1.0
    all_reduce_sum(sums)
    n = max(sums[2 * c].item(), 1.0)
    out = {f"val_dice_{r}": sums[i].item() / n for i, r in enumerate(names)}
    out["val_dice_mean"] = float(np.mean([out[f"val_dice_{r}"] for r in names]))
    if with_hd95:
        out |= {f"val_hd95_{r}": sums[c + i].item() / n for i, r in enumerate(names)}
    return out


class SegmentTask:
    """UNet3D training on labelled BraTS case folders, for one process of a possibly distributed job."""

    memory_format = torch.channels_last_3d
    model_kind = "unet3d"
    state_kind = "unet3d-train-state"
    resume_ignore = RESUME_IGNORE
    n_stats = 2  # batch losses, batches

    def __init__(self, data_dir: str | Path, config: SegmentConfig, dist: Any) -> None:
        from histo.training import per_process_batch

        cases, self.scheme = labelled_cases(Path(data_dir), config.data.labels)
        self.monitors = monitors(self.scheme)
        if config.train.monitor not in self.monitors:
            raise ConfigError(
                f"train.monitor: {config.train.monitor} is not a metric of scheme {self.scheme} "
                f"({', '.join(self.monitors)})"
            )
        config = config.updated({"data.labels": self.scheme}, source=f"{data_dir} (label scheme)")
        self.config, self.dist, self.seed, self.options = config, dist, config.seed, config.train
        self.run_config = config.recorded()  # the scheme recorded resolved
        self.default_config = _defaults_of_earlier_runs(self.scheme)
        self.train_cases, self.val_cases = split_for(cases, config)
        self.split = {
            "folds": config.data.folds,
            "fold": config.data.fold if config.data.folds else None,
            "val_patients": sorted({patient_id(c.case_id) for c in self.val_cases}),
            "val_cases": [c.case_id for c in self.val_cases],
        }
        self.has_validation = bool(self.val_cases)
        o, w = config.train, dist.world_size
        batch = per_process_batch(o.batch_size, w)
        self.per_rank = -(-(o.samples_per_epoch or len(self.train_cases)) // w)
        self.n_batches = -(-self.per_rank // batch)
        self.sampler = PlanSampler()
        self.loader = torch.utils.data.DataLoader(
            CropDataset(self.train_cases, config.data.roi, config.data.augment, cache=config.run.cache),
            batch_size=batch,
            sampler=self.sampler,
            num_workers=config.run.workers,
            persistent_workers=config.run.workers > 0,
        )
        self.loss_fn = SegLoss(config.model.head, o.label_smoothing, self.scheme)
        self.val_cache: dict = {}

    # ---- the task protocol (histo.training.Task) ----------------------------------------------------
    def build_model(self) -> nn.Module:
        self.model = build_model(self.config, self.scheme)
        return self.model

    def batches_per_epoch(self) -> int:
        return self.n_batches

    def batches(self, epoch: int) -> torch.utils.data.DataLoader:
        w = self.dist.world_size
        plan = epoch_plan(len(self.train_cases), self.per_rank * w, self.seed, epoch)
        self.sampler.set_plan(plan[self.dist.rank :: w])
        return self.loader

    def inputs(self, batch: dict, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(image, regions) on `device`; the crop's brain mask goes to the region norms (rn_b)."""
        from histo.norms import set_region_mask

        set_region_mask(self.model, batch["mask"].to(device) > 0.5)
        return batch["image"].to(device), batch["label"].to(device)

    def loss(self, logits: torch.Tensor, regions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        loss = self.loss_fn(logits, regions)
        return loss, torch.stack([loss.detach().double(), loss.new_ones((), dtype=torch.float64)])

    def train_metrics(self, sums: torch.Tensor) -> dict[str, float]:
        """The mean batch loss (NaN when no process had a batch)."""
        return {"train_loss": float(sums[0] / sums[1]) if sums[1] > 0 else math.nan}

    def validate(self, model: nn.Module, forward: Callable[[torch.Tensor], torch.Tensor]) -> dict[str, float]:
        """Whole-volume sliding-window validation (`validation_scores`; its windows run as `segment predict`)."""
        return validation_scores(model, self.val_cases, self.config, self.dist, self.val_cache)

    def model_record(
        self, model: nn.Module, epoch: int, row: Mapping[str, Any]
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        from segmentation.infer import model_config

        val = {k: v for k, v in row.items() if k.startswith("val_")}
        extra = {"epoch": epoch, "val": val, "split": self.split}
        return model_config(model, dict(self.run_config), self.scheme), extra

    def summary(self) -> dict[str, Any]:
        return {
            "n_train": len(self.train_cases),
            "n_val": len(self.val_cases),
            "val_cases": [c.case_id for c in self.val_cases],
            "labels": self.scheme,
            "split": self.split,
        }


def _defaults_of_earlier_runs(scheme: str) -> dict[str, Any]:
    """The recorded defaults with the scheme a run of a release before `data.labels` used: it detected
    the 2018-2021 or 2023 scheme as `auto` does (a resumed old run then matches; any other scheme differs)."""
    defaults = SegmentConfig.coerce(None)
    if scheme in ("2021", "2023"):
        defaults = defaults.updated({"data.labels": scheme})
    return defaults.recorded()


def train_segmenter(
    data_dir: str | Path,
    out_path: str | Path,
    config: SegmentConfig | Mapping[str, Any] | None = None,
    stop_after: int | None = None,
) -> dict:
    """Train on the case folders under `data_dir`; best checkpoint -> `out_path` (files:
    `histo.training.output_paths`); works alone or as one process under torchrun.

    `config`: a SegmentConfig, None (the defaults) or a mapping over the defaults (validated). A re-run
    continues `<stem>.last.pt` when its recorded config matches (`run.resume` requires it, `run.overwrite`
    starts over); `stop_after` ends this call after that many epochs (time-limited jobs). Returns the summary.
    """
    from histo.training import train_distributed

    config = SegmentConfig.coerce(config)
    return train_distributed(
        lambda dist: SegmentTask(data_dir, config, dist), out_path, config.run, stop_after
    )
