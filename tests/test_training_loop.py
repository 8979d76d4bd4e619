"""The one training loop (`histo.training.fit`) on a toy task: accumulation equals a big batch, clipping,
validation schedule, early stopping in both directions, exact resume, refusal of non-finite training,
re-runs that never overwrite, DDP with 2 gloo processes, and the file naming."""

from __future__ import annotations

import csv
import os
import socket
from pathlib import Path
from types import SimpleNamespace
from typing import Any, ClassVar

import pytest
import torch

from histo import checkpoint
from histo.devices import DistInfo
from histo.errors import HistoError
from histo.training import (
    Run,
    TrainingDiverged,
    config_changes,
    fit,
    output_paths,
    per_process_batch,
    train_distributed,
)
from histo.training_config import LoopOptions

CPU = DistInfo(0, 1, 0, torch.device("cpu"))
OPTIONS = {
    "epochs": 3, "batch_size": 2, "accumulate": 1, "lr": 0.05, "weight_decay": 0.0, "warmup_epochs": 0.0,
    "min_lr_ratio": 0.0, "grad_clip": 0.0, "label_smoothing": 0.0, "amp": True, "channels_last": True,
    "val_every": 1, "patience": 0, "monitor": "val_score",
}  # fmt: skip


class Toy:
    """Linear regression on 8 fixed samples (optional dropout) whose validation replays `scores`."""

    monitors: ClassVar = {"val_score": "max", "val_loss": "min"}
    memory_format = None
    model_kind = "kimianet"  # any kind histo.checkpoint knows: the loop only passes it through
    state_kind = "kimianet-train-state"
    resume_ignore = ()
    has_validation = True
    n_stats = 2

    def __init__(self, dist: DistInfo = CPU, scores=(0.1, 0.2, 0.3, 0.4, 0.5), dropout=0.0, **options):
        self.dist, self.seed, self.scores, self.dropout = dist, 0, list(scores), dropout
        self.options = LoopOptions(**{**OPTIONS, **options})
        self.run_config = {"optim": self.options.model_dump(), "dropout": dropout}
        self.default_config = {}
        g = torch.Generator().manual_seed(1)
        self.x = torch.randn(8, 3, generator=g)
        self.y = self.x @ torch.tensor([1.0, -2.0, 0.5]) + 0.1 * torch.randn(8, generator=g)
        self.validations = 0

    def build_model(self) -> torch.nn.Module:
        return torch.nn.Sequential(torch.nn.Dropout(self.dropout), torch.nn.Linear(3, 1))

    def batches_per_epoch(self) -> int:
        return 8 // self.options.batch_size

    def batches(self, epoch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Global batches in a per-epoch order; this rank takes its share of each."""
        order = torch.randperm(8, generator=torch.Generator().manual_seed(epoch))
        b, w, r = self.options.batch_size, self.dist.world_size, self.dist.rank
        mine = per_process_batch(b, w)
        return [
            (
                self.x[order[i + r * mine : i + (r + 1) * mine]],
                self.y[order[i + r * mine : i + (r + 1) * mine]],
            )
            for i in range(0, 8, b)
        ]

    def inputs(self, batch, device):
        return batch[0].to(device), batch[1].to(device)

    def loss(self, output, target):
        loss = torch.nn.functional.mse_loss(output[:, 0], target)
        return loss, torch.stack([loss.detach().double(), loss.new_ones((), dtype=torch.float64)])

    def train_metrics(self, sums):
        return {"train_loss": float(sums[0] / sums[1])}

    def validate(self, model, forward) -> dict[str, float]:
        score = self.scores[self.validations]
        self.validations += 1
        return {"val_score": score, "val_loss": -score}

    def model_record(self, model, epoch, row) -> tuple[dict[str, Any], dict[str, Any]]:
        return {"epoch": epoch}, {"row": dict(row)}

    def summary(self) -> dict[str, Any]:
        return {"toy": True}


def _grads_at_steps(run: Run) -> list[list[torch.Tensor]]:
    """Record every parameter gradient when the optimizer steps."""
    seen: list[list[torch.Tensor]] = []
    run.optimizer.register_step_pre_hook(lambda *_: seen.append([p.grad.clone() for p in run.params]))
    return seen


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return [{k: v for k, v in r.items() if k != "seconds"} for r in csv.DictReader(f)]


def test_accumulation_equals_one_big_batch(tmp_path):
    """Two accumulated batches of 2 give the gradient of one batch of 4 (Adam's step hides a scale error,
    so the gradients at each step are compared)."""
    small = Run(Toy(batch_size=2, accumulate=2, epochs=1), tmp_path / "a.pt", CPU)
    big = Run(Toy(batch_size=4, accumulate=1, epochs=1), tmp_path / "b.pt", CPU)
    assert len(small.task.batches(0)) == 4 and len(big.task.batches(0)) == 2  # one order, two batchings
    seen_small, seen_big = _grads_at_steps(small), _grads_at_steps(big)
    small.train_epoch(0)
    big.train_epoch(0)
    assert len(seen_small) == len(seen_big) == 2
    for a, b in zip(seen_small, seen_big, strict=True):
        for ga, gb in zip(a, b, strict=True):
            torch.testing.assert_close(ga, gb)
    for pa, pb in zip(small.params, big.params, strict=True):
        torch.testing.assert_close(pa, pb)


def test_gradient_clipping_bounds_the_global_norm_at_each_step(tmp_path):
    norms = {}
    for clip in (0.0, 1e-3):
        run = Run(Toy(grad_clip=clip, epochs=1), tmp_path / f"{clip}.pt", CPU)
        seen = _grads_at_steps(run)
        run.train_epoch(0)
        norms[clip] = [float(torch.linalg.vector_norm(torch.cat([g.flatten() for g in s]))) for s in seen]
    assert len(norms[1e-3]) == 4 and all(n <= 1e-3 * (1 + 1e-4) for n in norms[1e-3])
    assert all(n > 1e-2 for n in norms[0.0])


@pytest.mark.parametrize("monitor", ["val_score", "val_loss"])
def test_early_stopping_follows_the_monitor_direction(tmp_path, monitor):
    """val_score is maximised and val_loss (= -score) minimised: both pick epoch 2 and stop after 4."""
    task = Toy(scores=(0.5, 0.7, 0.6, 0.65, 0.8), epochs=5, patience=2, monitor=monitor)
    summary = fit(task, tmp_path / "m.pt", CPU)
    assert summary["epochs_run"] == 4 and summary["stopped_early"] and summary["best_epoch"] == 2
    assert summary[f"best_{monitor}"] == pytest.approx(0.7 if monitor == "val_score" else -0.7)
    assert checkpoint.load(tmp_path / "m.pt", "kimianet").config == {"epoch": 2}
    assert summary["best"]["val_score"] == 0.7 and summary["toy"] is True
    state = checkpoint.load(tmp_path / "m.last.pt", "kimianet-train-state").extra
    assert state["finished"] is True and state["best_epoch"] == 2
    assert (
        fit(Toy(scores=(), epochs=5, patience=2, monitor=monitor), tmp_path / "m.pt", CPU)["epochs_run"] == 4
    )


def test_validation_every_n_epochs_and_after_the_last(tmp_path):
    summary = fit(Toy(scores=(0.3, 0.2), epochs=3, val_every=2), tmp_path / "m.pt", CPU)
    rows = _rows(tmp_path / "m.metrics.csv")
    assert [r["val_score"] for r in rows] == ["", "0.3", "0.2"] and summary["best_epoch"] == 2
    assert list(rows[0]) == ["epoch", "train_loss", "lr", "val_score", "val_loss"]


def test_stop_after_then_rerun_replays_the_uninterrupted_run_exactly(tmp_path):
    """Dropout draws depend on (seed, epoch, rank) only, and the state holds the rest: bit-exact."""
    full = fit(Toy(dropout=0.5, epochs=3), tmp_path / "full.pt", CPU)
    part = fit(Toy(dropout=0.5, epochs=3), tmp_path / "part.pt", CPU, stop_after=1)
    assert part["epochs_run"] == 1 and full["epochs_run"] == 3
    torch.manual_seed(99)  # a fresh process would not share the first call's generator position
    resumed = fit(Toy(dropout=0.5, epochs=3, scores=(0.2, 0.3)), tmp_path / "part.pt", CPU)
    assert resumed["epochs_run"] == 3
    a, b = (checkpoint.load(tmp_path / f"{n}.last.pt", "kimianet-train-state") for n in ("full", "part"))
    for key, value in a.weights.items():
        assert torch.equal(value, b.weights[key]), key
    assert _rows(tmp_path / "full.metrics.csv") == _rows(tmp_path / "part.metrics.csv")
    fit(Toy(dropout=0.5, epochs=3), tmp_path / "one.pt", CPU, stop_after=1)  # later epochs change the weights
    one = checkpoint.load(tmp_path / "one.last.pt", "kimianet-train-state").weights
    assert not torch.equal(one["1.weight"], a.weights["1.weight"])


class NanLoss(Toy):
    def loss(self, output, target):
        loss, stats = super().loss(output, target)
        return (loss * float("nan"), stats) if self.validations >= 1 else (loss, stats)


class InfWeights(Toy):
    def validate(self, model, forward):
        if self.validations == 1:
            with torch.no_grad():
                model[1].bias.fill_(float("inf"))
        return super().validate(model, forward)


@pytest.mark.parametrize(
    ("task", "message"),
    [
        (
            NanLoss,
            r"diverged in epoch 2 \(non-finite loss in 4 batches first at batch 1; non-finite gradient",
        ),
        (InfWeights, r"diverged in epoch 2 \(1\.bias holds NaN or Inf\)"),
    ],
)
def test_non_finite_training_is_refused_before_anything_is_saved(tmp_path, task, message):
    with pytest.raises(TrainingDiverged, match=message):
        fit(task(epochs=3), tmp_path / "m.pt", CPU)
    state = checkpoint.load(tmp_path / "m.last.pt", "kimianet-train-state")
    assert state.extra["epoch"] == 1 and checkpoint.load(tmp_path / "m.pt", "kimianet").config == {"epoch": 1}
    assert all(torch.isfinite(v).all() for v in state.weights.values())
    assert [r["epoch"] for r in _rows(tmp_path / "m.metrics.csv")] == ["1"]


def test_a_nan_loss_in_the_first_epoch_saves_nothing(tmp_path):
    class Always(Toy):
        def loss(self, output, target):
            loss, stats = super().loss(output, target)
            return loss * float("nan"), stats

    with pytest.raises(TrainingDiverged, match="nothing was saved"):
        fit(Always(), tmp_path / "m.pt", CPU)
    assert not any(p.exists() for p in output_paths(tmp_path / "m.pt").values())


def test_rerun_resumes_refuses_another_config_and_overwrites_only_when_asked(tmp_path):
    fit(Toy(epochs=2), tmp_path / "m.pt", CPU)
    stamp = (tmp_path / "m.last.pt").stat().st_mtime_ns
    assert fit(Toy(epochs=2, scores=()), tmp_path / "m.pt", CPU)["epochs_run"] == 2
    assert (tmp_path / "m.last.pt").stat().st_mtime_ns == stamp
    with pytest.raises(
        HistoError, match=r"m.last.pt: a run with another config is here \(optim.lr: 0.05 -> 0.1\)"
    ):
        fit(Toy(epochs=2, lr=0.1), tmp_path / "m.pt", CPU)
    assert fit(Toy(epochs=1, lr=0.1), tmp_path / "m.pt", CPU, overwrite=True)["epochs_run"] == 1
    assert [r["epoch"] for r in _rows(tmp_path / "m.metrics.csv")] == ["1"]


def test_config_changes_name_keys_and_accept_keys_added_with_their_default():
    saved, current = {"optim": {"lr": 1, "epochs": 2}}, {"optim": {"lr": 1, "epochs": 3, "grad_clip": 0.0}}
    defaults = {"optim": {"lr": 1, "epochs": 5, "grad_clip": 0.0}}
    assert config_changes(saved, current, defaults=defaults) == "optim.epochs: 2 -> 3"
    assert config_changes(saved, {"optim": {"lr": 1, "epochs": 2, "grad_clip": 1.0}}, defaults=defaults) == (
        "optim.grad_clip: None -> 1.0"
    )
    assert config_changes(saved, current, ignore=["optim.epochs"], defaults=defaults) == ""


def test_output_paths_share_one_naming():
    for out in ("run/m.pt", "run/m.pth", "run/m"):
        assert {k: p.name for k, p in output_paths(out).items()} == {
            "best": Path(out).name, "last": "m.last.pt", "csv": "m.metrics.csv", "png": "m.curves.png",
        }  # fmt: skip
    assert per_process_batch(8, 2) == 4
    with pytest.raises(HistoError, match="batch size 3 is not divisible by 2 processes"):
        per_process_batch(3, 2)


def test_forward_uses_the_channels_last_format_when_set(tmp_path):
    """On CUDA with channels_last the loop converts inputs (the CPU keeps the default format)."""
    run = Run(Toy(), tmp_path / "m.pt", CPU)
    assert run.memory_format is None  # CPU: unchanged
    seen = []
    run.memory_format = torch.channels_last
    run.forward(
        lambda x: seen.append(x.is_contiguous(memory_format=torch.channels_last)) or x, torch.ones(2, 3, 4, 5)
    )
    assert seen == [True]


# ---- DDP -------------------------------------------------------------------------------------------------
def _ddp_worker(rank: int, port: int, out: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))  # fmt: skip
    torch.set_num_threads(1)
    run = SimpleNamespace(device="cpu", resume=False, overwrite=False)
    summary = train_distributed(lambda dist: Toy(dist, batch_size=4, epochs=2), out, run)
    assert summary["world_size"] == 2 and summary["rank"] == rank


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_processes_match_one_with_the_same_global_batch(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_ddp_worker, args=(_free_port(), str(tmp_path / "two.pt")), nprocs=2, join=True)
    fit(Toy(batch_size=4, epochs=2), tmp_path / "one.pt", CPU)
    one, two = (checkpoint.load(tmp_path / f"{n}.last.pt", "kimianet-train-state") for n in ("one", "two"))
    for key, value in one.weights.items():
        torch.testing.assert_close(two.weights[key], value)
    rows1, rows2 = _rows(tmp_path / "one.metrics.csv"), _rows(tmp_path / "two.metrics.csv")
    assert [r["epoch"] for r in rows2] == ["1", "2"]
    for r1, r2 in zip(rows1, rows2, strict=True):
        assert float(r1["train_loss"]) == pytest.approx(float(r2["train_loss"]), rel=1e-5)
