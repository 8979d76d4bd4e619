"""Train a UNet3D on BraTS case folders: Dice + BCE on random tumour-biased crops, AdamW with a warm-up
cosine schedule, gradient accumulation, bf16 autocast on CUDA, validation Dice per region on whole volumes,
atomic checkpoints every epoch with exact `--resume`, and torchrun/DDP (NCCL on GPUs, gloo on CPU).

The label scheme (`data.labels`, or detected from the cases, recorded resolved in the checkpoint) sets the
output channels: one per channel region of the scheme (regions head) or one per label value plus the
background (labels head). `data.folds` K > 0 holds out fold `data.fold` of K patient-level folds for
validation instead of `data.val_fraction`; the split is recorded in the checkpoint and the summary.

Exact resume: every random draw of epoch e (crop plan, augmentation, dropout) derives from (seed, e, rank),
so a run resumed after epoch e replays epochs e+1… exactly as an uninterrupted run would.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from histo.errors import HistoError
from segmentation.config import SegmentConfig
from segmentation.data import Case, CropDataset, PlanSampler, epoch_plan, find_cases, load_case
from segmentation.label_schemes import LabelScheme, get_scheme, paint_order
from segmentation.metrics import dice, hd95
from segmentation.splits import patient_id, split_for

logger = logging.getLogger(__name__)

STATE_KIND = "unet3d-train-state"  # histo.checkpoint kind of <out>.last.pt
# Where releases before the `run:` section recorded run options (they may change on --resume).
RESUME_IGNORE = ("device", "data.workers", "data.cache", "infer.sw_batch_size")
POSTFIX_EVERY = 20  # training steps between progress-bar loss updates (each one is a device sync)


def output_paths(out_path: str | Path) -> dict[str, Path]:
    """Files written beside the best checkpoint `out_path`: last (resume), metrics CSV and curve PNG."""
    out = Path(out_path)
    stem = out.name[: -len(out.suffix)] if out.suffix else out.name
    return {
        "best": out,
        "last": out.with_name(f"{stem}.last.pt"),
        "csv": out.with_name(f"{stem}.metrics.csv"),
        "png": out.with_name(f"{stem}.metrics.png"),
    }


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
    the scheme's classes (labels head). Dice uses smooth_nr=0 so crops without tumour train by BCE."""

    def __init__(self, head: str, scheme: str | LabelScheme | None = None) -> None:
        super().__init__()
        from monai.losses import DiceCELoss, DiceLoss

        if head == "labels" and scheme is None:
            raise ValueError("a labels head needs the label scheme of its classes")
        self.head, self.scheme = head, scheme
        if head == "regions":
            self.dice = DiceLoss(sigmoid=True, smooth_nr=0.0, smooth_dr=1e-5)
        else:
            self.dice_ce = DiceCELoss(to_onehot_y=True, softmax=True, smooth_nr=0.0, smooth_dr=1e-5)

    def forward(self, logits: torch.Tensor, regions: torch.Tensor) -> torch.Tensor:
        if self.head == "regions":
            return self.dice(logits, regions) + nn.functional.binary_cross_entropy_with_logits(
                logits, regions
            )
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


def _validate(
    model: nn.Module, cases: list[Case], config: SegmentConfig, device, dist, cache: dict
) -> dict[str, float]:
    """Mean Dice (and with train.val_hd95, HD95 in mm) per region over the validation cases, sharded over
    ranks and summed with all_reduce."""
    from histo.devices import all_reduce_sum
    from segmentation.data import ras_spacing
    from segmentation.infer import predict_volume

    with_hd95 = config.train.val_hd95
    scheme = get_scheme(cases[0].scheme)  # the cases of a run share one scheme (_check_inputs)
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
            device=device,
            brain_mask=brain,
            sw_batch_size=config.run.sw_batch_size,
            scheme=scheme,
        )
        pred = prob >= config.infer.threshold
        sums[:c] += torch.tensor([dice(pred[i], regions[i]) for i in range(c)], dtype=torch.float64)
        if with_hd95:
            spacing = ras_spacing(affine)
            sums[c : 2 * c] += torch.tensor(
                [hd95(pred[i], regions[i], spacing) for i in range(c)], dtype=torch.float64
            )
        sums[2 * c] += 1.0
    all_reduce_sum(sums)
    model.train()
    n = max(sums[2 * c].item(), 1.0)
    out = {f"val_dice_{r}": sums[i].item() / n for i, r in enumerate(names)}
    out["val_dice_mean"] = float(np.mean([out[f"val_dice_{r}"] for r in names]))
    if with_hd95:
        out |= {f"val_hd95_{r}": sums[c + i].item() / n for i, r in enumerate(names)}
    return out


def train_segmenter(
    data_dir: str | Path,
    out_path: str | Path,
    config: SegmentConfig | Mapping[str, Any] | None = None,
    stop_after: int | None = None,
) -> dict:
    """Train on the case folders under `data_dir`; best checkpoint -> `out_path` (see `output_paths`).

    `config`: a SegmentConfig, None (the defaults) or a mapping over the defaults (validated). With
    `run.resume` it continues from `<out>.last.pt` (same recorded config required); `stop_after` ends this
    run after that many epochs (for time-limited jobs; `run.resume` continues). Returns a summary dict.
    """
    from histo.devices import cleanup_distributed, init_distributed

    config = SegmentConfig.coerce(config)
    dist = init_distributed(config.run.device)
    try:
        return _train(Path(data_dir), output_paths(out_path), config, dist, stop_after)
    finally:
        cleanup_distributed()


def _train(
    data_dir: Path, paths: dict[str, Path], config: SegmentConfig, dist, stop_after: int | None
) -> dict:
    from histo import checkpoint
    from histo.devices import barrier
    from histo.training import EarlyStopping, MetricsLog, check_same_config, cosine_warmup, seed_everything

    cases, scheme = _check_inputs(data_dir, paths, config)
    config = config.updated({"data.labels": scheme}, source=f"{data_dir} (detected label scheme)")
    tc, dc, resume = config.train, config.data, config.run.resume
    device, seed = dist.device, config.seed
    train_cases, val_cases = split_for(cases, config)
    split = {
        "folds": dc.folds,
        "fold": dc.fold if dc.folds else None,
        "val_patients": sorted({patient_id(c.case_id) for c in val_cases}),
        "val_cases": [c.case_id for c in val_cases],
    }

    seed_everything(seed)
    model = build_model(config, scheme).to(device)
    net = nn.parallel.DistributedDataParallel(model) if dist.distributed else model
    optimizer = torch.optim.AdamW(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
    samples = tc.samples_per_epoch or len(train_cases)
    per_rank = -(-samples // dist.world_size)
    batches = -(-per_rank // tc.batch_size)
    steps_per_epoch = -(-batches // tc.accumulate)
    total_steps = steps_per_epoch * tc.epochs
    scheduler = cosine_warmup(
        optimizer, round(tc.warmup_epochs * steps_per_epoch), total_steps, tc.min_lr_ratio
    )
    loss_fn = SegLoss(config.model.head, scheme)
    early = EarlyStopping(patience=tc.patience, mode="max")
    log = MetricsLog(paths["csv"], paths["png"], x="epoch") if dist.is_main else None
    start = 0
    if resume:
        state = checkpoint.load(paths["last"], STATE_KIND)
        check_same_config(state.config, config.recorded(), paths["last"], ignore=RESUME_IGNORE)
        model.load_state_dict(state.weights)
        optimizer.load_state_dict(state.extra["optimizer"])
        scheduler.load_state_dict(state.extra["scheduler"])
        early.load_state_dict(state.extra["early_stopping"])
        start = int(state.extra["epoch"])
        if log is not None:
            log.truncate(start + 1)
    elif log is not None:
        log.truncate(0)

    dataset = CropDataset(train_cases, dc.roi, dc.augment, cache=config.run.cache)
    sampler = PlanSampler()
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=tc.batch_size,
        sampler=sampler,
        num_workers=config.run.workers,
        persistent_workers=config.run.workers > 0,
    )
    val_cache: dict = {}
    epoch, run = start, 0
    while epoch < tc.epochs and not early.should_stop and (stop_after is None or run < stop_after):
        t0 = time.time()
        seed_everything(seed + 7919 * (epoch + 1) + 104729 * dist.rank)
        plan = epoch_plan(len(train_cases), per_rank * dist.world_size, seed, epoch)
        sampler.set_plan(plan[dist.rank :: dist.world_size])
        loss_sums = _train_epoch(
            net, model, loader, optimizer, scheduler, loss_fn, config, dist, batches, epoch
        )
        epoch += 1
        run += 1
        row = {
            "epoch": epoch,
            "train_loss": _mean_over_ranks(loss_sums),
            "lr": optimizer.param_groups[0]["lr"],
        }
        if val_cases and (epoch % tc.val_every == 0 or epoch == tc.epochs):
            row.update(_validate(model, val_cases, config, device, dist, val_cache))
        improved = early.step(row["val_dice_mean"]) if "val_dice_mean" in row else not val_cases
        row["time_s"] = round(time.time() - t0, 2)
        if dist.is_main:
            _save(paths, model, config, epoch, row, improved, optimizer, scheduler, early, split)
            log.log(row)
            logger.info(_epoch_line(row, improved))
        barrier()
    return {
        "epochs_done": epoch,
        "epochs": tc.epochs,
        "stopped_early": early.should_stop,
        "best_val_dice_mean": early.best,
        "n_train": len(train_cases),
        "n_val": len(val_cases),
        "val_cases": [c.case_id for c in val_cases],
        "labels": scheme,
        "split": split,
        "world_size": dist.world_size,
        "rank": dist.rank,
        **{k: str(v) for k, v in paths.items()},
    }


def _check_inputs(data_dir: Path, paths: dict[str, Path], config: SegmentConfig) -> tuple[list[Case], str]:
    """Refuse clobbering a run or resuming nothing; -> (the labelled cases under `data_dir`, their one
    label scheme: data.labels, or detected when it is `auto`)."""
    resume = config.run.resume
    if paths["last"].exists() and not resume:
        raise HistoError(
            f"{paths['last']}: a training run exists here; pass --resume or choose another --out"
        )
    if resume and not paths["last"].exists():
        raise HistoError(f"{paths['last']}: nothing to resume (no last checkpoint)")
    labels = config.data.labels
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


def _train_epoch(
    net, model, loader, optimizer, scheduler, loss_fn, config, dist, batches: int, epoch: int
) -> torch.Tensor:
    """One pass over the loader with gradient accumulation (DDP syncs only on the stepping batch);
    -> float64 [sum of batch losses, number of batches] kept on the device (no host sync per step)."""
    from histo.devices import autocast, average_buffers
    from histo.norms import set_region_mask
    from histo.training import accumulation_group, gradient_sync

    tc, device = config.train, dist.device
    model.train()
    sums = torch.zeros(2, dtype=torch.float64, device=device)
    bar = tqdm(loader, desc=f"epoch {epoch + 1}/{tc.epochs}", disable=not dist.is_main, leave=False)
    for i, batch in enumerate(bar):
        group, step_now = accumulation_group(i, batches, tc.accumulate)
        image, regions = batch["image"].to(device), batch["label"].to(device)
        set_region_mask(model, batch["mask"].to(device) > 0.5)
        with gradient_sync(net, step_now):
            with autocast(device, enabled=tc.amp):
                logits = net(image)
            loss = loss_fn(logits.float(), regions)
            (loss / group).backward()
        sums += torch.stack([loss.detach().double(), sums.new_ones(())])
        if step_now:
            if tc.grad_clip > 0:
                nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
        if dist.is_main and (i + 1) % POSTFIX_EVERY == 0:
            bar.set_postfix(loss=f"{float(sums[0] / sums[1]):.4f}")  # one sync every few steps
    average_buffers(model)  # one set of BN statistics on every rank before validating and saving
    return sums


def _save(paths, model, config, epoch, row, improved, optimizer, scheduler, early, split) -> None:
    """Atomic checkpoints: the best model (when improved) and the full resumable state (always)."""
    from histo import checkpoint
    from segmentation.infer import save_model

    recorded = config.recorded()  # the stage config without its run options, as JSON
    if improved:
        save_model(
            paths["best"],
            model,
            recorded,
            config.data.labels,
            split=split,
            epoch=epoch,
            val={k: v for k, v in row.items() if k.startswith("val_")},
        )
    checkpoint.save(
        paths["last"], STATE_KIND, checkpoint.KINDS[STATE_KIND].version, model.state_dict(), recorded,
        optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(), early_stopping=early.state_dict(),
        epoch=epoch,
    )  # fmt: skip


def _epoch_line(row: dict, improved: bool) -> str:
    """`epoch 3: train loss 0.4121 | val Dice 0.712 (best)`: the metrics row as one log line."""
    val = f" | val Dice {row['val_dice_mean']:.3f}" if "val_dice_mean" in row else ""
    return f"epoch {row['epoch']}: train loss {row['train_loss']:.4f}{val}" + (" (best)" if improved else "")


def _mean_over_ranks(sums: torch.Tensor) -> float:
    """Mean batch loss over all ranks from each rank's [loss sum, batch count] (NaN when no batches)."""
    from histo.devices import all_reduce_sum

    total = all_reduce_sum(sums.clone()).cpu()
    return float(total[0] / total[1]) if total[1] > 0 else math.nan
