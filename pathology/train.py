"""Train or fine-tune a registry encoder (KimiaNet by default) on the high-cellularity tiles of a tile store.

The task of `histo.training.fit` (which owns the loop, checkpoints, DDP and resume): patient-level split,
class-balanced sampling of augmented tiles, cross-entropy (with `optim.label_smoothing`), and per epoch the
tile-level validation loss, accuracy and macro-F1 and the slide-level majority-vote accuracy (definitions:
`histo.classification`). `optim.batch_size` is the global batch of one forward step (split over processes).
The network is the encoder's with a head on its pooled feature (`pathology.kimianet.build_model`), trained
per `model.variant` (`pathology.variants`: which parameters train, how the norms run); the run logs and
reports its parameter counts, and `--init` weights are loaded by the registry with every tensor checked.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from histo.classification import DEFINITIONS, confusion_report, vote
from histo.errors import HistoError
from pathology.config import TrainConfig
from pathology.data import EpochSampler, TileDataset, TrainingData, balanced_weights, plan_training_data
from pathology.densenet import FeatureClassifier
from pathology.kimianet import KIND, build_model, model_config
from pathology.variants import counts_line, init_refusal, parameter_counts

logger = logging.getLogger(__name__)

# Recorded keys that may change between a run and its resumption (the data hash checks the data); the
# last three are where releases before the `run:` section recorded run options.
RESUME_IGNORE = ("data.skip_missing", "device", "resume", "data.workers")
MONITORS = {"val_macro_f1": "max", "val_acc": "max", "val_slide_acc": "max", "val_loss": "min"}


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)


class KimiaNetTask:
    """Encoder + head tile classification on a tile store, for one process of a possibly distributed job."""

    monitors = MONITORS
    memory_format = torch.channels_last
    model_kind = KIND
    state_kind = "kimianet-train-state"
    resume_ignore = RESUME_IGNORE
    has_validation = True
    n_stats = 3  # loss x tiles, correct tiles, tiles

    def __init__(self, store_path: str | Path, config: TrainConfig, dist: Any) -> None:
        from pathology.store import TileStore

        self.cfg, self.dist, self.seed, self.options = config, dist, config.seed, config.optim
        self._check_variant()
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
        self.default_config = TrainConfig.coerce(None).recorded()
        self.init_report = None
        self.parameter_counts: dict[str, Any] = {}
        self._build_loaders()

    def _check_variant(self) -> None:
        m = self.cfg.model
        reason = init_refusal(m.variant, m.init is not None)
        if reason is not None:
            raise HistoError(reason)

    def _build_loaders(self) -> None:
        from histo.training import per_process_batch

        d, w = self.cfg.data, self.dist.world_size
        batch = per_process_batch(self.options.batch_size, w)
        px, enc = self.cfg.model.px, self.cfg.model.entry
        train_set = TileDataset(self.store_path, self.data.train, px, self.cfg.augment, enc.mean, enc.std)
        val_set = TileDataset(self.store_path, self.data.val, px, None, enc.mean, enc.std)
        labels = [label for _, _, label in self.data.train]
        self.train_sampler = EpochSampler(
            len(train_set),
            weights=balanced_weights(labels) if d.balanced else None,
            num_samples=d.samples_per_epoch or len(train_set),
            global_batch=self.options.batch_size,
            rank=self.dist.rank,
            world_size=w,
            seed=self.cfg.seed,
        )
        val_sampler = EpochSampler(len(val_set), shuffle=False, rank=self.dist.rank, world_size=w)
        common = {
            "batch_size": batch,
            "num_workers": self.cfg.run.workers,
            "pin_memory": self.dist.device.type == "cuda",
            "worker_init_fn": _worker_init,
            "persistent_workers": self.cfg.run.workers > 0,
        }
        self.train_loader = DataLoader(train_set, sampler=self.train_sampler, drop_last=True, **common)
        self.val_loader = DataLoader(val_set, sampler=val_sampler, **common)

    # ---- the task protocol (histo.training.Task) ----------------------------------------------------
    def build_model(self) -> FeatureClassifier:
        """The encoder with a head for the store's classes, its network loaded from `--init` when given."""
        from pathology.encoders import load_weights

        m = self.cfg.model
        model = build_model(m.encoder, m.norm, len(self.data.classes), m.variant)
        if m.init:
            self.init_report = load_weights(model.features, m.init, m.entry)
        self.parameter_counts = parameter_counts(model)
        if self.dist.is_main:
            logger.info(counts_line(m.variant, self.parameter_counts))
        return model

    def batches_per_epoch(self) -> int:
        return len(self.train_loader)

    def batches(self, epoch: int) -> DataLoader:
        self.train_sampler.set_epoch(epoch)
        return self.train_loader

    def inputs(self, batch: Any, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = batch
        return x.to(device, non_blocking=True), y.to(device, non_blocking=True)

    def loss(self, logits: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        loss = F.cross_entropy(logits, y, label_smoothing=self.options.label_smoothing)
        with torch.no_grad():
            correct = (logits.argmax(1) == y).sum()
            stats = torch.stack([loss.detach() * len(y), correct, loss.new_full((), len(y))]).double()
        return loss, stats

    def train_metrics(self, sums: torch.Tensor) -> dict[str, float]:
        return {"train_loss": float(sums[0] / sums[2]), "train_acc": float(sums[1] / sums[2])}

    @torch.inference_mode()
    def validate(
        self, model: torch.nn.Module, forward: Callable[[torch.Tensor], torch.Tensor]
    ) -> dict[str, float]:
        """Tile-level loss/accuracy/macro-F1 and slide-level majority-vote accuracy, summed over ranks."""
        from histo.devices import all_reduce_sum

        device, c = self.dist.device, len(self.data.classes)
        slides = sorted({s for s, _, _ in self.data.val})
        slide_index = {s: i for i, s in enumerate(slides)}
        confusion = torch.zeros(c, c, dtype=torch.float64)
        votes = torch.zeros(len(slides), c, dtype=torch.float64)
        loss_sum = torch.zeros(1, dtype=torch.float64, device=device)
        model.eval()
        seen = list(self.val_loader.sampler)
        position = 0
        for x, y in self.val_loader:
            x, yd = self.inputs((x, y), device)
            logits = forward(x)
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
            all_reduce_sum(t.to(device)).cpu() for t in (confusion, votes, loss_sum)
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

    def model_record(
        self, model: torch.nn.Module, epoch: int, row: Mapping[str, Any]
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        m, init = self.cfg.model, self.init_report
        config = model_config(
            m.encoder, m.norm, m.variant, self.data.classes, m.px, self.data.data_hash,
            init_sha256=init["sha256"] if init else None, epoch=epoch, metrics=dict(row), init=init,
            parameters=self.parameter_counts, train_config=self.run_config,
        )  # fmt: skip
        return config, {}

    def summary(self) -> dict[str, Any]:
        return {
            "classes": self.data.classes,
            "n_train_tiles": len(self.data.train),
            "n_val_tiles": len(self.data.val),
            "train_patients": len(self.data.train_patients),
            "val_patients": len(self.data.val_patients),
            "skipped": self.data.skipped,
            "init": self.init_report,
            "encoder": self.cfg.model.encoder,
            "variant": self.cfg.model.variant,
            "parameters": self.parameter_counts,
            "data_hash": self.data.data_hash,
            **DEFINITIONS,
        }


def train_kimianet(
    store_path: str | Path,
    out_path: str | Path,
    config: TrainConfig | Mapping[str, Any] | None = None,
    stop_after: int | None = None,
) -> dict[str, Any]:
    """Train per `config` (a TrainConfig, None for the defaults, or a mapping over them) into `out_path`
    (files: `histo.training.output_paths`); works alone or as one process under torchrun. `stop_after` ends
    this call after that many epochs (a re-run continues). Returns the run summary."""
    from histo.training import train_distributed

    config = TrainConfig.coerce(config)
    return train_distributed(
        lambda dist: KimiaNetTask(store_path, config, dist), out_path, config.run, stop_after
    )
