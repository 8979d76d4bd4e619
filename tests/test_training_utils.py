"""Shared trainer pieces: schedule shape, RNG round trip, resume config check, metrics log."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch

from histo import checkpoint, training
from histo.errors import HistoError


def test_cosine_warmup_factor_matches_formula():
    warm, total = 4, 20
    for step in range(total + 3):
        got = training.cosine_warmup_factor(step, warm, total, min_lr_ratio=0.1)
        if step < warm:
            want = (step + 1) / warm
        else:
            progress = min((step - warm) / (total - warm), 1.0)
            want = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))
        assert got == pytest.approx(want, abs=1e-12)
    assert training.cosine_warmup_factor(total, warm, total) == pytest.approx(0.0, abs=1e-12)


def test_scheduler_drives_optimizer_lr():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=2.0)
    sched = training.cosine_warmup(opt, warmup_steps=2, total_steps=10)
    lrs = []
    for _ in range(4):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:2] == [pytest.approx(1.0), pytest.approx(2.0)]
    assert lrs[2] > lrs[3]


def test_rng_state_round_trip_through_weights_only_checkpoint(tmp_path):
    training.seed_everything(3)
    state = training.rng_state()
    checkpoint.save(tmp_path / "c.pt", "kimianet-train-state", 1, {}, {}, rng=state)
    first = (random.random(), np.random.rand(), torch.rand(1).item())
    training.seed_everything(99)
    training.set_rng_state(checkpoint.load(tmp_path / "c.pt", "kimianet-train-state").extra["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == first


def test_check_same_config_lists_changed_keys():
    training.check_same_config({"a": 1, "b": {"c": 2}}, {"a": 1, "b": {"c": 2}}, "x.pt")
    training.check_same_config({"epochs": 1}, {"epochs": 5}, "x.pt", ignore=["epochs"])
    with pytest.raises(HistoError, match=r"x.pt: cannot --resume.*b.c: 2 -> 3"):
        training.check_same_config({"a": 1, "b": {"c": 2}}, {"a": 1, "b": {"c": 3}}, "x.pt")


def test_metrics_log_rewrites_csv_and_png_and_resumes(tmp_path):
    log = training.MetricsLog(tmp_path / "m.csv", tmp_path / "m.png")
    for epoch in range(3):
        log.log({"epoch": epoch, "train_loss": 1.0 / (epoch + 1), "val_acc": 0.5 + 0.1 * epoch})
    assert (tmp_path / "m.png").stat().st_size > 1000
    again = training.MetricsLog(tmp_path / "m.csv")
    assert [r["epoch"] for r in again.rows] == [0, 1, 2]
    assert again.rows[1]["train_loss"] == pytest.approx(0.5)
    again.truncate(before_x=1)
    assert [r["epoch"] for r in again.rows] == [0]


def test_early_stopping_counts_epochs_without_improvement():
    stop = training.EarlyStopping(patience=2, mode="max")
    assert [stop.step(v) for v in (0.5, 0.6, 0.6, 0.55)] == [True, True, False, False]
    assert stop.should_stop and stop.best == 0.6
    restored = training.EarlyStopping(patience=2)
    restored.load_state_dict(stop.state_dict())
    assert restored.should_stop


def test_frozen_running_stats_is_reentrant():
    from histo.norms import frozen_running_stats, make_norm, updates_stats

    bn = make_norm("batch", 3, spatial_dims=1).train()
    x = torch.randn(4, 3, 5) * 2 + 1
    with frozen_running_stats(bn):
        with frozen_running_stats(bn):
            pass
        assert not updates_stats(bn), "leaving the inner context must not unfreeze the outer one"
        bn(x)
    assert torch.equal(bn.running_mean, torch.zeros(3)) and int(bn.num_batches_tracked) == 0
    assert bn.momentum == 0.1 and updates_stats(bn)
    bn(x)
    assert not torch.equal(bn.running_mean, torch.zeros(3))


@pytest.mark.parametrize(("n_batches", "accumulate"), [(7, 3), (6, 3), (5, 1), (2, 4)])
def test_accumulation_groups_cover_every_batch_once(n_batches, accumulate):
    groups = [list(range(s, min(s + accumulate, n_batches))) for s in range(0, n_batches, accumulate)]
    for group in groups:
        for i in group:
            assert training.accumulation_group(i, n_batches, accumulate) == (len(group), i == group[-1])


def test_gradient_sync_is_a_no_op_outside_ddp():
    net = torch.nn.Linear(2, 2)
    with training.gradient_sync(net, step_now=False):
        net(torch.ones(1, 2)).sum().backward()
    assert net.weight.grad is not None
