"""Pieces shared by the KimiaNet and U-Net trainers: schedule, RNG capture, resume checks, metrics, stopping.

Checkpoints are written and read by `histo.checkpoint`.
"""

from __future__ import annotations

import contextlib
import csv
import io
import math
import os
import random
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from histo.errors import HistoError
from histo.io import atomic_write_text


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


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in d.items():
        if isinstance(value, Mapping):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = list(value) if isinstance(value, tuple) else value
    return out


def check_same_config(
    saved: Mapping[str, Any], current: Mapping[str, Any], path: str | os.PathLike, ignore: Iterable[str] = ()
) -> None:
    """Refuse to resume when the configuration changed (keys in `ignore`, dotted, may differ)."""
    a, b = _flatten(saved), _flatten(current)
    skip = set(ignore)
    changed = sorted(k for k in set(a) | set(b) if k not in skip and a.get(k) != b.get(k))
    if changed:
        detail = ", ".join(f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in changed[:5])
        more = f" (+{len(changed) - 5} more)" if len(changed) > 5 else ""
        raise HistoError(f"{path}: cannot --resume with a changed config: {detail}{more}")


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
