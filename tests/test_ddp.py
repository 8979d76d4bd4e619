"""torchrun DDP (gloo, 2 CPU processes) gives the validation metrics and weights of 1 process, same global batch."""

from __future__ import annotations

import csv
import datetime
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_kimianet_train import PX, cohort, make_store

from histo import checkpoint

BIN = Path(sys.executable).parent


def _train(args: list[str], out: Path, nproc: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launcher = (
        [str(BIN / "torchrun"), "--standalone", f"--nproc-per-node={nproc}"]
        if nproc > 1
        else [sys.executable]
    )
    cmd = [*launcher, str(BIN / "histo"), "train", *args, "--out", str(out), "--json"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


def _val_rows(path: Path) -> list[dict[str, float]]:
    with open(path, newline="") as f:
        return [
            {k: float(v) for k, v in r.items() if k.startswith(("val_", "train_"))} for r in csv.DictReader(f)
        ]


def test_two_gloo_processes_match_one(tmp_path):
    store = make_store(tmp_path / "t.zarr", cohort(tiles=8))
    cfg = tmp_path / "c.yaml"
    cfg.write_text("data:\n  samples_per_epoch: 16\n  val_fraction: 0.34\noptim:\n  warmup_epochs: 0.5\n")
    args = ["--tiles", str(store), "--encoder", "cbr-tiny", "--norm", "group", "--variant", "scratch",
            "--input-px", str(PX), "--epochs", "2", "--batch-size", "4", "--device", "cpu", "--workers", "0",
            "--config", str(cfg)]  # fmt: skip
    one = _train(args, tmp_path / "one.pt", nproc=1)
    two = _train(args, tmp_path / "two.pt", nproc=2)
    assert one["world_size"] == 1 and two["world_size"] == 2
    rows1, rows2 = _val_rows(tmp_path / "one.metrics.csv"), _val_rows(tmp_path / "two.metrics.csv")
    assert len(rows1) == len(rows2) == 2
    for r1, r2 in zip(rows1, rows2, strict=True):
        for key in ("val_acc", "val_macro_f1", "val_slide_acc"):
            assert r1[key] == r2[key], key
        for key in ("val_loss", "train_loss"):
            assert r1[key] == pytest.approx(r2[key], rel=1e-4), key
    w1 = checkpoint.load(tmp_path / "one.last.pt", "kimianet-train-state").weights
    w2 = checkpoint.load(tmp_path / "two.last.pt", "kimianet-train-state").weights
    for k, v in w1.items():
        torch.testing.assert_close(w2[k], v, atol=1e-4, rtol=1e-4)


def _average_worker(rank: int, init_file: str, out: str) -> None:
    import torch.distributed as dist

    from histo.devices import average_buffers

    timeout = datetime.timedelta(seconds=120)  # a stuck collective raises instead of hanging the test
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=2, timeout=timeout
    )
    bn = torch.nn.BatchNorm2d(3)
    bn.running_mean.fill_(float(rank + 1))  # rank 0: 1, rank 1: 2
    bn.running_var.fill_(float(4 * rank + 1))  # rank 0: 1, rank 1: 5
    bn.num_batches_tracked.fill_(7)
    n = average_buffers(bn)
    torch.save({"n": n, **bn.state_dict()}, f"{out}.{rank}")
    dist.destroy_process_group()


def test_average_buffers_gives_every_rank_the_mean_statistics(tmp_path):
    """Ranks end an epoch with BN statistics of their own batches; average_buffers makes them one model."""
    import torch.multiprocessing as mp

    from histo.devices import average_buffers

    assert average_buffers(torch.nn.BatchNorm2d(3)) == 0  # single process: nothing to do
    mp.spawn(
        _average_worker, args=(str(tmp_path / "init"), str(tmp_path / "bn")), nprocs=2, join=True, daemon=True
    )
    for rank in (0, 1):
        got = torch.load(tmp_path / f"bn.{rank}", weights_only=True)
        assert got["n"] == 2  # running_mean and running_var, not the integer counter
        assert torch.equal(got["running_mean"], torch.full((3,), 1.5))
        assert torch.equal(got["running_var"], torch.full((3,), 3.0))
        assert int(got["num_batches_tracked"]) == 7
