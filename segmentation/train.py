"""Train a UNet3D on BraTS case folders: Dice + BCE on random tumour-biased crops, AdamW with a warm-up
cosine schedule, gradient accumulation, bf16 autocast on CUDA, validation Dice per region on whole volumes,
atomic checkpoints every epoch with exact `--resume`, and torchrun/DDP (NCCL on GPUs, gloo on CPU).

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
from segmentation.labels import REGIONS
from segmentation.metrics import dice, hd95

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


def build_model(config: SegmentConfig) -> nn.Module:
    """The UNet3D described by the `model` section (4 input modalities)."""
    from segmentation.unet import UNet3D

    m = config.model
    return UNet3D(
        in_channels=4,
        out_channels=3 if m.head == "regions" else 4,
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
    the classes bg, NCR, ED, ET (labels head). Dice uses smooth_nr=0 so crops without tumour train by BCE."""

    def __init__(self, head: str) -> None:
        super().__init__()
        from monai.losses import DiceCELoss, DiceLoss

        self.head = head
        if head == "regions":
            self.dice = DiceLoss(sigmoid=True, smooth_nr=0.0, smooth_dr=1e-5)
        else:
            self.dice_ce = DiceCELoss(to_onehot_y=True, softmax=True, smooth_nr=0.0, smooth_dr=1e-5)

    def forward(self, logits: torch.Tensor, regions: torch.Tensor) -> torch.Tensor:
        if self.head == "regions":
            return self.dice(logits, regions) + nn.functional.binary_cross_entropy_with_logits(
                logits, regions
            )
        return self.dice_ce(logits, regions_to_classes(regions))


def regions_to_classes(regions: torch.Tensor) -> torch.Tensor:
    """(N, 3, …) nested [TC, WT, ET] masks -> (N, 1, …) classes 0 bg, 1 NCR, 2 ED, 3 ET."""
    tc, wt, et = regions[:, 0:1], regions[:, 1:2], regions[:, 2:3]
    return 2 * wt - tc + 2 * et


def split_cases(cases: list[Case], val_fraction: float, seed: int) -> tuple[list[Case], list[Case]]:
    """Deterministic train/validation split by case (at least one of each when there are >= 2 cases)."""
    order = np.random.default_rng(seed).permutation(len(cases))
    n_val = min(max(round(val_fraction * len(cases)), 1 if val_fraction > 0 else 0), len(cases) - 1)
    val = sorted(order[:n_val].tolist())
    return [c for i, c in enumerate(cases) if i not in val], [cases[i] for i in val]


def _validate(
    model: nn.Module, cases: list[Case], config: SegmentConfig, device, dist, cache: dict
) -> dict[str, float]:
    """Mean Dice (and with train.val_hd95, HD95 in mm) per region over the validation cases, sharded over
    ranks and summed with all_reduce."""
    from histo.devices import all_reduce_sum
    from segmentation.data import ras_spacing
    from segmentation.infer import predict_volume

    with_hd95 = config.train.val_hd95
    sums = torch.zeros(7, dtype=torch.float64)  # Dice TC/WT/ET, HD95 TC/WT/ET, cases
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
        )
        pred = prob >= config.infer.threshold
        sums[:3] += torch.tensor([dice(pred[i], regions[i]) for i in range(3)], dtype=torch.float64)
        if with_hd95:
            spacing = ras_spacing(affine)
            sums[3:6] += torch.tensor(
                [hd95(pred[i], regions[i], spacing) for i in range(3)], dtype=torch.float64
            )
        sums[6] += 1.0
    all_reduce_sum(sums)
    model.train()
    n = max(sums[6].item(), 1.0)
    out = {f"val_dice_{r}": sums[i].item() / n for i, r in enumerate(REGIONS)}
    out["val_dice_mean"] = float(np.mean([out[f"val_dice_{r}"] for r in REGIONS]))
    if with_hd95:
        out |= {f"val_hd95_{r}": sums[3 + i].item() / n for i, r in enumerate(REGIONS)}
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

    tc, dc, resume = config.train, config.data, config.run.resume
    device, seed = dist.device, config.seed
    cases = _check_inputs(data_dir, paths, resume)
    train_cases, val_cases = split_cases(cases, dc.val_fraction, seed)

    seed_everything(seed)
    model = build_model(config).to(device)
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
    loss_fn = SegLoss(config.model.head)
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
            _save(paths, model, config, epoch, row, improved, optimizer, scheduler, early)
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
        "world_size": dist.world_size,
        "rank": dist.rank,
        **{k: str(v) for k, v in paths.items()},
    }


def _check_inputs(data_dir: Path, paths: dict[str, Path], resume: bool) -> list[Case]:
    """Refuse clobbering a run or resuming nothing; -> the labelled cases under `data_dir`."""
    if paths["last"].exists() and not resume:
        raise HistoError(
            f"{paths['last']}: a training run exists here; pass --resume or choose another --out"
        )
    if resume and not paths["last"].exists():
        raise HistoError(f"{paths['last']}: nothing to resume (no last checkpoint)")
    cases = find_cases(data_dir)
    unlabelled = [c.case_id for c in cases if c.seg is None]
    if unlabelled:
        raise HistoError(f"{data_dir}: cases without a label file (*_seg): {', '.join(unlabelled[:5])}")
    return cases


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


def _save(paths, model, config, epoch, row, improved, optimizer, scheduler, early) -> None:
    """Atomic checkpoints: the best model (when improved) and the full resumable state (always)."""
    from histo import checkpoint
    from segmentation.infer import save_model

    recorded = config.recorded()  # the stage config without its run options, as JSON
    if improved:
        save_model(
            paths["best"],
            model,
            recorded,
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
