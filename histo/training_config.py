"""The options every trainer's loop reads (`histo.training.fit`), shared by `histo train` and `segment train`.

Each stage's section derives from `LoopOptions` and adds its own keys (and the metrics its `monitor` may name);
the defaults stay in the stage's YAML (`optim:` of train.yaml, `train:` of segment.yaml).
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from histo.config import Count, Device, Fraction, NonNegative, Positive, PositiveInt, RunOptions, Section


class LoopOptions(Section):
    """Schedule, optimizer, precision and stopping options of the shared training loop."""

    epochs: PositiveInt
    batch_size: PositiveInt
    accumulate: PositiveInt  # forward batches per optimizer step
    lr: Positive  # AdamW
    weight_decay: NonNegative
    warmup_epochs: NonNegative  # linear warm-up, then cosine decay to min_lr_ratio * lr (per optimizer step)
    min_lr_ratio: Fraction
    grad_clip: NonNegative  # max global gradient norm; 0 disables
    label_smoothing: Annotated[float, Field(ge=0, lt=1)]  # of the loss's cross-entropy term
    amp: bool  # bf16 autocast on CUDA (no effect on CPU)
    channels_last: bool  # channels-last memory format on CUDA
    val_every: PositiveInt  # validate every N epochs (and after the last)
    patience: Count  # early stopping: validations without improvement of `monitor`; 0 disables
    monitor: str  # the validation metric that picks the best checkpoint (each stage lists its choices)


class LoopRun(RunOptions):
    """The run options every trainer has: where, whether to resume, whether to start over; and workers."""

    device: Device
    resume: bool
    overwrite: bool
    workers: Count
