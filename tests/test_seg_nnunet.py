"""The nnU-Net raw layout (CASE_0000.nii.gz ... with a dataset.json channel map) beside the BraTS names:
channels matched by name in any order, labels from labelsTr, one-line errors, and the same predictions
and scores as the BraTS-named copy of the cases."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from histo.errors import InputFileError
from segmentation.data import case_folders, find_case, find_cases, load_case
from segmentation.evaluate import evaluate_predictions
from segmentation.infer import predict_cases, save_model
from segmentation.synthetic import make_cases
from segmentation.unet import UNet3D

ORDER = ("flair", "t1", "t1ce", "t2")  # the dataset's channel order, unlike histo's t1, t1ce, t2, flair
NAMES = {"flair": "FLAIR", "t1": "T1", "t1ce": "T1ce", "t2": "T2"}
CONFIG = {"infer": {"roi": [16, 16, 16], "overlap": 0.0, "overlay_slices": 0}, "run": {"device": "cpu"}}


def to_nnunet(brats_root: Path, out: Path, labels=None) -> Path:
    """Copy BraTS-named cases into an nnU-Net raw dataset (imagesTr, labelsTr, dataset.json v2)."""
    (out / "imagesTr").mkdir(parents=True)
    (out / "labelsTr").mkdir()
    for case in find_cases(brats_root):
        for index, modality in enumerate(ORDER):
            shutil.copy(case.images[modality], out / "imagesTr" / f"{case.case_id}_{index:04d}.nii.gz")
        shutil.copy(case.seg, out / "labelsTr" / f"{case.case_id}.nii.gz")
    meta = {
        "channel_names": {str(i): NAMES[m] for i, m in enumerate(ORDER)},
        "labels": labels or {"background": 0, "NCR": 1, "ED": 2, "ET": 4},
        "numTraining": 2,
        "file_ending": ".nii.gz",
    }
    (out / "dataset.json").write_text(json.dumps(meta))
    return out


@pytest.fixture(scope="module")
def both(tmp_path_factory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("nnunet")
    make_cases(tmp / "brats", 2, shape=(16, 16, 16), seed=6)
    return tmp / "brats", to_nnunet(tmp / "brats", tmp / "Dataset001_BraTS")


def test_cases_are_found_by_their_first_channel_and_named_by_dataset_json(both):
    brats, nnunet = both
    firsts = case_folders(nnunet)
    assert [p.name for p in firsts] == ["synth_000_0000.nii.gz", "synth_001_0000.nii.gz"]
    assert case_folders(nnunet / "imagesTr") == firsts
    case = find_case(firsts[0])
    assert case.case_id == "synth_000" and case.channel_order == ORDER
    assert (
        case.images["flair"].name == "synth_000_0000.nii.gz"
        and case.images["t2"].name == "synth_000_0003.nii.gz"
    )
    assert case.seg == nnunet / "labelsTr" / "synth_000.nii.gz" and case.scheme == "2021"
    reference = find_case(brats / "synth_000")
    for got, expected in zip(load_case(case)[:3], load_case(reference)[:3], strict=True):
        np.testing.assert_array_equal(got, expected)  # same stacking: channels matched by name


def test_bad_dataset_json_is_one_line(both, tmp_path):
    brats, _ = both
    region_based = {"background": 0, "whole tumor": [1, 2, 3], "tumor core": [2, 3], "enhancing tumor": 3}
    root = to_nnunet(brats, tmp_path / "regions", labels=region_based)
    with pytest.raises(
        InputFileError, match=r"dataset\.json: declares region-based labels \(nnU-Net's converted"
    ):
        find_cases(root)
    root = to_nnunet(brats, tmp_path / "values", labels={"background": 0, "a": 1, "b": 2, "c": 3})
    with pytest.raises(InputFileError, match=r"declares label values \[1, 2, 3\], not those of scheme 2021"):
        find_cases(root)
    assert (
        find_cases(root, labels="2023")[0].scheme == "2023"
    )  # --labels settles it (the values check passes)
    meta = json.loads((root / "dataset.json").read_text())
    meta["channel_names"]["3"] = "DWI"
    (root / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(InputFileError, match=r"channel 3: 'DWI' is not one BraTS modality"):
        find_cases(root, labels="2023")
    flat = tmp_path / "flat"
    flat.mkdir()
    shutil.copy(root / "imagesTr" / "synth_000_0000.nii.gz", flat)
    with pytest.raises(InputFileError, match=r"nnU-Net channel files .* but no dataset\.json"):
        find_case(flat)


def test_predictions_and_scores_equal_the_brats_named_copy(both, tmp_path, caplog):
    brats, nnunet = both
    torch.manual_seed(3)
    model = UNet3D(channels=(2, 4), blocks_per_level=1, expansion=1)
    ckpt = tmp_path / "m.pt"
    save_model(ckpt, model, {"data": {"roi": [16, 16, 16]}}, labels="2021")
    predict_cases(ckpt, [brats], tmp_path / "a", CONFIG)
    with caplog.at_level(logging.INFO, logger="segmentation.infer"):
        summary = predict_cases(ckpt, [nnunet / "imagesTr"], tmp_path / "b", CONFIG)
    assert [o.status for o in summary.outcomes] == ["done", "done"]
    assert "dataset.json orders channels ['flair', 't1', 't1ce', 't2']" in caplog.text
    for case_id in ("synth_000", "synth_001"):
        a = np.asarray(nib.load(tmp_path / "a" / f"{case_id}.nii.gz").dataobj)
        b = np.asarray(nib.load(tmp_path / "b" / f"{case_id}.nii.gz").dataobj)
        np.testing.assert_array_equal(a, b)
    scores_a = evaluate_predictions(tmp_path / "a", brats, progress=False)
    scores_b = evaluate_predictions(tmp_path / "b", nnunet, progress=False)
    assert [(o.id, o.status) for o in scores_b.outcomes] == [("synth_000", "done"), ("synth_001", "done")]
    for a, b in zip(scores_a.outcomes, scores_b.outcomes, strict=True):
        drop = ("prediction", "scheme_source")
        assert {k: v for k, v in a.detail.items() if k not in drop} == {
            k: v for k, v in b.detail.items() if k not in drop
        }
