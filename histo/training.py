"""The one training loop of histo (`fit`) and its pieces: schedule, RNG capture, resume checks, metrics, stopping.

A model family is a `Task` (its data, model, loss of a batch, validation and checkpoint contents); `fit` owns
the rest for every task: AdamW with a warm-up cosine schedule, gradient accumulation (DDP syncs only on the
stepping batch), gradient clipping, bf16 autocast and channels-last on CUDA, torchrun DDP with BN statistics
averaged over ranks, validation every `val_every` epochs, early stopping on the task's monitored metric, a
stop after `stop_after` epochs, the metrics CSV and curve PNG, atomic checkpoints (`histo.checkpoint`), a
refusal of non-finite training, and re-runs that resume exactly but never overwrite another run by accident.
Exact resume: each epoch reseeds the global generators from (seed, epoch, rank), and the training state holds
weights, optimizer, scheduler, early stopping and the generators' state.
"""

from __future__ import annotations

import contextlib
import csv
import io
import logging
import math
import os
import random
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from histo.config import flatten
from histo.errors import ConfigError, HistoError
from histo.io import atomic_write_text
from histo.training_config import LoopOptions

logger = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    """Seed python, numpy (legacy global) and torch (CPU and CUDA) generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def cosine_warmup_factor(step: int, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.0) -> float:
    """LR multiplier: linear warm-up from 0 to 1 over `warmup_steps`, then cosine decay to `min_lr_ratio`."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(total_steps - warmup_steps, 1)
    progress = min(max(step - warmup_steps, 0) / span, 1.0)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def cosine_warmup(
    optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.0
) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR stepping once per optimizer step with `cosine_warmup_factor`."""

    def factor(step: int) -> float:
        return cosine_warmup_factor(step, warmup_steps, total_steps, min_lr_ratio)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def rng_state() -> dict[str, Any]:
    """Every global RNG state, as tensors and ints so it survives a `weights_only` checkpoint."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore what `rng_state` captured."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    keys = n["keys"].numpy().astype(np.uint32)
    np.random.set_state((n["kind"], keys, n["pos"], n["has_gauss"], n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _comparable(config: Mapping[str, Any]) -> dict[str, Any]:
    """The dotted keys of a config, tuples as lists (as they come back from a checkpoint's JSON)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in flatten(config).items()}


def config_changes(
    saved: Mapping[str, Any],
    current: Mapping[str, Any],
    ignore: Iterable[str] = (),
    defaults: Mapping[str, Any] | None = None,
) -> str:
    """The keys that differ, as `key: old -> new, ...` ('' when none). Keys in `ignore` (dotted) may differ;
    a key `saved` lacks matches when `current` holds its value in `defaults` (a later release added it)."""
    a, b, d = _comparable(saved), _comparable(current), _comparable(defaults or {})
    skip = set(ignore) | {k for k in set(b) - set(a) if k in d and d[k] == b[k]}
    changed = sorted(k for k in set(a) | set(b) if k not in skip and a.get(k) != b.get(k))
    detail = ", ".join(f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in changed[:5])
    return detail + (f" (+{len(changed) - 5} more)" if len(changed) > 5 else "")


def check_same_config(
    saved: Mapping[str, Any],
    current: Mapping[str, Any],
    path: str | os.PathLike,
    ignore: Iterable[str] = (),
    defaults: Mapping[str, Any] | None = None,
) -> None:
    """Refuse to resume when the configuration changed (see `config_changes`)."""
    changed = config_changes(saved, current, ignore, defaults)
    if changed:
        raise HistoError(f"{path}: cannot --resume with a changed config: {changed}")


class MetricsLog:
    """Per-epoch metrics kept as rows, rewritten atomically to CSV (and a curve PNG) after each row."""

    def __init__(
        self, csv_path: str | os.PathLike, png_path: str | os.PathLike | None = None, x: str = "epoch"
    ):
        self.csv_path = Path(csv_path)
        self.png_path = Path(png_path) if png_path is not None else None
        self.x = x
        self.rows: list[dict[str, Any]] = self._read() if self.csv_path.is_file() else []

    def _read(self) -> list[dict[str, Any]]:
        with open(self.csv_path, newline="") as f:
            return [{k: _parse_number(v) for k, v in row.items()} for row in csv.DictReader(f)]

    def truncate(self, before_x: float) -> None:
        """Drop rows at or after `before_x` (a resumed run rewrites them)."""
        self.rows = [r for r in self.rows if r[self.x] < before_x]

    def log(self, row: Mapping[str, Any]) -> None:
        """Append a row, then rewrite the CSV and the PNG."""
        self.rows.append(dict(row))
        fields: list[str] = []
        for r in self.rows:
            fields += [k for k in r if k not in fields]
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=fields)
        writer.writeheader()
        writer.writerows(self.rows)
        atomic_write_text(self.csv_path, buffer.getvalue())
        if self.png_path is not None:
            from histo.plots import plot_curves

            plot_curves(self.rows, self.x, self.png_path, title=self.csv_path.stem)


def _parse_number(value: str) -> Any:
    for cast in (int, float):
        try:
            return cast(value)
        except (TypeError, ValueError):
            pass
    return value


class EarlyStopping:
    """Track the best value of a metric and stop after `patience` epochs without improvement."""

    def __init__(self, patience: int, mode: str = "max", min_delta: float = 0.0) -> None:
        if mode not in ("max", "min"):
            raise ValueError(f"mode must be 'max' or 'min', got {mode!r}")
        self.patience, self.mode, self.min_delta = patience, mode, min_delta
        self.best: float | None = None
        self.bad_epochs = 0

    def _better(self, value: float) -> bool:
        if self.best is None:
            return True
        if self.mode == "max":
            return value > self.best + self.min_delta
        return value < self.best - self.min_delta

    def step(self, value: float) -> bool:
        """Record this epoch's value; True when it is the best so far."""
        if self._better(value):
            self.best, self.bad_epochs = float(value), 0
            return True
        self.bad_epochs += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.patience > 0 and self.bad_epochs >= self.patience

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "bad_epochs": self.bad_epochs}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.best, self.bad_epochs = state["best"], int(state["bad_epochs"])


def accumulation_group(index: int, n_batches: int, accumulate: int) -> tuple[int, bool]:
    """For batch `index` of an epoch of `n_batches`: the size of its gradient-accumulation group (the last
    group may be short) and whether the optimizer steps after this batch."""
    start = index - index % accumulate
    size = min(accumulate, n_batches - start)
    return size, index + 1 == start + size


def gradient_sync(net: torch.nn.Module, step_now: bool) -> contextlib.AbstractContextManager:
    """DDP's `no_sync()` on batches that only accumulate (no all-reduce until the stepping batch)."""
    if step_now or not isinstance(net, torch.nn.parallel.DistributedDataParallel):
        return contextlib.nullcontext()
    return net.no_sync()


# ---- the loop -------------------------------------------------------------------------------------------

POSTFIX_EVERY = 20  # training batches between progress-bar loss updates (each one is a device sync)


class TrainingDiverged(HistoError):
    """A non-finite loss, gradient or model: training stops and nothing of the epoch is saved."""


def output_paths(out: str | os.PathLike) -> dict[str, Path]:
    """A run's files beside its best model OUT = STEM.pt (or STEM.pth, or STEM): STEM.last.pt (the training
    state for resuming), STEM.metrics.csv and STEM.curves.png."""
    out = Path(out)
    stem = out.name[: -len(out.suffix)] if out.suffix in (".pt", ".pth") else out.name
    return {
        "best": out,
        "last": out.with_name(f"{stem}.last.pt"),
        "csv": out.with_name(f"{stem}.metrics.csv"),
        "png": out.with_name(f"{stem}.curves.png"),
    }


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    """The global generators' seed for `epoch` on process `rank`: every draw of an epoch (dropout, worker
    seeds) then depends on (seed, epoch, rank) only, so ranks differ and a resumed epoch replays exactly."""
    return seed + 7919 * (epoch + 1) + 104729 * rank


def per_process_batch(batch_size: int, world_size: int) -> int:
    """The batch of one process when the global `batch_size` is split evenly over `world_size` processes."""
    if batch_size % world_size:
        raise HistoError(f"batch size {batch_size} is not divisible by {world_size} processes")
    return batch_size // world_size


class Task(Protocol):
    """A model family as `fit` trains it: its data, model, loss, validation and checkpoint contents."""

    seed: int
    options: LoopOptions  # the stage's loop section
    monitors: Mapping[str, str]  # validation metric -> "max" or "min" (options.monitor is one of them)
    has_validation: bool  # False: no validation data, every epoch's model is the best
    memory_format: torch.memory_format | None  # the channels-last format the network takes (None: none)
    model_kind: str  # histo.checkpoint kind of OUT
    state_kind: str  # histo.checkpoint kind of STEM.last.pt
    run_config: Mapping[str, Any]  # recorded with the run; resuming needs the same
    default_config: Mapping[str, Any]  # the recorded config of the defaults (for keys an older run lacks)
    resume_ignore: tuple[str, ...]  # recorded keys that may differ on resume
    n_stats: int  # length of the per-batch statistics `loss` returns

    def build_model(self) -> torch.nn.Module: ...

    def batches_per_epoch(self) -> int: ...

    def batches(self, epoch: int) -> Iterable[Any]:
        """This process's batches of `epoch` (a DataLoader whose sampler is set for the epoch)."""
        ...

    def inputs(self, batch: Any, device: torch.device) -> tuple[torch.Tensor, Any]:
        """(network input, target) of a batch on `device`."""
        ...

    def loss(self, output: torch.Tensor, target: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss, float64 statistics summed over the epoch) of a batch from the float32 network output."""
        ...

    def train_metrics(self, sums: torch.Tensor) -> dict[str, float]:
        """`train_loss` (and more) from the epoch's statistics summed over batches and processes."""
        ...

    def validate(self, model: torch.nn.Module, forward: Callable[[torch.Tensor], torch.Tensor]) -> dict:
        """Validation metrics of the model (summed over processes); `forward` runs it as training does."""
        ...

    def model_record(
        self, model: torch.nn.Module, epoch: int, row: Mapping[str, Any]
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """(config, extra) of the best-model checkpoint after `epoch` with metrics `row`."""
        ...

    def summary(self) -> dict[str, Any]:
        """The task's own fields of the run summary (data sizes, classes, ...)."""
        ...


class Run:
    """One training run of a task (one process of a possibly distributed job); `fit` drives it."""

    def __init__(self, task: Task, out: str | os.PathLike, dist: Any) -> None:
        o = task.options
        if o.monitor not in task.monitors:
            raise ValueError(
                f"monitor {o.monitor!r} is not a metric of this task: {', '.join(task.monitors)}"
            )
        self.task, self.dist, self.device, self.paths = task, dist, dist.device, output_paths(out)
        cuda = self.device.type == "cuda"
        self.memory_format = task.memory_format if cuda and o.channels_last else None
        seed_everything(task.seed)
        self.model = task.build_model().to(self.device)
        if cuda:
            torch.backends.cudnn.benchmark = True  # fixed input sizes: let cuDNN pick the fastest kernels
        if self.memory_format is not None:
            self.model.to(memory_format=self.memory_format)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=o.lr, weight_decay=o.weight_decay)
        steps = math.ceil(task.batches_per_epoch() / o.accumulate)
        self.scheduler = cosine_warmup(
            self.optimizer, round(o.warmup_epochs * steps), o.epochs * steps, o.min_lr_ratio
        )
        self.net: torch.nn.Module = self.model
        if dist.distributed:
            ids = [self.device.index] if cuda else None
            self.net = torch.nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
        self.stopper = EarlyStopping(o.patience, mode=task.monitors[o.monitor])
        self.epoch, self.best_epoch, self.finished = 0, None, False

    # ---- start: fresh, resumed or refused ------------------------------------------------------------
    def start(self, resume: bool = False, overwrite: bool = False) -> None:
        """Fresh run, resumed run or refusal, from what is at OUT (every process decides alike).

        A training state at STEM.last.pt is resumed when its recorded config matches (a finished run then
        does nothing) and refused otherwise; `overwrite` starts over instead; `resume` requires the state.
        """
        last, best = self.paths["last"], self.paths["best"]
        if resume and overwrite:
            raise ConfigError("run.resume and run.overwrite exclude each other (--resume, --overwrite)")
        if overwrite:
            self._remove_outputs()
        elif last.is_file():
            self._resume(last, explicit=resume)
        elif resume:
            raise HistoError(f"{last}: nothing to resume (no training state); run without --resume to start")
        elif best.exists():
            raise HistoError(
                f"{best}: exists without its training state {last.name} (another file, or a run killed in "
                "its first epoch); pass --overwrite to replace it or choose another --out"
            )

    def _remove_outputs(self) -> None:
        """--overwrite: drop the old run's files first, so that a crash cannot leave a mix of two runs."""
        from histo.devices import barrier

        barrier()
        if self.dist.is_main:
            for path in self.paths.values():
                path.unlink(missing_ok=True)
        barrier()

    def _resume(self, last: Path, explicit: bool) -> None:
        """Continue from the training state at `last` (same recorded config required)."""
        from histo import checkpoint

        t = self.task
        state = checkpoint.load(last, t.state_kind)
        changed = config_changes(state.config, t.run_config, t.resume_ignore, t.default_config)
        if changed and explicit:
            raise HistoError(f"{last}: cannot --resume with a changed config: {changed}")
        if changed:
            raise HistoError(
                f"{last}: a run with another config is here ({changed}); re-run with its config to resume "
                "it, pass --overwrite to start over, or choose another --out"
            )
        extra = state.extra
        self.model.load_state_dict(state.weights)
        self.optimizer.load_state_dict(extra["optimizer"])
        self.scheduler.load_state_dict(extra["scheduler"])
        self.stopper.load_state_dict(extra["early_stopping"])
        if "rng" in extra:  # U-Net states written before this loop hold none (their epochs were seeded)
            set_rng_state(extra["rng"])
        self.epoch = int(extra["epoch"])
        self.best_epoch = extra.get("best_epoch")  # None where an older U-Net state did not record it
        done = self.epoch >= t.options.epochs or self.stopper.should_stop
        self.finished = bool(extra.get("finished", done))
        what = "finished; nothing to train" if self.finished else "resuming"
        logger.info("%s: run at epoch %d of %d, %s", last, self.epoch, t.options.epochs, what)

    # ---- one epoch -----------------------------------------------------------------------------------
    def forward(self, net: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The network's output as training computes it: channels-last input and bf16 autocast on CUDA."""
        from histo.devices import autocast

        if self.memory_format is not None:
            x = x.contiguous(memory_format=self.memory_format)
        with autocast(self.device, self.task.options.amp):
            return net(x)

    def train_epoch(self, epoch: int) -> dict[str, float]:
        """One pass over the task's batches: accumulate, (DDP-)sync on the stepping batch, clip, step.

        No host sync per batch (statistics stay on the device); non-finite losses and gradient norms are
        counted on the device and refused at the end of the epoch, before anything is saved.
        """
        from tqdm import tqdm

        from histo.devices import all_reduce_sum, average_buffers

        t, o, dist = self.task, self.task.options, self.dist
        seed_everything(epoch_seed(t.seed, epoch, dist.rank))
        n = t.batches_per_epoch()
        loader = t.batches(epoch)
        self.net.train()
        self.optimizer.zero_grad(set_to_none=True)
        sums = torch.zeros(t.n_stats, dtype=torch.float64, device=self.device)
        # batches with a non-finite loss, steps with a non-finite gradient norm; first batch of each (1-based)
        trouble = torch.zeros(4, dtype=torch.int64, device=self.device)
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{o.epochs}", disable=not dist.is_main, leave=False)
        for i, batch in enumerate(bar):
            x, target = t.inputs(batch, self.device)
            group, step_now = accumulation_group(i, n, o.accumulate)
            with gradient_sync(self.net, step_now):
                loss, stats = t.loss(self.forward(self.net, x).float(), target)
                (loss / group).backward()
            sums += stats
            _count_nonfinite(trouble, 0, loss.detach(), i)
            if step_now:
                _count_nonfinite(trouble, 1, self._clip_gradients(), i)
                self.optimizer.step()
                self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
            if dist.is_main and (i + 1) % POSTFIX_EVERY == 0:
                bar.set_postfix(
                    loss=f"{t.train_metrics(sums)['train_loss']:.4f}"
                )  # one sync every few batches
        average_buffers(self.model)  # one set of BN statistics on every rank before validating and saving
        counts = all_reduce_sum(trouble[:2].clone()).cpu()
        if counts.any():
            self._diverged(epoch, counts, trouble.cpu())
        return t.train_metrics(all_reduce_sum(sums).cpu())

    def _clip_gradients(self) -> torch.Tensor:
        """The global gradient norm (for the non-finite check), clipped to `grad_clip` when it is > 0."""
        grads = [p.grad for p in self.params if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads)
        if self.task.options.grad_clip > 0:
            torch.nn.utils.clip_grads_with_norm_(self.params, self.task.options.grad_clip, norm)
        return norm

    def _diverged(self, epoch: int, counts: torch.Tensor, local: torch.Tensor) -> None:
        """Stop with one line: where training turned non-finite and what is kept."""
        what = []
        for k, name in enumerate(("loss", "gradient")):
            if counts[k]:
                where = f" first at batch {int(local[2 + k])}" if local[2 + k] > 0 else ""
                what.append(f"non-finite {name} in {int(counts[k])} batches{where}")
        kept = (
            f"{self.paths['last'].name} and {self.paths['best'].name} still hold epoch {self.epoch}"
            if self.epoch
            else "nothing was saved"
        )
        raise TrainingDiverged(
            f"{self.paths['best']}: training diverged in epoch {epoch + 1} ({'; '.join(what)}); {kept}. "
            "Check the inputs for NaN/Inf or blank images, or lower the learning rate"
        )

    def _check_finite_model(self) -> None:
        """Refuse to save a model with a non-finite weight or statistic (one device sync per epoch)."""
        floats = {k: v for k, v in self.model.state_dict().items() if v.is_floating_point()}
        if floats and not bool(torch.stack([v.isfinite().all() for v in floats.values()]).all()):
            bad = next(k for k, v in floats.items() if not v.isfinite().all())
            raise TrainingDiverged(
                f"{self.paths['best']}: training diverged in epoch {self.epoch} ({bad} holds NaN or Inf); "
                "nothing of this epoch is saved"
            )

    # ---- the run -------------------------------------------------------------------------------------
    def train(self, stop_after: int | None = None) -> dict[str, Any]:
        """Epochs until the last, early stopping, or `stop_after` epochs of this call; -> the summary."""
        from histo.devices import barrier

        t, o = self.task, self.task.options
        log = MetricsLog(self.paths["csv"], self.paths["png"]) if self.dist.is_main else None
        if log is not None:
            log.truncate(self.epoch + 1)
        ran = 0
        while not self.finished and (stop_after is None or ran < stop_after):
            started = time.perf_counter()
            row: dict[str, Any] = {"epoch": self.epoch + 1, **self.train_epoch(self.epoch)}
            self.epoch += 1
            ran += 1
            validated = t.has_validation and (self.epoch % o.val_every == 0 or self.epoch == o.epochs)
            if validated:
                row |= t.validate(self.model, lambda x: self.forward(self.model, x))
            row["lr"] = self.optimizer.param_groups[0]["lr"]
            row["seconds"] = round(time.perf_counter() - started, 2)
            improved = self.stopper.step(row[o.monitor]) if validated else not t.has_validation
            self.best_epoch = self.epoch if improved else self.best_epoch
            self.finished = self.stopper.should_stop or self.epoch >= o.epochs
            self._check_finite_model()
            if log is not None:
                self._save(row, improved)
                log.log(row)
                logger.info(_epoch_line(row, improved))
            barrier()
        return self.summary(log)

    def _save(self, row: Mapping[str, Any], improved: bool) -> None:
        """Atomic checkpoints: the best model (when improved), then the full training state (always)."""
        from histo import checkpoint

        t = self.task
        if improved:
            config, extra = t.model_record(self.model, self.epoch, row)
            version = checkpoint.KINDS[t.model_kind].version
            checkpoint.save(
                self.paths["best"], t.model_kind, version, self.model.state_dict(), config, **extra
            )
        checkpoint.save(
            self.paths["last"], t.state_kind, checkpoint.KINDS[t.state_kind].version,
            self.model.state_dict(), dict(t.run_config),
            optimizer=self.optimizer.state_dict(), scheduler=self.scheduler.state_dict(), rng=rng_state(),
            epoch=self.epoch, early_stopping=self.stopper.state_dict(), best_epoch=self.best_epoch,
            finished=self.finished,
        )  # fmt: skip

    def summary(self, log: MetricsLog | None) -> dict[str, Any]:
        """Outputs, epochs, the best epoch and its metrics (rank 0: the others have no rows), and the task's."""
        o = self.task.options
        rows = log.rows if log is not None else []
        return {
            "out": str(self.paths["best"]),
            "last_state": str(self.paths["last"]),
            "metrics_csv": str(self.paths["csv"]),
            "curve_png": str(self.paths["png"]),
            "epochs": o.epochs,
            "epochs_run": self.epoch,
            "stopped_early": self.stopper.should_stop,
            "monitor": o.monitor,
            "best_epoch": self.best_epoch,
            f"best_{o.monitor}": self.stopper.best,
            "best": next((r for r in rows if r["epoch"] == self.best_epoch), {}),
            "world_size": self.dist.world_size,
            "rank": self.dist.rank,
            "device": str(self.device),
            **self.task.summary(),
        }


def _count_nonfinite(trouble: torch.Tensor, k: int, value: torch.Tensor, batch: int) -> None:
    """On the device: count a non-finite `value` in trouble[k] and keep its first batch in trouble[2 + k]."""
    bad = ~torch.isfinite(value)
    first = trouble[2 + k]
    trouble[2 + k] = torch.where(bad & (first == 0), batch + 1, first)
    trouble[k] += bad.long()


def _epoch_line(row: Mapping[str, Any], improved: bool) -> str:
    """`epoch 3: train loss 0.4121 | val_dice_mean 0.712 ... (best)`: a metrics row as one log line."""
    val = " ".join(f"{k} {v:.4f}" for k, v in row.items() if k.startswith("val_"))
    return (
        f"epoch {row['epoch']}: train loss {row['train_loss']:.4f}"
        + (f" | {val}" if val else "")
        + (" (best)" if improved else "")
    )


def fit(
    task: Task,
    out: str | os.PathLike,
    dist: Any,
    *,
    resume: bool = False,
    overwrite: bool = False,
    stop_after: int | None = None,
) -> dict[str, Any]:
    """Train `task` into OUT (see `output_paths`, `Run.start`); -> the run summary. `stop_after` ends this
    call after that many epochs (time-limited jobs: a re-run continues)."""
    run = Run(task, out, dist)
    run.start(resume, overwrite)
    return run.train(stop_after)


def train_distributed(
    make_task: Callable[[Any], Task], out: str | os.PathLike, run: Any, stop_after: int | None = None
) -> dict[str, Any]:
    """`fit` in this process of a torchrun job (or alone): join it, build the task for this rank, leave it.

    `run` is the stage's run options (device, resume, overwrite)."""
    from histo.devices import cleanup_distributed, init_distributed

    dist = init_distributed(run.device)
    try:
        return fit(
            make_task(dist), out, dist, resume=run.resume, overwrite=run.overwrite, stop_after=stop_after
        )
    finally:
        cleanup_distributed()
