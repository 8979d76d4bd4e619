"""`histo segment train|predict|eval` end to end on tiny synthetic cases, and their one-line errors."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from click.testing import CliRunner
from conftest import SHARED_DATA

from histo import checkpoint
from histo.cli import main
from segmentation.synthetic import make_cases

BRATS = SHARED_DATA / "brats"


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict[str, Path]:
    """One tiny training run through the CLI (rn_b norms, the non-reversible twin)."""
    tmp = tmp_path_factory.mktemp("cli")
    data = tmp / "cases"
    make_cases(data, 3, shape=(16, 16, 16), seed=2)
    config = tmp / "small.yaml"
    config.write_text(
        "model: {blocks_per_level: 1, expansion: 1}\n"
        "data: {val_fraction: 0.34}\n"
        "train: {samples_per_epoch: 2, accumulate: 1}\n"
        "infer: {overlap: 0.0, overlay_slices: 1}\n"
    )
    args = ["segment", "train", "--data", str(data), "--out", str(tmp / "model.pt"), "--channels", "4,8"]
    args += ["--roi", "16,16,16", "--epochs", "1", "--norm", "rn_b", "--no-reversible", "--device", "cpu"]
    result = CliRunner().invoke(main, [*args, "--config", str(config), "--json"])
    assert result.exit_code == 0, result.output
    return {
        "tmp": tmp,
        "data": data,
        "config": config,
        "model": tmp / "model.pt",
        "summary": json.loads(result.stdout),
    }


def test_train_writes_checkpoints_and_metrics(trained):
    summary = trained["summary"]
    assert summary["epochs_run"] == 1 and summary["n_train"] == 2 and summary["n_val"] == 1
    config = checkpoint.load(trained["model"], "unet3d").config
    network, train_config = config["network"], config["train_config"]
    assert network["norm"] == "rn_b" and network["reversible"] is False
    assert network["channels"] == [4, 8] and train_config["data"]["roi"] == [16, 16, 16]
    assert Path(summary["last_state"]).is_file() and Path(summary["curve_png"]).is_file()
    with open(summary["metrics_csv"]) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 1 and 0.0 <= float(rows[0]["val_dice_WT"]) <= 1.0


def _predict_args(trained: dict, *inputs: Path, out: Path) -> list[str]:
    """`histo segment predict` of `inputs` (case folders) with the trained model into `out`."""
    return ["segment", "predict", "--model", str(trained["model"]), *map(str, inputs), "--out", str(out)]


def test_predict_then_eval(trained, tmp_path):
    runner = CliRunner()
    out = tmp_path / "pred"
    args = _predict_args(trained, trained["data"], out=out)
    result = runner.invoke(main, [*args, "--device", "cpu", "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["settings"]["roi"] == [16, 16, 16]  # [] in the config: the training crop
    assert [r["status"] for r in summary["outcomes"]] == ["done"] * 3
    for case in sorted(trained["data"].iterdir()):
        written, source = nib.load(out / f"{case.name}.nii.gz"), nib.load(next(case.glob("*_flair.nii.gz")))
        assert written.shape == source.shape and np.array_equal(written.affine, source.affine)
    again = runner.invoke(main, [*args, "--device", "cpu", "--json"])  # a re-run keeps finished outputs
    kept = json.loads(again.stdout)["outcomes"]
    assert [(r["status"], r["reason"]) for r in kept] == [("skipped", "already done")] * 3
    other = runner.invoke(main, [*args, "--device", "cpu", "--overlap", "0.25"])  # would mix two settings
    assert (
        other.exit_code == 2
        and "holds results of other settings (overlap); use a new --out or --overwrite" in (other.output)
    )
    redone = runner.invoke(main, [*args, "--device", "cpu", "--overlap", "0.25", "--overwrite", "--json"])
    assert [r["status"] for r in json.loads(redone.stdout)["outcomes"]] == ["done"] * 3
    assert json.loads((out / "settings.json").read_text())["overlap"] == 0.25

    result = runner.invoke(
        main, ["segment", "eval", "--pred", str(out), "--data", str(trained["data"]), "--json"]
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["counts"]["done"] == 3 and "MONAI" in summary["hd95_definitions"]["legacy"]
    assert 0.0 <= summary["metrics"]["legacy_dice_WT"]["mean"] <= 1.0
    with open(out / "metrics.csv") as f:
        assert len(list(csv.DictReader(f))) == 3

    (out / "synth_001.nii.gz").unlink()
    result = runner.invoke(main, ["segment", "eval", "--pred", str(out), "--data", str(trained["data"])])
    assert result.exit_code == 1 and "failed: synth_001: no prediction synth_001.nii.gz" in result.output


def test_predict_records_a_case_with_missing_modalities(trained, tmp_path):
    deepmedic = BRATS / "deepmedic_brats2013_pat0005_1"
    case = sorted(trained["data"].iterdir())[0]
    args = _predict_args(trained, deepmedic, case, out=tmp_path / "p")
    result = CliRunner().invoke(main, [*args, "--device", "cpu", "--json"])
    assert result.exit_code == 1
    records = {r["id"]: r for r in json.loads(result.stdout)["outcomes"]}
    assert records[case.name]["status"] == "done"
    assert records["deepmedic_brats2013_pat0005_1"]["status"] == "failed"
    assert "missing modality t1, t2" in records["deepmedic_brats2013_pat0005_1"]["reason"]


def test_one_line_errors(trained, tmp_path):
    runner = CliRunner()
    bad = tmp_path / "bad"
    shutil.copytree(trained["data"], bad)
    next((bad / "synth_000").glob("*_t2.nii.gz")).unlink()
    result = runner.invoke(main, ["segment", "train", "--data", str(bad), "--out", str(tmp_path / "m.pt")])
    assert (
        result.exit_code == 2
        and result.output.startswith("error: ")
        and "missing modality t2" in result.output
    )
    assert len(result.output.strip().splitlines()) == 1

    args = ["segment", "train", "--data", str(trained["data"]), "--out", str(trained["model"])]
    result = runner.invoke(main, [*args, "--config", str(trained["config"])])
    assert result.exit_code == 2 and "a run with another config is here (data.roi:" in result.output
    assert "pass --overwrite to start over" in result.output and len(result.output.strip().splitlines()) == 1

    result = runner.invoke(
        main, ["segment", "train", "--data", str(trained["data"]), "--out", "x.pt", "--roi", "16,16"]
    )
    assert result.exit_code == 2 and "error: --roi: data.roi: too few values, got [16, 16]" in result.output

    result = runner.invoke(
        main, ["segment", "predict", "--model", str(tmp_path / "none.pt"), str(bad), "--out", str(tmp_path)]
    )
    assert result.exit_code == 2 and "none.pt: checkpoint not found" in result.output


def test_overlap_outside_its_range_is_a_usage_error(trained, tmp_path):
    case = sorted(trained["data"].iterdir())[0]
    args = _predict_args(trained, case, out=tmp_path / "p")
    result = CliRunner().invoke(main, [*args, "--overlap", "1.0", "--device", "cpu"])
    assert (
        result.exit_code == 2
        and "error: --overlap: infer.overlap: input should be less than 1" in result.output
    )
    assert not (tmp_path / "p").exists()


def test_a_window_the_model_cannot_take_is_refused_before_settings_are_written(trained, tmp_path):
    """An invalid --roi once went into settings.json and then blocked the corrected re-run."""
    case = sorted(trained["data"].iterdir())[0]
    out = tmp_path / "p"
    args = [*_predict_args(trained, case, out=out), "--device", "cpu"]
    result = CliRunner().invoke(main, [*args, "--roi", "8,8,7"])
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1
    assert result.output.startswith("error: infer.roi: [8, 8, 7] must be divisible by 2 on every side")
    assert str(trained["model"]) in result.output and not out.exists()
    result = CliRunner().invoke(main, [*args, "--roi", "8,8,8", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads((out / "settings.json").read_text())["roi"] == [8, 8, 8]


def test_eval_config_can_turn_hd95_off(trained, tmp_path):
    case = sorted(trained["data"].iterdir())[0]
    pred = tmp_path / "pred"
    args = [*_predict_args(trained, case, out=pred), "--device", "cpu"]
    assert CliRunner().invoke(main, args).exit_code == 0
    config = tmp_path / "eval.yaml"
    config.write_text("eval:\n  hd95: false\n")
    evaluate = ["segment", "eval", "--pred", str(pred), "--data", str(case.parent), "--json"]
    result = CliRunner().invoke(main, [*evaluate, "--out", str(tmp_path / "a"), "--config", str(config)])
    dice_only = json.loads(result.stdout)
    regions = ("ET", "TC", "WT")
    counts = {f"lesions_{c}_{r}" for c in ("tp", "fp", "fn") for r in regions}
    dice_keys = {f"{kind}_dice_{r}" for kind in ("legacy", "global", "lesionwise") for r in regions}
    assert set(dice_only["metrics"]) == dice_keys | counts
    assert "hd95" not in (tmp_path / "a" / "metrics.csv").read_text().splitlines()[0]
    result = CliRunner().invoke(main, [*evaluate, "--out", str(tmp_path / "b")])  # default: HD95 too
    full = json.loads(result.stdout)
    hd95_keys = {f"{kind}_hd95_{r}" for kind in ("legacy", "global", "lesionwise") for r in regions}
    assert set(full["metrics"]) == dice_keys | counts | hd95_keys
    assert all(full["metrics"][k] == v for k, v in dice_only["metrics"].items())
    result = CliRunner().invoke(
        main, [*evaluate, "--out", str(tmp_path / "c"), "--no-hd95", "--workers", "2"]
    )
    assert json.loads(result.stdout)["metrics"] == dice_only["metrics"]  # the flag as the file; workers alike


def test_scheme_and_fold_flags_are_checked_by_the_config(trained, tmp_path):
    runner = CliRunner()
    train = ["segment", "train", "--data", str(trained["data"]), "--out", str(tmp_path / "m.pt")]
    result = runner.invoke(main, [*train, "--folds", "3", "--fold", "3"])
    assert result.exit_code == 2 and result.output.startswith(
        "error: --fold: data.fold: must be below data.folds (3), got 3"
    )
    result = runner.invoke(main, [*train, "--labels", "brats2099"])
    assert result.exit_code == 2 and result.output.startswith("error: --labels: data.labels: input should be")
    assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "m.pt").exists()
    evaluate = ["segment", "eval", "--pred", str(tmp_path), "--data", str(trained["data"])]
    result = runner.invoke(main, [*evaluate, "--workers", "-1"])
    assert result.exit_code == 2 and result.output.startswith("error: --workers: run.workers:")
