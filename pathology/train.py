"""Train or fine-tune KimiaNet (or a CBR baseline) on the high-cellularity tiles of a tile store.

AdamW, cosine schedule with warm-up (per optimizer step), gradient accumulation, bf16 autocast and
channels_last on CUDA, torchrun DDP (gloo on CPU). `batch_size` is the global batch of one forward step
(split evenly over processes). Each epoch: tile-level validation accuracy / macro-F1 and slide-level
majority-vote accuracy (definitions: `histo.classification`), the best model at OUT, the full training
state at OUT.last.pt (atomic), metrics CSV + curve PNG; rank 0 alone writes. `resume` continues from OUT.last.pt exactly.
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
import torch.nn.functional as F
from torch.utils.data import DataLoader

from histo.classification import DEFINITIONS, confusion_report, vote
from histo.errors import HistoError
from pathology.config import NetworkConfig, TrainConfig
from pathology.data import EpochSampler, TileDataset, TrainingData, balanced_weights, plan_training_data
from pathology.densenet import FeatureClassifier
from pathology.kimianet import build_model, model_config, save_model

logger = logging.getLogger(__name__)

STATE_KIND = "kimianet-train-state"  # histo.checkpoint kind of OUT.last.pt
# Recorded keys that may change between a run and its resumption (the data hash checks the data); the
# last three are where releases before the `run:` section recorded run options.
RESUME_IGNORE = ("data.skip_missing", "device", "resume", "data.workers")
POSTFIX_EVERY = 20  # training steps between progress-bar loss updates (each one is a device sync)


def output_paths(out: str | Path) -> dict[str, Path]:
    """Where a run writes: best model, last training state, metrics CSV and curve PNG."""
    out = Path(out)
    stem = out.with_suffix("") if out.suffix == ".pt" else out
    return {
        "best": out,
        "last": Path(f"{stem}.last.pt"),
        "csv": Path(f"{stem}.metrics.csv"),
        "png": Path(f"{stem}.curves.png"),
    }


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)


class Trainer:
    """One training run (one process of a possibly distributed job)."""

    def __init__(self, store_path: str | Path, out_path: str | Path, config: TrainConfig, dist: Any):
        from pathology.store import TileStore

        self.cfg, self.dist, self.paths = config, dist, output_paths(out_path)
        self.device = dist.device
        store = TileStore.open(store_path)
        self.store_path = store.path
        self.data: TrainingData = plan_training_data(
            store, config.data.val_fraction, config.seed, config.data.skip_missing
        )
        for s in self.data.skipped if dist.is_main else []:
            logger.warning("skipping slide %s: %s", s["slide_id"], s["reason"])
        self.run_config = {
            **config.recorded(),
            "classes": self.data.classes,
            "data_hash": self.data.data_hash,
            "world_size": dist.world_size,
        }
        self.model = self._build_model(config.model)
        self._build_loaders()
        self._build_optimizer()

    # ---- setup ------------------------------------------------------------------------------------
    def _build_model(self, m: NetworkConfig) -> FeatureClassifier:
        torch.manual_seed(self.cfg.seed)
        variant, init = m.variant, m.init
        if variant == "scratch" and init:
            raise HistoError("--variant scratch trains from random weights; drop --init or use --variant IV")
        if variant != "scratch" and not init:
            raise HistoError(
                f"variant {variant} fine-tunes pretrained weights: give --init PATH "
                "(KimiaNet or torchvision DenseNet-121 weights) or use --variant scratch"
            )
        model = build_model(m.arch, m.norm, len(self.data.classes), variant)
        self.init_report = None
        if init:
            from pathology.importers import load_pretrained

            self.init_report = load_pretrained(model, init, m.arch)
        model.to(self.device)
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # fixed input size: let cuDNN pick the fastest kernels
            if self.cfg.optim.channels_last:
                model.to(memory_format=torch.channels_last)
        return model

    def _build_loaders(self) -> None:
        d, o, w = self.cfg.data, self.cfg.optim, self.dist.world_size
        if o.batch_size % w:
            raise HistoError(f"batch size {o.batch_size} is not divisible by {w} processes")
        px = self.cfg.model.input_px
        train_set = TileDataset(self.store_path, self.data.train, px, self.cfg.augment)
        val_set = TileDataset(self.store_path, self.data.val, px, None)
        labels = [label for _, _, label in self.data.train]
        self.train_sampler = EpochSampler(
            len(train_set),
            weights=balanced_weights(labels) if d.balanced else None,
            num_samples=d.samples_per_epoch or len(train_set),
            global_batch=o.batch_size,
            rank=self.dist.rank,
            world_size=w,
            seed=self.cfg.seed,
        )
        val_sampler = EpochSampler(len(val_set), shuffle=False, rank=self.dist.rank, world_size=w)
        common = {
            "batch_size": o.batch_size // w,
            "num_workers": self.cfg.run.workers,
            "pin_memory": self.device.type == "cuda",
            "worker_init_fn": _worker_init,
            "persistent_workers": self.cfg.run.workers > 0,
        }
        self.train_loader = DataLoader(train_set, sampler=self.train_sampler, drop_last=True, **common)
        self.val_loader = DataLoader(val_set, sampler=val_sampler, **common)

    def _build_optimizer(self) -> None:
        from histo.training import cosine_warmup

        o = self.cfg.optim
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=o.lr, weight_decay=o.weight_decay)
        self.steps_per_epoch = math.ceil(len(self.train_loader) / o.accumulate)
        self.scheduler = cosine_warmup(
            self.optimizer,
            warmup_steps=round(o.warmup_epochs * self.steps_per_epoch),
            total_steps=o.epochs * self.steps_per_epoch,
            min_lr_ratio=o.min_lr_ratio,
        )
        self.net: torch.nn.Module = self.model
        if self.dist.distributed:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.net = torch.nn.parallel.DistributedDataParallel(self.model, device_ids=ids)

    # ---- one epoch --------------------------------------------------------------------------------
    def _to_device(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x.to(self.device, non_blocking=True)
        if self.device.type == "cuda" and self.cfg.optim.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, y.to(self.device, non_blocking=True)

    def train_epoch(self, epoch: int) -> dict[str, float]:
        from tqdm import tqdm

        from histo.devices import all_reduce_sum, autocast, average_buffers
        from histo.training import accumulation_group, gradient_sync

        o = self.cfg.optim
        accumulate, n_steps = o.accumulate, len(self.train_loader)
        self.train_sampler.set_epoch(epoch)
        self.net.train()
        self.optimizer.zero_grad(set_to_none=True)
        # loss * n, correct, n: summed on the device, read once per epoch (no CPU sync per step)
        sums = torch.zeros(3, dtype=torch.float64, device=self.device)
        bar = tqdm(self.train_loader, desc=f"epoch {epoch + 1}/{o.epochs}", disable=not self.dist.is_main)
        for step, (x, y) in enumerate(bar):
            x, y = self._to_device(x, y)
            group, sync = accumulation_group(step, n_steps, accumulate)
            with gradient_sync(self.net, sync):
                with autocast(self.device, o.amp):
                    logits = self.net(x)
                loss = F.cross_entropy(logits.float(), y, label_smoothing=o.label_smoothing)
                (loss / group).backward()
            if sync:
                self.optimizer.step()
                self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
            with torch.no_grad():
                correct = (logits.argmax(1) == y).sum()
                sums += torch.stack([loss.detach() * len(y), correct, loss.new_full((), len(y))]).double()
            if self.dist.is_main and (step + 1) % POSTFIX_EVERY == 0:
                bar.set_postfix(loss=f"{float(sums[0] / sums[2]):.3f}")  # one sync every few steps
        average_buffers(self.model)  # one set of BN statistics on every rank before validating and saving
        sums = all_reduce_sum(sums).cpu()
        return {"train_loss": float(sums[0] / sums[2]), "train_acc": float(sums[1] / sums[2])}

    @torch.inference_mode()
    def validate(self) -> dict[str, float]:
        """Tile-level loss/accuracy/macro-F1 and slide-level majority-vote accuracy, summed over ranks."""
        from histo.devices import all_reduce_sum, autocast

        c = len(self.data.classes)
        slides = sorted({s for s, _, _ in self.data.val})
        slide_index = {s: i for i, s in enumerate(slides)}
        confusion = torch.zeros(c, c, dtype=torch.float64)
        votes = torch.zeros(len(slides), c, dtype=torch.float64)
        loss_sum = torch.zeros(1, dtype=torch.float64, device=self.device)
        self.model.eval()
        seen = list(self.val_loader.sampler)
        position = 0
        for x, y in self.val_loader:
            x, yd = self._to_device(x, y)
            with autocast(self.device, self.cfg.optim.amp):
                logits = self.model(x)
            loss_sum += F.cross_entropy(logits.float(), yd, reduction="sum")
            pred = logits.argmax(1).cpu()
            confusion.index_put_((y, pred), torch.ones(len(y), dtype=torch.float64), accumulate=True)
            rows = [slide_index[self.data.val[i][0]] for i, _ in seen[position : position + len(y)]]
            votes.index_put_(
                (torch.tensor(rows), pred), torch.ones(len(y), dtype=torch.float64), accumulate=True
            )
            position += len(y)
        # NCCL reduces CUDA tensors only: every sum travels to the device and back.
        confusion, votes, loss_sum = (
            all_reduce_sum(t.to(self.device)).cpu() for t in (confusion, votes, loss_sum)
        )
        classes = np.array(self.data.classes)
        report = confusion_report(confusion.numpy(), self.data.classes)
        truth = {s: classes[label] for s, _, label in self.data.val}
        tile_votes = votes.long().numpy()
        slide_correct = [vote(np.repeat(classes, tile_votes[i])) == truth[s] for s, i in slide_index.items()]
        return {
            "val_loss": float(loss_sum / max(confusion.sum(), 1)),
            "val_acc": report.accuracy,
            "val_macro_f1": report.macro_f1,
            "val_slide_acc": float(np.mean(slide_correct)) if slide_correct else 0.0,
        }

    # ---- checkpoints ------------------------------------------------------------------------------
    def _model_config(self, epoch: int, metrics: Mapping[str, float]) -> dict[str, Any]:
        m = self.cfg.model
        return model_config(
            m.arch, m.norm, m.variant, self.data.classes, m.input_px, self.data.data_hash,
            epoch=epoch, metrics=dict(metrics), init=self.init_report, train_config=self.run_config,
        )  # fmt: skip

    def _save_state(self, epoch: int, stopper: Any, best_epoch: int, finished: bool) -> None:
        """Write OUT.last.pt: everything `_resume` needs to continue exactly (RNG states included)."""
        from histo import checkpoint
        from histo.training import rng_state

        checkpoint.save(
            self.paths["last"], STATE_KIND, checkpoint.KINDS[STATE_KIND].version,
            self.model.state_dict(), self.run_config,
            optimizer=self.optimizer.state_dict(), scheduler=self.scheduler.state_dict(), rng=rng_state(),
            epoch=epoch, early_stopping=stopper.state_dict(), best_epoch=best_epoch, finished=finished,
        )  # fmt: skip

    def _resume(self, stopper: Any) -> tuple[int, int, bool]:
        from histo import checkpoint
        from histo.training import check_same_config, set_rng_state

        path = self.paths["last"]
        if not path.is_file():
            raise HistoError(f"{path}: no training state to resume (run without --resume to start)")
        state = checkpoint.load(path, STATE_KIND)
        check_same_config(state.config, self.run_config, path, ignore=RESUME_IGNORE)
        extra = state.extra
        self.model.load_state_dict(state.weights)
        self.optimizer.load_state_dict(extra["optimizer"])
        self.scheduler.load_state_dict(extra["scheduler"])
        set_rng_state(extra["rng"])
        stopper.load_state_dict(extra["early_stopping"])
        return int(extra["epoch"]), int(extra["best_epoch"]), bool(extra["finished"])

    # ---- the run ----------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        from histo.devices import barrier
        from histo.training import EarlyStopping, MetricsLog

        o = self.cfg.optim
        monitor = o.monitor
        stopper = EarlyStopping(o.patience, mode="min" if monitor == "val_loss" else "max")
        start, best_epoch, finished = 0, -1, False
        if self.cfg.run.resume:
            start, best_epoch, finished = self._resume(stopper)
        metrics = MetricsLog(self.paths["csv"], self.paths["png"]) if self.dist.is_main else None
        if metrics is not None:
            metrics.truncate(start + 1)
        epoch = start
        while not finished and epoch < o.epochs:
            started = time.perf_counter()
            row = {"epoch": epoch + 1, **self.train_epoch(epoch), **self.validate()}
            row["lr"] = self.optimizer.param_groups[0]["lr"]
            row["seconds"] = round(time.perf_counter() - started, 2)
            improved = stopper.step(row[monitor])
            epoch += 1
            best_epoch = epoch if improved else best_epoch
            finished = stopper.should_stop or epoch >= o.epochs
            if self.dist.is_main:
                if improved:
                    save_model(self.paths["best"], self.model, self._model_config(epoch, row))
                metrics.log(row)
                self._save_state(epoch, stopper, best_epoch, finished)
                logger.info(
                    f"epoch {epoch}: train loss {row['train_loss']:.4f} | val acc {row['val_acc']:.3f} "
                    f"macro-F1 {row['val_macro_f1']:.3f} slide acc {row['val_slide_acc']:.3f}"
                    + (" (best)" if improved else "")
                )
            barrier()
        return self.summary(epoch, best_epoch, stopper, metrics)

    def summary(self, epoch: int, best_epoch: int, stopper: Any, metrics: Any) -> dict[str, Any]:
        """What a caller (CLI --json, demo) needs: outputs, data sizes, best epoch and its metrics."""
        rows = metrics.rows if metrics is not None else []
        best = next((r for r in rows if r["epoch"] == best_epoch), {})
        return {
            "out": str(self.paths["best"]),
            "last_state": str(self.paths["last"]),
            "metrics_csv": str(self.paths["csv"]),
            "curve_png": str(self.paths["png"]),
            "classes": self.data.classes,
            "n_train_tiles": len(self.data.train),
            "n_val_tiles": len(self.data.val),
            "train_patients": len(self.data.train_patients),
            "val_patients": len(self.data.val_patients),
            "skipped": self.data.skipped,
            "epochs_run": epoch,
            "best_epoch": best_epoch,
            "best": best,
            "stopped_early": bool(stopper.should_stop),
            "world_size": self.dist.world_size,
            "rank": self.dist.rank,
            "device": str(self.device),
            "init": self.init_report,
            "data_hash": self.data.data_hash,
            **DEFINITIONS,
        }


def train_kimianet(
    store_path: str | Path, out_path: str | Path, config: TrainConfig | Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Train per `config` (a TrainConfig, None for the defaults, or a mapping over them); works alone or
    as one process under torchrun."""
    from histo.devices import cleanup_distributed, init_distributed
    from histo.training import seed_everything

    config = TrainConfig.coerce(config)
    dist = init_distributed(config.run.device)
    try:
        seed_everything(config.seed)
        return Trainer(store_path, out_path, config, dist).run()
    finally:
        if dist.distributed:
            cleanup_distributed()
