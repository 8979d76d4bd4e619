"""scripts/norm_study.py: the not-trained rule, α-BN only where there are BN statistics, and the study CNN as a
task of the one training loop (`histo.training`)."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from histo.errors import HistoError

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def ns():
    spec = importlib.util.spec_from_file_location("norm_study", ROOT / "scripts/norm_study.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ARGS = SimpleNamespace(severities=[1, 2], seed=0, alpha=0.1)


def _domain(ns):
    return ns.Domain("he", "Toy", "accuracy", 0.25, "a constant class", {"rule": "toy"})


def _fake_study(ns, clean: dict[str, float]):
    """A study whose 'models' are one BN layer and whose clean score per norm is `clean` (corrupted: lower)."""

    def fit_norm(norm):
        model = nn.BatchNorm2d(2).eval()
        model.norm = norm
        return model, {"epochs": 3, "best": {"train_loss": 0.5}}

    def make_evaluate(model):
        score = clean[model.norm]
        return lambda corrupt: {"accuracy": score - (0.0 if corrupt(1.0, 0) == 1.0 else 0.1)}

    table = {"blur": lambda x, s, rng: x - s, "hue": lambda x, s, rng: x - s, "noop": lambda x, s, rng: x}
    return ns.study(_domain(ns), list(clean), fit_norm, make_evaluate, table, ARGS)


def test_threshold_is_half_way_from_chance_to_the_reference(ns):
    domain = _fake_study(ns, {"batch": 0.95, "group": 0.61, "rn_b": 0.59})
    assert domain.threshold == pytest.approx(0.25 + 0.5 * (0.95 - 0.25))
    trained = {m.norm: m.trained for m in domain.models}
    assert trained == {"batch": True, "group": True, "rn_b": False}
    graded = {r["model"] for r in domain.rows}
    assert graded == {"batch", "batch+aBN", "group"}  # rn_b: no grid; group: nothing for α-BN to calibrate


def test_report_shows_not_trained_instead_of_a_ce(ns):
    domain = _fake_study(ns, {"batch": 0.95, "rn_l": 0.30, "instance": 0.9})
    section = ns.domain_section(domain)
    row = next(line for line in section.splitlines() if line.startswith("| rn_l |"))
    assert "not trained" in row and "0.300" in row
    assert "| instance | 3 | 0.500 | 0.900 |" in section
    assert "rn_l" not in section.split("Most robust")[1]  # neither best anywhere nor in the literature check
    assert "(left out: noop)" in section  # BN loses nothing to it: its relative CE would be 0 / 0
    assert (
        "- noop: batch (CE 1.000; BN error 0.050, +0.000 over clean; left out of the starred means)"
        in section
    )


def test_untrained_reference_stops_the_study(ns):
    with pytest.raises(HistoError, match=r"reference `batch` model scored 0\.600, below 0\.625"):
        _fake_study(ns, {"batch": 0.60, "group": 0.9})


def test_epochs_for_parses_and_refuses_in_one_line(ns):
    import argparse

    assert ns.parse_epochs_for("rn_b=40,rn_l=3") == {"rn_b": 40, "rn_l": 3}
    with pytest.raises(argparse.ArgumentTypeError, match="'rn_b=0' is not NORM=EPOCHS"):
        ns.parse_epochs_for("rn_b=0")


def test_cnn_trains_through_the_training_loop_and_a_rerun_reuses_it(ns, tmp_path):
    args = SimpleNamespace(seed=0, he_size=16, he_train=8, overwrite=False)
    tiles, labels = ns.he_tiles(8, 16, seed=0)
    assert sorted(np.bincount(labels)) == [8] * 4 and len(set(labels[:8])) > 1  # shuffled classes
    task = ns.TileTask("rn_b", tiles, labels, 2, args)
    model, summary = ns.train(task, tmp_path / "rn_b.pt", args)
    assert summary["epochs_run"] == 2 and math.isfinite(summary["best"]["train_loss"])
    assert (tmp_path / "rn_b.metrics.csv").is_file()
    again, _ = ns.train(ns.TileTask("rn_b", tiles, labels, 2, args), tmp_path / "rn_b.pt", args)
    for a, b in zip(model.state_dict().values(), again.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    with pytest.raises(HistoError, match="a run with another config is here"):
        ns.train(ns.TileTask("rn_b", tiles, labels, 3, args), tmp_path / "rn_b.pt", args)


def test_the_script_runs_end_to_end_through_segmentations_own_interfaces(tmp_path):
    """The whole segmentation study at toy size: it calls segment train's task and histo robustness's
    evaluator, so a change of their signatures breaks this test rather than the next study run."""
    import os
    import subprocess
    import sys

    out = tmp_path / "study"
    cmd = [
        sys.executable,
        str(ROOT / "scripts/norm_study.py"),
        "--out",
        str(out),
        "--domains",
        "segmentation",
    ]
    cmd += ["--norms", "batch,group", "--mri-train", "2", "--mri-test", "1", "--mri-samples", "8"]
    cmd += ["--mri-epochs", "8", "--severities", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    report = (out / "report.md").read_text()
    rows = [line for line in report.splitlines() if line.startswith(("| batch |", "| group |"))]
    assert len(rows) == 2 and all("not trained" not in row for row in rows)
    assert (out / "segmentation" / "heatmap_dice_mean.png").stat().st_size > 1000
