"""Segmentation training: loss definition, validation scored as `segment eval`, exact resume, re-runs that
never clobber, DDP equivalence, and a few CPU minutes of training that must segment held-out synthetic cases
(whole tumour Dice >= 0.8)."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO

import segmentation.train as seg_train
from histo import checkpoint
from histo.config import flatten, load_config
from histo.devices import DistInfo
from histo.errors import ConfigError, HistoError
from histo.training import Run
from segmentation.config import SegmentConfig
from segmentation.data import find_cases, load_case
from segmentation.infer import load_model, predict_volume
from segmentation.label_schemes import labels_to_regions, regions_to_labels
from segmentation.metrics import dice
from segmentation.splits import fold_cases, patient_id, split_cases
from segmentation.synthetic import make_cases
from segmentation.train import (
    SegLoss,
    SegmentTask,
    build_model,
    regions_to_classes,
    train_segmenter,
    validation_scores,
)


def tiny_config(**overrides) -> SegmentConfig:
    base = {
        "run.device": "cpu",
        "model.channels": [4, 8],
        "model.blocks_per_level": 1,
        "model.expansion": 1,
        "model.dropout": 0.2,
        "data.roi": [16, 16, 16],
        "run.cache": True,
        "data.val_fraction": 0.34,
        "train.epochs": 2,
        "train.samples_per_epoch": 4,
        "train.batch_size": 1,
        "train.accumulate": 2,
        "train.warmup_epochs": 0.5,
        "infer.overlap": 0.0,
    }
    return load_config(SegmentConfig, overrides={**base, **overrides})


@pytest.fixture(scope="module")
def tiny_cases(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tiny")
    make_cases(root, 3, shape=(24, 24, 24), seed=11)
    return root


def test_region_loss_is_soft_dice_plus_bce():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 5, 4, 3, dtype=torch.float64)
    target = (torch.rand(2, 3, 5, 4, 3) > 0.6).double()
    target[1, 2] = 0  # an empty channel contributes Dice loss 1 (smooth_nr = 0) and trains through BCE
    p = torch.sigmoid(logits)
    dice_terms = [
        1 - 2 * (p[n, c] * target[n, c]).sum() / (p[n, c].sum() + target[n, c].sum() + 1e-5)
        for n in range(2)
        for c in range(3)
    ]
    bce = -(target * torch.log(p) + (1 - target) * torch.log(1 - p)).mean()
    expected = torch.stack(dice_terms).mean() + bce
    torch.testing.assert_close(SegLoss("regions")(logits, target), expected, rtol=1e-6, atol=1e-6)


def test_regions_to_classes_inverts_label_conversion():
    seg = np.random.default_rng(0).choice([0, 1, 2, 4], size=(6, 5, 4))
    regions = torch.from_numpy(labels_to_regions(seg, "2021")).float()[None]
    classes = regions_to_classes(regions, "2021")[0, 0].numpy()
    assert np.array_equal(classes, np.select([seg == 1, seg == 2, seg == 4], [1, 2, 3], 0))


def test_split_is_by_case_and_seeded(tiny_cases):
    cases = find_cases(tiny_cases)
    train, val = split_cases(cases, 0.34, seed=0)
    assert len(val) == 1 and len(train) == 2 and not {c.case_id for c in train} & {c.case_id for c in val}
    assert split_cases(cases, 0.34, seed=0) == (train, val)


CPU = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def test_validation_loads_each_case_once_without_cache(tiny_cases, monkeypatch):
    config = tiny_config(**{"run.cache": False})
    cases = find_cases(tiny_cases)[:2]
    loads: list[str] = []
    monkeypatch.setattr(seg_train, "load_case", lambda case: loads.append(case.case_id) or load_case(case))
    cache: dict = {}
    out = validation_scores(build_model(config, "2021"), cases, config, CPU, cache)
    assert sorted(loads) == sorted(c.case_id for c in cases) and not cache
    assert 0.0 <= out["val_dice_mean"] <= 1.0


def test_validation_hd95_is_the_mean_of_per_case_hd95_in_ras_spacing(tiny_cases):
    import nibabel as nib

    from segmentation.metrics import region_metrics

    config = tiny_config(**{"train.val_hd95": True})
    cases, model = find_cases(tiny_cases)[:2], build_model(config, "2021")
    out = validation_scores(model, cases, config, CPU, {})
    plain = validation_scores(model, cases, tiny_config(), CPU, {})
    assert set(plain) < set(out) and all(out[k] == v for k, v in plain.items())
    reference = []
    for case in cases:  # independent spacing: nibabel's closest canonical (RAS) image
        image, brain, regions, _, _ = load_case(case)
        zooms = nib.as_closest_canonical(nib.load(case.images["flair"])).header.get_zooms()[:3]
        prob = predict_volume(model, image, roi=[16, 16, 16], overlap=0.0, brain_mask=brain)
        nested = labels_to_regions(
            regions_to_labels(prob >= 0.5, case.scheme), case.scheme
        )  # as segment eval
        reference.append(region_metrics(nested, regions.astype(bool), zooms))
    for r in ("TC", "WT", "ET"):
        assert out[f"val_hd95_{r}"] == pytest.approx(np.mean([m[f"hd95_{r}"] for m in reference]))


def test_epoch_losses_stay_on_the_device_and_sum_every_batch(tiny_cases, tmp_path, monkeypatch):
    """No host sync per step: the loop sums [loss sum, batches] on the device without calling Tensor.item."""
    import histo.training

    config = tiny_config(**{"train.accumulate": 2})
    task = SegmentTask(tiny_cases, config, CPU)
    run = Run(task, tmp_path / "m.pt", CPU)
    batches = [
        {
            "image": torch.randn(1, 4, 16, 16, 16),
            "label": (torch.rand(1, 3, 16, 16, 16) > 0.7).float(),
            "mask": torch.ones(1, 1, 16, 16, 16),
        }
        for _ in range(3)
    ]
    seen: list[float] = []
    loss_fn, summed = task.loss_fn, []

    def recording_loss(logits, regions):
        loss = loss_fn(logits, regions)
        seen.append(float(loss.detach()))
        return loss

    def recording_metrics(sums):
        summed.append(sums.clone())
        return SegmentTask.train_metrics(task, sums)

    monkeypatch.setattr(task, "loss_fn", recording_loss)
    monkeypatch.setattr(task, "batches", lambda epoch: batches)
    monkeypatch.setattr(task, "batches_per_epoch", lambda: 3)
    monkeypatch.setattr(task, "train_metrics", recording_metrics)
    items: list[str] = []  # .item() calls made by the loop or the task (the CPU optimizer makes its own)
    real_item = torch.Tensor.item

    def item(self):
        caller = sys._getframe(1).f_code.co_filename
        if caller in (seg_train.__file__, histo.training.__file__):
            items.append(caller)
        return real_item(self)

    monkeypatch.setattr(torch.Tensor, "item", item)
    metrics = run.train_epoch(0)
    monkeypatch.setattr(torch.Tensor, "item", real_item)
    assert not items
    sums = summed[-1]
    assert sums.dtype == torch.float64 and sums[1].item() == 3
    assert sums[0].item() == pytest.approx(sum(seen), rel=1e-6)
    assert metrics["train_loss"] == pytest.approx(sum(seen) / 3, rel=1e-6)


def _rows(path: Path) -> list[dict]:
    with open(path) as f:
        return [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(f)]


def test_resume_reproduces_the_uninterrupted_run(tiny_cases, tmp_path):
    config = tiny_config()
    full = train_segmenter(tiny_cases, tmp_path / "a" / "model.pt", config)
    assert full["epochs_run"] == 2 and full["n_val"] == 1
    part = train_segmenter(tiny_cases, tmp_path / "b" / "model.pt", config, stop_after=1)
    assert part["epochs_run"] == 1
    resumed = train_segmenter(tiny_cases, tmp_path / "b" / "model.pt", config.updated({"run.resume": True}))
    assert resumed["epochs_run"] == 2
    a, b = (
        checkpoint.load(tmp_path / "a" / "model.last.pt", "unet3d-train-state"),
        checkpoint.load(tmp_path / "b" / "model.last.pt", "unet3d-train-state"),
    )
    for key, value in a.weights.items():
        assert torch.equal(value, b.weights[key]), key
    assert a.extra["optimizer"]["state"].keys() == b.extra["optimizer"]["state"].keys()
    assert a.extra["scheduler"] == b.extra["scheduler"] and a.extra["epoch"] == b.extra["epoch"] == 2
    rows_a, rows_b = _rows(tmp_path / "a" / "model.metrics.csv"), _rows(tmp_path / "b" / "model.metrics.csv")
    assert rows_a == rows_b and [r["epoch"] for r in rows_a] == ["1", "2"]
    # the second epoch really differs from the first (so equality above is not trivial)
    first = train_segmenter(tiny_cases, tmp_path / "c" / "model.pt", config, stop_after=1)
    assert first["epochs_run"] == 1
    c = checkpoint.load(tmp_path / "c" / "model.last.pt", "unet3d-train-state")
    assert any(not torch.equal(v, c.weights[k]) for k, v in a.weights.items())
    assert (tmp_path / "a" / "model.curves.png").stat().st_size > 1000
    best = checkpoint.load(tmp_path / "a" / "model.pt", "unet3d")
    assert set(best.extra["val"]) == {"val_dice_TC", "val_dice_WT", "val_dice_ET", "val_dice_mean"}


def test_rerun_resumes_the_same_config_and_never_clobbers_another(tiny_cases, tmp_path):
    """A re-run without --resume continues a run of the same config (a finished one: nothing is trained or
    rewritten); another config is refused in one line naming the difference; --overwrite starts over."""
    config = tiny_config(**{"train.epochs": 2, "train.samples_per_epoch": 2})
    out = tmp_path / "model.pt"
    assert train_segmenter(tiny_cases, out, config, stop_after=1)["epochs_run"] == 1
    assert train_segmenter(tiny_cases, out, config)["epochs_run"] == 2
    files = [out, *(tmp_path / f"model.{s}" for s in ("last.pt", "metrics.csv", "curves.png"))]
    stamps = [p.stat().st_mtime_ns for p in files]
    assert train_segmenter(tiny_cases, out, config)["epochs_run"] == 2
    changed = config.updated({"train.lr": 0.5})
    with pytest.raises(
        HistoError, match=r"another config is here \(train\.lr: 0\.001 -> 0\.5\).*--overwrite"
    ):
        train_segmenter(tiny_cases, out, changed)
    with pytest.raises(HistoError, match=r"cannot --resume with a changed config: train\.lr"):
        train_segmenter(tiny_cases, out, changed.updated({"run.resume": True}))
    assert [p.stat().st_mtime_ns for p in files] == stamps
    with pytest.raises(ConfigError, match="exclude each other"):
        train_segmenter(tiny_cases, out, config.updated({"run.resume": True, "run.overwrite": True}))
    fresh = train_segmenter(tiny_cases, out, changed.updated({"run.overwrite": True}), stop_after=1)
    assert fresh["epochs_run"] == 1 and _rows(files[2])[-1]["epoch"] == "1" and len(_rows(files[2])) == 1
    assert checkpoint.load(files[1], "unet3d-train-state").config["train"]["lr"] == 0.5
    with pytest.raises(HistoError, match="nothing to resume"):
        train_segmenter(tiny_cases, tmp_path / "other.pt", config.updated({"run.resume": True}))


def test_non_finite_loss_stops_training_and_keeps_the_last_good_checkpoint(tiny_cases, tmp_path, monkeypatch):
    """A NaN loss in epoch 2 (4 batches per epoch): one-line error, nothing non-finite written, epoch 1 kept."""
    forward, calls = SegLoss.forward, []

    def poisoned(self, logits, regions):
        calls.append(1)
        loss = forward(self, logits, regions)
        return loss * float("nan") if len(calls) > 4 else loss

    monkeypatch.setattr(SegLoss, "forward", poisoned)
    out = tmp_path / "model.pt"
    with pytest.raises(
        HistoError, match=r"training diverged in epoch 2 \(non-finite loss in 4 batches first at batch 1"
    ):
        train_segmenter(tiny_cases, out, tiny_config())
    state = checkpoint.load(tmp_path / "model.last.pt", "unet3d-train-state")
    assert state.extra["epoch"] == 1
    for weights in (state.weights, checkpoint.load(out, "unet3d").weights):
        assert all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point())
    assert [r["epoch"] for r in _rows(tmp_path / "model.metrics.csv")] == ["1"]


def test_validation_robustness_and_segment_eval_agree_on_one_prediction(tiny_cases, tmp_path, monkeypatch):
    """One prediction whose raw channels do not nest (ET outside TC, TC outside WT) gets the same Dice from
    training validation, the robustness study and `segment eval`: all score the label map."""
    import json

    import segmentation.infer
    from histo.robustness_config import RobustnessConfig
    from segmentation.evaluate import evaluate_predictions
    from segmentation.infer import predict_cases, save_model
    from segmentation.robustness import Cases, make_evaluate

    case = find_cases(tiny_cases)[0]
    _, _, regions, _, _ = load_case(case)
    prob = regions.astype(np.float32)
    shifted = np.roll(regions, 2, axis=1)
    prob[2] = np.maximum(prob[2], shifted[2])  # ET beyond TC
    prob[0] = np.maximum(prob[0], np.roll(regions[0], -3, axis=2))  # TC beyond WT
    monkeypatch.setattr(segmentation.infer, "predict_volume", lambda *a, **k: prob)
    config = tiny_config()
    model = build_model(config, "2021")

    validation = validation_scores(model, [case], config, CPU, {})
    settings = RobustnessConfig.coerce(None).segment.model_copy(update={"roi": (16, 16, 16)})
    robustness = make_evaluate(model, Cases(case.folder.parent, max_cases=1), settings, "cpu", "2021")(
        lambda raw, i: raw
    )
    save_model(tmp_path / "m.pt", model, config.recorded())
    predict_cases(tmp_path / "m.pt", [case.folder], tmp_path / "pred", config)
    evaluate_predictions(tmp_path / "pred", case.folder.parent, tmp_path / "eval", config, progress=False)
    report = json.loads((tmp_path / "eval" / "summary.json").read_text())
    evaluated = next(o["detail"] for o in report["outcomes"] if o["id"] == case.case_id)
    raw = [dice(prob[i] >= 0.5, regions[i]) for i in range(3)]
    for r in ("TC", "WT", "ET"):
        assert validation[f"val_dice_{r}"] == robustness[f"dice_{r}"] == evaluated[f"legacy_dice_{r}"], r
    assert [validation[f"val_dice_{r}"] for r in ("TC", "WT")] != raw[:2]  # the nesting changed the score


def test_label_smoothing_smooths_the_bce_targets_not_the_dice():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 4, 4, 4, dtype=torch.float64)
    target = (torch.rand(2, 3, 4, 4, 4) > 0.6).double()
    eps = 0.2
    want = SegLoss("regions").dice(logits, target) + torch.nn.functional.binary_cross_entropy_with_logits(
        logits, target * (1 - eps) + eps / 2
    )
    torch.testing.assert_close(SegLoss("regions", eps)(logits, target), want)
    seg = np.random.default_rng(0).choice([0, 1, 2, 4], size=(2, 4, 4, 4))
    nested = torch.from_numpy(np.stack([labels_to_regions(s, "2021") for s in seg])).double()
    classes = regions_to_classes(nested, "2021")[:, 0].long()
    four = torch.randn(2, 4, 4, 4, 4, dtype=torch.float64)
    dice_only = SegLoss("labels", scheme="2021").dice_ce.dice(four, classes[:, None])
    ce = torch.nn.functional.cross_entropy(four, classes, label_smoothing=eps)
    torch.testing.assert_close(SegLoss("labels", eps, "2021")(four, nested), dice_only + ce)


DDP_SCRIPT = """
import sys, torch
from histo.config import load_config
from segmentation.config import SegmentConfig
from segmentation.train import train_segmenter
overrides = dict(arg.split("=", 1) for arg in sys.argv[3:])
config = load_config(SegmentConfig, overrides={k: eval(v) for k, v in overrides.items()})
train_segmenter(sys.argv[1], sys.argv[2], config)
"""


@pytest.mark.slow
def test_ddp_two_processes_match_one_process_with_double_batch(tiny_cases, tmp_path):
    """gloo DDP with the global batch 2 (1 per rank) averages gradients exactly like one process with it."""
    common = {"model.dropout": 0.0, "data.val_fraction": 0.0, "train.epochs": 1, "train.accumulate": 1}
    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT)
    args = [
        f"{k}={v!r}"
        for k, v in {**flatten(tiny_config(**common).model_dump()), "train.batch_size": 2}.items()
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    subprocess.run(
        [*torchrun, str(script), str(tiny_cases), str(tmp_path / "ddp.pt"), *args],
        check=True,
        env=env,
        cwd=REPO,
    )
    train_segmenter(tiny_cases, tmp_path / "one.pt", tiny_config(**common, **{"train.batch_size": 2}))
    a, b = checkpoint.load(tmp_path / "ddp.pt", "unet3d"), checkpoint.load(tmp_path / "one.pt", "unet3d")
    for key, value in a.weights.items():
        torch.testing.assert_close(value, b.weights[key], rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_short_training_segments_held_out_synthetic_cases(tmp_path):
    start = time.time()
    make_cases(tmp_path / "train", 12, shape=(48, 48, 48), seed=1)
    make_cases(tmp_path / "test", 4, shape=(48, 48, 48), seed=99)
    config = load_config(
        SegmentConfig,
        overrides={
            "run.device": "cpu",
            "model.channels": [8, 16, 32],
            "model.blocks_per_level": 1,
            "model.expansion": 2,
            "data.roi": [24, 24, 24],
            "data.val_fraction": 0.25,
            "train.epochs": 8,
            "train.samples_per_epoch": 32,
            "train.batch_size": 2,
            "train.accumulate": 1,
            "train.lr": 5e-3,
            "train.warmup_epochs": 0.3,
        },
    )
    summary = train_segmenter(tmp_path / "train", tmp_path / "model.pt", config)
    model, saved = load_model(tmp_path / "model.pt")
    assert saved["model"]["reversible"] is True
    scores = []
    for case in find_cases(tmp_path / "test"):
        image, brain, regions, _, _ = load_case(case)
        # windows of the training crop size: instance-norm statistics then match training
        pred = predict_volume(model, image, roi=(24, 24, 24), overlap=0.5, brain_mask=brain) >= 0.5
        scores.append([dice(pred[i], regions[i]) for i in range(3)])
    tc, wt, et = np.mean(scores, axis=0)
    print(
        f"held-out Dice TC {tc:.3f} WT {wt:.3f} ET {et:.3f}; best val {summary['best_val_dice_mean']:.3f}; "
        f"{time.time() - start:.0f} s"
    )
    assert wt >= 0.8


def _case(case_id: str):
    from segmentation.data import Case

    return Case(case_id, {}, None, "2023")


def test_folds_are_patient_level_seeded_and_cover_every_patient_once():
    ids = [f"BraTS-GLI-{p:05d}-{t:03d}" for p in range(7) for t in range(2)] + ["other_case"]
    cases = [_case(i) for i in ids]
    held_out = []
    for fold in range(3):
        train, val = fold_cases(cases, 3, fold, seed=4)
        assert sorted(c.case_id for c in train + val) == sorted(ids)
        patients = {patient_id(c.case_id) for c in val}
        assert not patients & {patient_id(c.case_id) for c in train}  # timepoints stay together
        held_out.append(patients)
        assert fold_cases(cases, 3, fold, seed=4) == (train, val)
    assert set().union(*held_out) == {f"BraTS-GLI-{p:05d}" for p in range(7)} | {"other_case"}
    assert sum(len(h) for h in held_out) == 8 and {len(h) for h in held_out} == {2, 3}
    assert patient_id("BraTS-MEN-RT-0012-1") == "BraTS-MEN-RT-0012"
    for folds, fold in ((1, 0), (3, 3)):
        with pytest.raises(HistoError, match=r"data\.folds must be >= 2"):
            fold_cases(cases, folds, fold, seed=0)
    with pytest.raises(HistoError, match="exceeds the 8 patients"):
        fold_cases(cases, 9, 0, seed=0)


def test_the_config_refuses_a_fold_outside_its_folds_and_an_unknown_scheme():
    refused = {
        r"data\.fold: 1 needs data\.folds \(--folds K\)": {"data.fold": 1},
        r"data\.folds: needs 0 \(no folds, val_fraction\) or K >= 2 folds, got 1": {"data.folds": 1},
        r"data\.fold: must be below data\.folds \(3\), got 3": {"data.folds": 3, "data.fold": 3},
        r"data\.labels: input should be 'auto', '2021', '2023', 'gli'": {"data.labels": "brats"},
    }
    for reason, keys in refused.items():
        with pytest.raises(ConfigError, match=reason):
            tiny_config(**keys)
    assert tiny_config(**{"data.folds": 3, "data.fold": 2}).data.fold == 2


def test_fold_and_scheme_are_recorded_in_the_checkpoint(tiny_cases, tmp_path):
    config = tiny_config(**{"data.folds": 3, "data.fold": 2, "train.epochs": 1, "train.samples_per_epoch": 2})
    summary = train_segmenter(tiny_cases, tmp_path / "model.pt", config)
    expected = fold_cases(find_cases(tiny_cases), 3, 2, seed=config.seed)[1]
    assert summary["val_cases"] == [c.case_id for c in expected] and summary["labels"] == "2021"
    ckpt = checkpoint.load(tmp_path / "model.pt", "unet3d")
    assert (
        ckpt.extra["split"] == summary["split"]
        and summary["split"]["folds"] == 3
        and summary["split"]["fold"] == 2
    )
    assert ckpt.config["train_config"]["data"]["labels"] == "2021" and ckpt.config["task"]["regions"] == [
        "TC",
        "WT",
        "ET",
    ]


def test_a_run_recorded_before_label_schemes_resumes_and_records_the_scheme(tiny_cases):
    """A state of a release before data.labels/folds/fold detected the 2018-2021 or 2023 scheme as `auto`
    does: its config still matches; an explicit other scheme does not."""
    from histo.training import config_changes

    task = SegmentTask(tiny_cases, tiny_config(), CPU)
    assert task.scheme == "2021" and task.run_config["data"]["labels"] == "2021"
    old = task.run_config | {
        "data": {k: v for k, v in task.run_config["data"].items() if k not in ("labels", "folds", "fold")}
    }
    assert config_changes(old, task.run_config, task.resume_ignore, task.default_config) == ""
    gli = SegmentTask(tiny_cases, tiny_config(**{"data.labels": "gli"}), CPU)
    assert (
        config_changes(old, gli.run_config, gli.resume_ignore, gli.default_config)
        == "data.labels: None -> 'gli'"
    )
    assert set(gli.monitors) == {"val_dice_mean", *(f"val_dice_{r}" for r in ("TC", "WT", "ET", "RC"))}
    with pytest.raises(ConfigError, match=r"train\.monitor: val_dice_RC is not a metric of scheme 2021"):
        SegmentTask(tiny_cases, tiny_config(**{"train.monitor": "val_dice_RC"}), CPU)
