"""Robustness harness: ImageNet-C metrics against a hand computation, the grid runner, α-BN, the report."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from histo.classification import MACRO_F1_DEFINITION
from histo.errors import HistoError
from histo.robustness.grid import CLEAN, parse_severities, run_grid, select_corruptions
from histo.robustness.metrics import corruption_errors
from histo.robustness.report import report
from histo.robustness.results import read_rows, write_rows


def _rows(model: str, clean: float, table: dict[str, list[float]]) -> list[dict]:
    rows = [
        {
            "model": model,
            "corruption": CLEAN,
            "severity": 0,
            "metric": "acc",
            "value": clean,
            "status": "done",
        }
    ]
    for c, values in table.items():
        rows += [
            {"model": model, "corruption": c, "severity": s, "metric": "acc", "value": v, "status": "done"}
            for s, v in enumerate(values, start=1)
        ]
    return rows


def test_ce_rce_mce_match_hand_computation() -> None:
    rows = _rows("bn", 0.9, {"blur": [0.8, 0.6], "noise": [0.7, 0.5]})
    rows += _rows("gn", 0.8, {"blur": [0.7, 0.7], "noise": [0.75, 0.65]})
    result = corruption_errors(rows, reference="bn", metric="acc")
    # errors: bn clean 0.1, blur 0.2 + 0.4, noise 0.3 + 0.5; gn clean 0.2, blur 0.3 + 0.3, noise 0.25 + 0.35
    assert result.ce["gn"]["blur"] == pytest.approx(0.6 / 0.6)
    assert result.ce["gn"]["noise"] == pytest.approx(0.6 / 0.8)
    assert result.rce["gn"]["blur"] == pytest.approx((0.1 + 0.1) / (0.1 + 0.3))
    assert result.rce["gn"]["noise"] == pytest.approx((0.05 + 0.15) / (0.2 + 0.4))
    assert result.mce["gn"] == pytest.approx((1.0 + 0.75) / 2)
    assert result.rmce["gn"] == pytest.approx((0.5 + 1 / 3) / 2)
    assert result.mce["bn"] == pytest.approx(1.0) and result.rmce["bn"] == pytest.approx(1.0)
    lower = corruption_errors(
        [{**r, "value": 1 - r["value"], "metric": "err"} for r in rows], "bn", "err", higher_is_better=False
    )
    assert lower.ce["gn"] == pytest.approx(result.ce["gn"])


def test_undefined_ce_is_nan_and_left_out_of_mce() -> None:
    rows = _rows("bn", 1.0, {"blur": [1.0, 1.0], "noise": [0.5, 0.5]})  # the reference never errs on blur
    rows += _rows("gn", 1.0, {"blur": [0.9, 0.9], "noise": [0.75, 0.75]})
    result = corruption_errors(rows, reference="bn", metric="acc")
    assert math.isnan(result.ce["gn"]["blur"]) and math.isnan(result.rce["gn"]["blur"])
    assert result.mce["gn"] == pytest.approx(0.5) and result.rmce["gn"] == pytest.approx(0.5)


def test_ce_refuses_mismatched_severities() -> None:
    rows = _rows("bn", 0.9, {"blur": [0.8, 0.6]}) + _rows("gn", 0.8, {"blur": [0.7]})
    with pytest.raises(HistoError, match="lacks blur severities"):
        corruption_errors(rows, reference="bn", metric="acc")
    with pytest.raises(HistoError, match="reference model"):
        corruption_errors(rows, reference="ibn", metric="acc")


def _table():
    return {
        "shift": lambda x, s, rng: x + s,
        "noise": lambda x, s, rng: x + s * rng.normal(size=x.shape),
        "broken": lambda x, s, rng: (_ for _ in ()).throw(HistoError("bad corruption")),
    }


def test_run_grid_rows_determinism_failure_and_resume() -> None:
    data = np.zeros((4, 3))
    calls = []

    def evaluate(corrupt):
        calls.append(1)
        out = np.stack([corrupt(x, key=i) for i, x in enumerate(data)])
        return {"mean": float(out.mean()), "std": float(out.std())}

    rows = run_grid(evaluate, _table(), [1, 2], model="m", seed=3, progress=False)
    ok = [r for r in rows if r["status"] == "done"]
    assert len(calls) == 1 + 3 * 2
    assert {(r["corruption"], r["severity"]) for r in ok} == {
        (CLEAN, 0),
        ("shift", 1),
        ("shift", 2),
        ("noise", 1),
        ("noise", 2),
    }
    value = {(r["corruption"], r["severity"], r["metric"]): r["value"] for r in ok}
    assert value[(CLEAN, 0, "mean")] == 0 and value[("shift", 2, "mean")] == 2
    assert value[("noise", 2, "std")] > value[("noise", 1, "std")] > 0
    failed = [r for r in rows if r["status"] == "failed"]
    assert len(failed) == 2 and all("bad corruption" in r["reason"] for r in failed)
    again = run_grid(evaluate, _table(), [1, 2], model="m", seed=3, progress=False)
    assert [r["value"] for r in again if r["status"] == "done"] == [r["value"] for r in ok]
    other = run_grid(evaluate, _table(), [1], model="m", seed=4, progress=False)
    assert {r["value"] for r in other if r["corruption"] == "noise"} != {
        value[("noise", 1, m)] for m in ("mean", "std")
    }
    calls.clear()
    resumed = run_grid(evaluate, _table(), [1, 2], model="m", seed=3, done=ok, progress=False)
    assert len(calls) == 2  # only the failed cells run again
    assert len([r for r in resumed if r["status"] == "done"]) == len(ok)


def test_a_bug_in_a_cell_surfaces_and_old_results_still_resume(tmp_path) -> None:
    table = {"shift": lambda x, s, rng: x + s, "buggy": lambda x, s, rng: x[None].foo}  # AttributeError

    def evaluate(corrupt):
        return {"mean": float(np.mean(corrupt(np.zeros(3), key=0)))}

    with pytest.raises(AttributeError):
        run_grid(evaluate, table, [1], model="m", progress=False)
    # results.csv written by the previous release called a valid cell "ok": it resumes as "done"
    (tmp_path / "old.csv").write_text(
        "model,corruption,severity,metric,value,alpha_bn,status,reason\n"
        "m,clean,0,mean,0.0,,ok,\nm,shift,1,mean,1.0,,ok,\n"
    )
    old = read_rows(tmp_path / "old.csv")
    assert [r["status"] for r in old] == ["done", "done"]
    calls = []
    rows = run_grid(
        lambda corrupt: calls.append(1) or evaluate(corrupt), {"shift": table["shift"]}, [1], model="m",
        done=old, progress=False,
    )  # fmt: skip
    assert calls == [] and [(r["corruption"], r["value"], r["status"]) for r in rows] == [
        (CLEAN, 0.0, "done"),
        ("shift", 1.0, "done"),
    ]


def _net(norm: str) -> nn.Module:
    layer = nn.BatchNorm2d(4) if norm == "batch" else nn.GroupNorm(2, 4)
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), layer, nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()
    )
    if norm == "batch":
        net.train()
        with torch.no_grad():
            for _ in range(5):
                net(torch.randn(8, 3, 8, 8))
    return net.eval()


@pytest.mark.parametrize("norm", ["batch", "group"])
def test_alpha_bn_through_the_harness(norm: str) -> None:
    net = _net(norm)
    data = torch.randn(8, 3, 8, 8)
    table = {"contrast": lambda x, s, rng: x * (1 + s) + s}

    def evaluate(corrupt):
        with torch.no_grad():
            return {"out": float(net(corrupt(data)).sum())}

    plain = run_grid(evaluate, table, [2], model="m", progress=False)
    calibrated = run_grid(evaluate, table, [2], model="m", alpha_bn=0.5, module=net, progress=False)
    changed = [
        a["value"] != pytest.approx(b["value"], abs=1e-6) for a, b in zip(plain, calibrated, strict=False)
    ]
    assert all(changed) if norm == "batch" else not any(changed)
    assert all(r["alpha_bn"] == 0.5 for r in calibrated)
    after = run_grid(evaluate, table, [2], model="m", progress=False)
    assert [r["value"] for r in after] == [r["value"] for r in plain]  # the model is restored
    with pytest.raises(HistoError):
        run_grid(evaluate, table, [2], alpha_bn=0.1, progress=False)


def test_report_writes_tables_and_plots(tmp_path) -> None:
    rows = _rows("bn", 0.9, {"blur": [0.8, 0.6], "noise": [0.7, 0.5]})
    rows += _rows("gn", 0.8, {"blur": [0.7, 0.7], "noise": [0.75, 0.65]})
    rows = [{**r, "alpha_bn": None, "reason": ""} for r in rows]
    summary = report(rows, tmp_path, {"acc": True}, reference="bn")
    for name in ("results.csv", "ce_acc.csv", "curves_acc.png", "heatmap_acc.png", "summary.json"):
        assert (tmp_path / name).stat().st_size > 0, name
    assert summary["metrics"]["acc"]["mce"]["gn"] == pytest.approx(0.875)
    back = read_rows(tmp_path / "results.csv")
    assert [(r["model"], r["corruption"], r["severity"], r["value"]) for r in back] == [
        (r["model"], r["corruption"], r["severity"], r["value"]) for r in rows
    ]
    write_rows(tmp_path / "x.csv", [{**rows[0], "value": math.nan, "status": "failed"}])
    assert math.isnan(read_rows(tmp_path / "x.csv")[0]["value"])


def test_curves_draw_no_two_of_twenty_models_alike(tmp_path, monkeypatch) -> None:
    """The norm study plots 20+ models (every norm, with and without α-BN): tab10 alone repeats after 10."""
    import histo.plots
    from histo.plots import plt
    from histo.robustness import plots

    rows = []
    for i in range(22):
        rows += _rows(f"m{i:02d}", 0.9, {"blur": [0.8 - i / 100, 0.6]})
    drawn = []
    monkeypatch.setattr(histo.plots, "save_figure", lambda fig, path: drawn.append(fig) or Path(path))
    plots.plot_severity_curves(rows, "acc", tmp_path / "c.png")
    lines = drawn[0].axes[0].get_lines()
    assert len(lines) == 22
    looks = {
        (tuple(plt.matplotlib.colors.to_rgba(ln.get_color())), ln.get_linestyle(), ln.get_marker())
        for ln in lines
    }
    assert len(looks) == 22


def test_parsers() -> None:
    assert parse_severities("1-5") == [1, 2, 3, 4, 5]
    assert parse_severities("1,3-4") == [1, 3, 4]
    for bad in ("0-2", "x", "6"):
        with pytest.raises(HistoError):
            parse_severities(bad)
    assert select_corruptions(None, ["a", "b"]) == ["a", "b"]
    assert select_corruptions("b", ["a", "b"]) == ["b"]
    with pytest.raises(HistoError, match="unknown corruption"):
        select_corruptions("a,c", ["a", "b"])


def test_run_study_is_domain_free_records_resumes_and_refuses_another_run(tmp_path) -> None:
    """A throwaway domain (a loader and an evaluator, nothing else) runs through the shared study runner."""
    import json

    from histo.robustness.study import Model, Study, run_study
    from histo.robustness_config import RobustnessConfig

    loads, calls = [], []
    data = np.linspace(0.0, 1.0, 6)

    def load(path) -> Model:
        loads.append(Path(path).name)
        offset = 0.5 if "ref" in Path(path).name else 0.0

        def evaluate(corrupt):
            calls.append(1)
            return {"score": float(np.clip(corrupt(data, 0) + offset, 0, 1).mean())}

        return Model(None, f"sha-{Path(path).name}", lambda alpha: evaluate)

    model, ref = tmp_path / "toy.pt", tmp_path / "ref.pt"
    study = Study(
        task="toy",
        metrics={"score": True},
        corruptions={"dim": lambda x, s, rng: x * (1 - 0.2 * s)},
        load=load,
        settings={"data": "six numbers"},
        extra={"n_items": len(data)},
    )
    config = RobustnessConfig.coerce({"severities": "1,2", "seed": 1})
    out = tmp_path / "out"
    summary = run_study(study, model, ref, out, config, progress=False)
    assert loads == ["toy.pt", "ref.pt"] and len(calls) == 2 * 3
    assert summary.counts == {"done": 6, "skipped": 0, "failed": 0}
    assert summary.extra["task"] == "toy" and summary.extra["n_items"] == 6
    assert summary.extra["models"] == {"toy": "sha-toy.pt", "ref": "sha-ref.pt"}
    assert summary.extra["metrics"]["score"]["mce"]["ref"] == pytest.approx(1.0)
    settings = json.loads((out / "settings.json").read_text())
    assert settings["task"] == "toy" and settings["data"] == "six numbers"
    assert settings["corruptions"] == ["dim"] and settings["severities"] == [1, 2] and settings["seed"] == 1
    assert json.loads((out / "summary.json").read_text()) == json.loads(json.dumps(summary.to_dict()))
    before = (out / "results.csv").read_text()
    calls.clear()
    again = run_study(study, model, ref, out, config, progress=False)
    assert calls == [] and again.counts == {"done": 0, "skipped": 6, "failed": 0}
    assert (out / "results.csv").read_text() == before
    with pytest.raises(HistoError, match=r"other settings \(seed\)"):
        run_study(study, model, ref, out, config.updated({"seed": 2}), progress=False)


# ---------------------------------------------------------------- end to end through the CLI


def test_cli_pathology_grid_alpha_bn_reference_and_resume(tile_store, tmp_path) -> None:
    import json
    import shutil

    from click.testing import CliRunner

    from histo.cli import main
    from pathology.kimianet import random_init_checkpoint

    model = random_init_checkpoint(tmp_path / "gn.pt", norm="batch", input_px=32, seed=1)
    ref = shutil.copy(model, tmp_path / "bn.pt")  # same weights under another name: its CE must be 1
    out = tmp_path / "out"
    args = [
        "robustness",
        "pathology",
        "--model",
        str(model),
        "--tiles",
        str(tile_store),
        "--out",
        str(out),
        "--corruptions",
        "gaussian_noise,stain",
        "--severities",
        "1,3",
        "--alpha-bn",
        "0.1",
        "--reference",
        str(ref),
        "--device",
        "cpu",
        "--json",
    ]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["n_slides"] == 4 and summary["n_tiles"] == 12 and summary["counts"]["failed"] == 0
    assert summary["counts"]["done"] == 3 * (1 + 2 * 2) == len(summary["outcomes"])
    ce = summary["metrics"]["accuracy"]["ce"]
    assert set(ce) == {"gn", "gn+alphaBN0.1", "bn"}
    assert all(
        math.isnan(v) or v == pytest.approx(1.0) for v in ce["gn"].values()
    )  # identical to the reference
    assert ce["bn"] == ce["gn"]
    rows = read_rows(out / "results.csv")
    assert len({(r["model"], r["corruption"], r["severity"]) for r in rows}) == 3 * (1 + 2 * 2)
    assert all(0 <= r["value"] <= 1 for r in rows)
    for name in ("curves_accuracy.png", "heatmap_macro_f1.png", "ce_accuracy.csv", "settings.json"):
        assert (out / name).exists()
    assert json.loads((out / "settings.json").read_text())["macro_f1_definition"] == MACRO_F1_DEFINITION
    before = (out / "results.csv").read_text()
    again = CliRunner().invoke(main, args)  # resumes: nothing left to evaluate, same results
    assert again.exit_code == 0 and (out / "results.csv").read_text() == before
    assert json.loads(again.stdout)["counts"] == {"done": 0, "skipped": 15, "failed": 0}
    other = CliRunner().invoke(main, [*args[:-1], "--seed", "9"])
    assert other.exit_code == 2 and "other settings (seed)" in other.output
    bad = CliRunner().invoke(main, [*args[:9], "snow", *args[10:]])
    assert bad.exit_code == 2 and "unknown corruption(s) snow" in bad.output


def test_alpha_bn_calibrates_the_queries_only_unless_the_archive_is_asked_for(tile_store, tmp_path) -> None:
    import json

    from histo.config import load_config
    from histo.robustness_config import RobustnessConfig
    from pathology.kimianet import random_init_checkpoint
    from pathology.robustness import evaluate_pathology

    model = random_init_checkpoint(tmp_path / "bn.pt", norm="batch", input_px=32, seed=1)
    base = {"corruptions": "brightness", "severities": "3", "alpha_bn": 0.5, "run.device": "cpu"}
    rows, settings = {}, {}
    for archive in (False, True):
        config = load_config(RobustnessConfig, overrides={**base, "pathology.alpha_bn_archive": archive})
        out = tmp_path / f"archive-{archive}"
        summary = evaluate_pathology(model, tile_store, out, config, progress=False)
        assert summary.extra["alpha_bn_calibrates"] == ("queries and archive" if archive else "queries")
        settings[archive] = json.loads((out / "settings.json").read_text())
        rows[archive] = {
            (r["model"], r["corruption"], r["metric"]): r["value"] for r in read_rows(out / "results.csv")
        }
    assert settings[False]["alpha_bn_calibrates"] == "queries"
    assert settings[True]["alpha_bn_calibrates"] == "queries and archive"
    plain = {k: v for k, v in rows[False].items() if k[0] == "bn"}
    assert plain == {k: v for k, v in rows[True].items() if k[0] == "bn"}  # the uncalibrated run is untouched


def test_archive_features_under_alpha_bn_use_the_archives_own_batches(tile_store) -> None:
    from histo.calibration import alpha_bn_mode
    from pathology.kimianet import FeatureExtractor, build_model, model_config
    from pathology.robustness import archive_features, load_cohort
    from pathology.store import TileStore

    torch.manual_seed(0)
    model = build_model("cbr-tiny", "batch", num_classes=0, variant="scratch")
    for m in model.modules():  # source statistics far from any batch's, so calibration shows
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.fill_(-1.0)
            m.running_var.fill_(9.0)
    extractor = FeatureExtractor(model, model_config("cbr-tiny", "batch", "scratch", [], 32), "cpu")
    cohort = load_cohort(TileStore.open(tile_store))
    plain = archive_features(extractor, cohort, 2, None)
    calibrated = archive_features(extractor, cohort, 2, 0.5)
    with alpha_bn_mode(extractor.model, 0.5):
        by_hand = [extractor.extract(cohort.tiles(i), 2) for i in range(len(cohort.slide_ids))]
    assert all(np.array_equal(a, b) for a, b in zip(calibrated, by_hand, strict=True))
    assert not np.allclose(np.concatenate(plain), np.concatenate(calibrated))
    again = archive_features(extractor, cohort, 2, None)  # the model is left as it was
    assert all(np.array_equal(a, b) for a, b in zip(plain, again, strict=True))


def test_cli_segment_grid(tiny_segment_study, tmp_path) -> None:
    import json

    from click.testing import CliRunner

    from histo.cli import main

    out = tmp_path / "out"
    result = CliRunner().invoke(
        main,
        [
            "robustness",
            "segment",
            "--model",
            str(tiny_segment_study["model"]),
            "--data",
            str(tiny_segment_study["data"]),
            "--out",
            str(out),
            "--corruptions",
            "bias_field,missing_modality",
            "--severities",
            "5",
            "--alpha-bn",
            "0.5",
            "--config",
            str(tiny_segment_study["config"]),
            "--device",
            "cpu",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["n_cases"] == 1 and summary["counts"] == {"done": 6, "skipped": 0, "failed": 0}
    assert set(summary["metrics"]["dice_WT"]["mean"]) == {"unet", "unet+alphaBN0.5"}
    # A BN U-Net is changed by α-BN. The untrained net's WT (through the label map) covers the whole
    # brain with or without it, so the change shows in the mean over the nested regions.
    means = summary["metrics"]["dice_mean"]["mean"]
    assert means["unet"] != means["unet+alphaBN0.5"]
    assert set(summary["metrics"]["dice_WT"]["ce"]["unet+alphaBN0.5"]) == {"bias_field", "missing_modality"}
    rows = read_rows(out / "results.csv")
    assert {r["metric"] for r in rows} >= {"dice_TC", "dice_WT", "dice_ET", "hd95_WT", "dice_mean"}


def test_knn_predict_matches_a_loop_and_excludes_the_patient() -> None:
    from pathology.robustness import classification_scores, knn_predict

    rng = np.random.default_rng(0)
    index = rng.normal(size=(30, 5))
    labels = rng.choice(["a", "b", "c"], size=30)
    groups = np.repeat(np.arange(10), 3)
    query = index + 0.01 * rng.normal(size=index.shape)
    for k in (1, 3):
        pred = knn_predict(query, groups, index, labels, groups, k)
        for i in range(30):
            d = [(np.sum((query[i] - index[j]) ** 2), j) for j in range(30) if groups[j] != groups[i]]
            nearest = [labels[j] for _, j in sorted(d)[:k]]
            counts = {lab: nearest.count(lab) for lab in nearest}
            best = max(counts.values())
            assert pred[i] == next(lab for lab in nearest if counts[lab] == best)
    y = np.array(["a", "a", "b", "b", "b", "c"])
    p = np.array(["a", "b", "b", "b", "a", "a"])
    slide = np.array([0, 0, 1, 1, 1, 2])
    scores = classification_scores(y, p, slide)
    # per-class F1: a 2*1/(2+3)=0.4, b 2*2/(3+3)=2/3, c 0 -> macro 0.3556; slides: a/b tie -> a (by name) ok, b ok, c wrong
    assert scores["accuracy"] == pytest.approx(3 / 6)
    assert scores["macro_f1"] == pytest.approx((0.4 + 2 / 3 + 0) / 3)
    assert scores["slide_accuracy"] == pytest.approx(2 / 3)


def test_ras_spacing_follows_the_axis_permutation() -> None:
    from segmentation.robustness import ras_spacing

    # voxel axis 0 runs S-I (3 mm), axis 1 L-R (1 mm), axis 2 A-P (2 mm)
    affine = np.array([[0, 1.0, 0, 0], [0, 0, -2.0, 0], [-3.0, 0, 0, 0], [0, 0, 0, 1]])
    assert ras_spacing(affine) == (1.0, 2.0, 3.0)


def test_segment_study_scores_the_regions_of_the_models_scheme(tmp_path) -> None:
    """A post-treatment glioma model (TC, WT, ET, RC) is scored on its four regions, cases read in its scheme;
    a study mixing it with a three-region model, or cases of another task, is refused in one line."""
    from segmentation.infer import save_model
    from segmentation.robustness import evaluate_segmentation
    from segmentation.synthetic import make_cases
    from segmentation.unet import UNet3D

    (case,) = make_cases(tmp_path / "data", 1, shape=(32, 32, 32), seed=0, scheme="2023")
    torch.manual_seed(0)
    gli = UNet3D(channels=(4, 8), blocks_per_level=1, out_channels=4)
    save_model(tmp_path / "gli.pt", gli, {}, labels="gli")
    save_model(tmp_path / "plain.pt", UNet3D(channels=(4, 8), blocks_per_level=1), {})
    config = {
        "corruptions": "bias_field",
        "severities": "1",
        "segment": {"roi": [32, 32, 32]},
        "run": {"device": "cpu"},
    }
    summary = evaluate_segmentation(
        tmp_path / "gli.pt", tmp_path / "data", tmp_path / "out", config, progress=False
    )
    assert summary.extra["labels"] == "gli" and summary.extra["regions"] == ["TC", "WT", "ET", "RC"]
    rows = {(r["corruption"], r["metric"]): r["value"] for r in read_rows(tmp_path / "out" / "results.csv")}
    regions = ("TC", "WT", "ET", "RC")
    assert {m for _, m in rows} == {"dice_mean", *(f"{k}_{r}" for k in ("dice", "hd95") for r in regions)}
    for corruption in {c for c, _ in rows}:
        mean = np.mean([rows[corruption, f"dice_{r}"] for r in regions])
        assert rows[corruption, "dice_mean"] == pytest.approx(mean)
    with pytest.raises(HistoError, match=r"plain\.pt: predicts \['TC', 'WT', 'ET'\].*one task per study"):
        evaluate_segmentation(
            tmp_path / "gli.pt", tmp_path / "data", tmp_path / "x", config, reference=tmp_path / "plain.pt"
        )
    case.rename(case.with_name("BraTS-PED-00001-000"))  # detected as paediatric (TC, WT, ET, CC)
    with pytest.raises(
        HistoError, match=r"predicts \['TC', 'WT', 'ET'\], but cases BraTS-PED-00001-000 \(ped"
    ):
        evaluate_segmentation(tmp_path / "plain.pt", tmp_path / "data", tmp_path / "y", config)
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_segment_study_records_the_cases_it_cannot_score_and_scores_the_rest(tmp_path) -> None:
    """A case missing a modality is a failed item (exit 1, named with the reason), one without a label map
    is left out with the reason; the good case is still scored."""
    import json

    from click.testing import CliRunner

    from histo.cli import main
    from segmentation.infer import save_model
    from segmentation.synthetic import make_cases
    from segmentation.unet import UNet3D

    make_cases(tmp_path / "data", 3, shape=(32, 32, 32), seed=0)
    _, no_flair, no_seg = sorted(p for p in (tmp_path / "data").iterdir())
    next(no_flair.glob("*flair*")).unlink()
    next(no_seg.glob("*seg*")).unlink()
    torch.manual_seed(0)
    save_model(tmp_path / "unet.pt", UNet3D(channels=(4, 8), blocks_per_level=1, norm="batch"), {})
    (tmp_path / "cfg.yaml").write_text("segment:\n  roi: [32, 32, 32]\n")
    args = ["robustness", "segment", "--model", str(tmp_path / "unet.pt"), "--data", str(tmp_path / "data")]
    args += ["--out", str(tmp_path / "out"), "--corruptions", "bias_field", "--severities", "5"]
    result = CliRunner().invoke(
        main, [*args, "--config", str(tmp_path / "cfg.yaml"), "--device", "cpu", "--json"]
    )
    assert result.exit_code == 1, result.output
    summary = json.loads(result.stdout)
    assert summary["n_cases"] == 1 and summary["counts"] == {"done": 2, "skipped": 1, "failed": 1}
    by_id = {o["id"]: o for o in summary["outcomes"]}
    assert by_id[no_flair.name]["status"] == "failed" and "flair" in by_id[no_flair.name]["reason"].lower()
    assert by_id[no_seg.name] == {**by_id[no_seg.name], "status": "skipped", "reason": "no label map"}
    assert (
        f"failed: {no_flair.name}: " in result.stderr
        and f"left out: {no_seg.name}: no label map" in result.stderr
    )
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["counts"] == summary["counts"]


def test_a_damaged_chunk_fails_its_slide_whether_or_not_it_is_cached(tile_store, tmp_path) -> None:
    """The cohort reads every slide once at setup: a damaged chunk of a slide beyond the memory cache must
    fail that slide there, not the whole study later."""
    import shutil

    from pathology.robustness import load_cohort
    from pathology.store import TileStore

    store = Path(shutil.copytree(tile_store, tmp_path / "tiles.zarr"))
    chunk = max(
        (p for p in (store / "slides" / "s2" / "pixels").rglob("*") if p.is_file() and p.name != "zarr.json"),
        key=lambda p: p.stat().st_size,
    )
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 64] = bytes(64)
    chunk.write_bytes(bytes(data))
    for cache_mb in (0, 2048):
        cohort = load_cohort(TileStore.open(store), cache_mb=cache_mb)
        assert cohort.slide_ids == ["s0", "s1", "s3"] and len(cohort.cache) == (0 if cache_mb == 0 else 3)
        (failed,) = cohort.left_out
        assert failed.id == "s2" and failed.status == "failed" and "crc32c" in failed.reason


def test_pathology_study_fails_a_damaged_slide_and_evaluates_the_others(tile_store, tmp_path) -> None:
    import json
    import shutil

    from click.testing import CliRunner

    from histo.cli import main
    from pathology.kimianet import random_init_checkpoint

    store = Path(shutil.copytree(tile_store, tmp_path / "tiles.zarr"))
    (store / "slides" / "s1" / "zarr.json").write_text('{"attributes": {"record": {"slide_id": ')
    model = random_init_checkpoint(tmp_path / "bn.pt", norm="batch", input_px=32, seed=1)
    args = [
        "robustness",
        "pathology",
        "--model",
        str(model),
        "--tiles",
        str(store),
        "--out",
        str(tmp_path / "o"),
    ]
    args += ["--corruptions", "gaussian_noise", "--severities", "1", "--device", "cpu", "--json"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1, result.output
    summary = json.loads(result.stdout)
    assert summary["n_slides"] == 3 and summary["counts"] == {"done": 2, "skipped": 0, "failed": 1}
    s1 = next(o for o in summary["outcomes"] if o["id"] == "s1")
    assert s1["status"] == "failed" and "damaged slide record" in s1["reason"]
    assert "failed: s1: " in result.stderr
