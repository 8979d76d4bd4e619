"""Sliding-window inference, flip TTA, output NIfTI geometry on real and synthetic cases, overlays."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import SHARED_DATA
from torch import nn

from histo.config import load_config
from histo.errors import HistoError, InputFileError
from segmentation.config import SegmentConfig
from segmentation.data import find_case
from segmentation.infer import (
    load_model,
    predict_case,
    predict_cases,
    predict_volume,
    region_probabilities,
    save_model,
)
from segmentation.label_schemes import regions_to_labels
from segmentation.synthetic import make_cases
from segmentation.unet import UNet3D

BRATS = SHARED_DATA / "brats"


def config(**infer) -> SegmentConfig:
    """The segment config on CPU with `infer` keys over a 16^3 window, overlap 0.25 and 2 overlay panels."""
    keys = {"roi": [16, 16, 16], "overlap": 0.25, "overlay_slices": 2, **infer}
    return load_config(
        SegmentConfig, overrides={"run.device": "cpu", **{f"infer.{k}": v for k, v in keys.items()}}
    )


class ConvNet(nn.Module):
    """A stand-in model with UNet3D's `.config` keys: one convolution, kernel k."""

    def __init__(self, k: int, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv3d(4, 3, k, padding=k // 2)
        self.config = {"channels": [8], "head": "regions"}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def test_sliding_window_stitches_exactly():
    model = ConvNet(1).eval()  # pointwise: every window must reproduce the full-volume output
    image = np.random.default_rng(0).standard_normal((4, 20, 26, 30)).astype(np.float32)
    with torch.no_grad():
        expected = torch.sigmoid(model(torch.from_numpy(image)[None]))[0].numpy()
    for roi in ((8, 8, 8), (32, 8, 16)):
        got = predict_volume(model, image, roi=roi, overlap=0.5)
        assert got.shape == (3, 20, 26, 30)
        np.testing.assert_allclose(got, expected, atol=1e-5)


def test_tta_averages_the_eight_flips():
    model = ConvNet(3).eval()
    image = np.random.default_rng(1).standard_normal((4, 8, 12, 16)).astype(np.float32)
    x = torch.from_numpy(image)[None].double()
    conv = model.conv.double()
    expected = np.zeros((3, 8, 12, 16))
    flips = [a for n in range(4) for a in itertools.combinations((2, 3, 4), n)]
    with torch.no_grad():
        for axes in flips:
            out = torch.sigmoid(conv(torch.flip(x, axes) if axes else x))
            expected += (torch.flip(out, axes) if axes else out)[0].numpy() / 8
    model.float()
    got = predict_volume(model, image, roi=(8, 12, 16), overlap=0.5, tta=True)
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert np.abs(predict_volume(model, image, roi=(8, 12, 16), overlap=0.5) - expected).max() > 1e-3


def test_labels_head_gives_nested_region_probabilities():
    model = nn.Module()
    model.config = {"head": "labels"}
    logits = torch.randn(2, 4, 3, 3, 3)
    p = torch.softmax(logits, 1)
    regions = region_probabilities(model, logits)
    torch.testing.assert_close(regions[:, 0], p[:, 1] + p[:, 3])
    torch.testing.assert_close(regions[:, 1], 1 - p[:, 0])
    torch.testing.assert_close(regions[:, 2], p[:, 3])


def test_brain_mask_reaches_rn_b_norms():
    torch.manual_seed(0)
    model = UNet3D(channels=(4, 8), blocks_per_level=1, expansion=1, norm="rn_b").eval()
    image = np.random.default_rng(2).standard_normal((4, 16, 16, 16)).astype(np.float32)
    inner = np.zeros((16, 16, 16), bool)
    inner[4:12, 4:12, 4:12] = True
    a = predict_volume(model, image, roi=(16, 16, 16), overlap=0.5, brain_mask=inner)
    half = np.zeros((16, 16, 16), bool)
    half[:8] = True  # (the complement of `inner` would give the same output: RN-B is symmetric at init)
    b = predict_volume(model, image, roi=(16, 16, 16), overlap=0.5, brain_mask=half)
    assert np.isfinite(a).all() and np.abs(a - b).max() > 1e-4


def _checkpoint(path: Path, model: nn.Module) -> Path:
    save_model(path, model, {})
    return path


def test_predict_real_cases_keeps_geometry_and_records_bad_case(tmp_path):
    torch.manual_seed(0)
    ckpt = _checkpoint(tmp_path / "m.pt", UNet3D(channels=(2, 4), blocks_per_level=1, expansion=1))
    summary = predict_cases(
        ckpt,
        [BRATS / "TCGA-DU-7294", BRATS / "deepmedic_brats2013_pat0005_1"],
        tmp_path / "out",
        config(roi=[240, 240, 160], overlap=0.0),
    )
    by_id = {o.id: o for o in summary.outcomes}
    assert by_id["TCGA-DU-7294"].status == "done"
    assert by_id["deepmedic_brats2013_pat0005_1"].status == "failed"
    assert "missing modality t1, t2" in by_id["deepmedic_brats2013_pat0005_1"].reason
    source = nib.load(BRATS / "TCGA-DU-7294" / "TCGA-DU-7294_fla_bet.nii.gz")
    out = nib.load(tmp_path / "out" / "TCGA-DU-7294.nii.gz")
    assert out.shape == source.shape == (240, 240, 155)
    np.testing.assert_array_equal(out.affine, source.affine)
    assert (
        nib.aff2axcodes(out.affine) == ("L", "P", "S") and out.header.get_zooms() == source.header.get_zooms()
    )
    assert out.get_data_dtype() == np.uint8 and set(np.unique(np.asarray(out.dataobj))) <= {0, 1, 2, 4}
    assert (tmp_path / "out" / "TCGA-DU-7294_overlay.png").stat().st_size > 1000
    assert json.loads((tmp_path / "out" / "predictions.json").read_text())["counts"]["failed"] == 1


@pytest.mark.parametrize("scheme,et", [("2021", 4), ("2023", 3)])
def test_output_is_in_the_input_voxel_order_and_scheme(tmp_path, scheme, et):
    folder = make_cases(tmp_path / "cases", 1, shape=(20, 24, 16), seed=3, scheme=scheme)[0]
    model = ConvNet(1)
    with torch.no_grad():  # ET logit = 50 (z(T1ce) - 2); TC and WT off: label ET exactly where T1ce z > 2
        model.conv.weight.zero_()
        model.conv.bias.copy_(torch.tensor([-50.0, -50.0, -100.0]))
        model.conv.weight[2, 1] = 50.0
    case = find_case(folder)
    t1ce = nib.load(case.images["t1ce"])
    raw = np.asarray(t1ce.dataobj, dtype=np.float64)
    nz = raw != 0
    z = np.where(nz, (raw - raw[nz].mean()) / raw[nz].std(), 0.0)
    record = predict_case(model.eval(), case, tmp_path / "out", config(roi=[8, 8, 8]), "cpu")
    assert record.status == "done" and record.detail["scheme"] == scheme
    out = nib.load(tmp_path / "out" / f"{case.case_id}.nii.gz")
    labels = np.asarray(out.dataobj)
    np.testing.assert_array_equal(out.affine, t1ce.affine)
    clear = np.abs(z - 2.0) > 1e-3
    assert (z > 2.0).sum() > 10 and set(np.unique(labels)) == {0, et}
    np.testing.assert_array_equal((labels == et)[clear], (z > 2.0)[clear])


def test_load_model_rejects_other_files(tmp_path):
    bad = tmp_path / "x.pt"
    torch.save({"weights": torch.zeros(1)}, bad)
    with pytest.raises(InputFileError, match=r"x\.pt: a bare state dict of 1 tensor, not a histo checkpoint"):
        load_model(bad)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(InputFileError, match=r"junk\.pt"):
        load_model(tmp_path / "junk.pt")


# --- probabilities and ensembles ------------------------------------------------------------------------


def _unet(path: Path, seed: int, labels="2021", roi=(16, 16, 16), out_channels=3, head="regions") -> Path:
    torch.manual_seed(seed)
    model = UNet3D(channels=(2, 4), blocks_per_level=1, expansion=1, out_channels=out_channels, head=head)
    save_model(path, model, {"data": {"roi": list(roi)}}, labels=labels)
    return path


def _probabilities(out: Path, case_id: str) -> dict:
    with np.load(out / f"{case_id}_probabilities.npz") as f:
        return {k: f[k] for k in f.files}


def test_probabilities_are_float16_in_the_source_grid_and_threshold_to_the_labels(tmp_path):
    folder = make_cases(tmp_path / "cases", 1, shape=(20, 24, 16), seed=4)[0]
    ckpt = _unet(tmp_path / "m.pt", 0)
    settings = config(save_probabilities=True, overlay_slices=0)
    summary = predict_cases(ckpt, [folder], tmp_path / "out", settings)
    assert summary.outcomes[0].status == "done"
    saved = _probabilities(tmp_path / "out", folder.name)
    source = nib.load(next(folder.glob("*_flair.nii.gz")))
    assert saved["probabilities"].dtype == np.float16 and saved["probabilities"].shape == (3, 20, 24, 16)
    np.testing.assert_array_equal(saved["affine"], source.affine)
    assert saved["regions"].tolist() == ["TC", "WT", "ET"] and str(saved["scheme"]) == "2021"
    labels = np.asarray(nib.load(tmp_path / "out" / f"{folder.name}.nii.gz").dataobj)
    p = saved["probabilities"].astype(np.float32)
    clear = (np.abs(p - 0.5) > 1e-3).all(axis=0)
    assert clear.mean() > 0.9
    expected = regions_to_labels(p >= 0.5, "2021")
    np.testing.assert_array_equal(labels[clear], expected[clear])
    (tmp_path / "out" / f"{folder.name}_probabilities.npz").unlink()  # a re-run completes the missing output
    again = predict_cases(ckpt, [folder], tmp_path / "out", settings)
    assert (
        again.outcomes[0].status == "done"
        and (tmp_path / "out" / f"{folder.name}_probabilities.npz").exists()
    )


def test_an_ensemble_averages_probabilities_before_thresholding(tmp_path):
    folder = make_cases(tmp_path / "cases", 1, shape=(16, 16, 16), seed=5)[0]
    a, b = _unet(tmp_path / "a.pt", 1), _unet(tmp_path / "b.pt", 2)
    settings = config(save_probabilities=True, overlay_slices=0)
    for m in (a, b):
        predict_cases(m, [folder], tmp_path / m.stem, settings)
    single = [_probabilities(tmp_path / m.stem, folder.name) for m in (a, b)]
    summary = predict_cases([a, b], [folder], tmp_path / "ab", settings)
    assert summary.extra["model"] == [str(a), str(b)]
    both = _probabilities(tmp_path / "ab", folder.name)["probabilities"].astype(np.float32)
    mean = (single[0]["probabilities"].astype(np.float32) + single[1]["probabilities"].astype(np.float32)) / 2
    np.testing.assert_allclose(both, mean, atol=2e-3)  # float16 storage of each
    assert np.abs(single[0]["probabilities"].astype(np.float32) - mean).max() > 1e-2
    recorded = json.loads((tmp_path / "ab" / "settings.json").read_text())["model_sha256"]
    assert len(recorded) == 2 and recorded[0] != recorded[1]


def test_an_ensemble_refuses_checkpoints_that_do_not_fit_together(tmp_path):
    folder = make_cases(tmp_path / "cases", 1, shape=(16, 16, 16), seed=5)[0]
    base = _unet(tmp_path / "base.pt", 0)
    others = {
        "label scheme": _unet(tmp_path / "s.pt", 0, labels="2023"),
        "output channels": _unet(tmp_path / "c.pt", 0, out_channels=4, head="labels"),
        "training crop": _unet(tmp_path / "r.pt", 0, roi=(32, 32, 32)),
    }
    for what, other in others.items():
        with pytest.raises(HistoError, match=rf"{other.name}: {what}"):
            predict_cases([base, other], [folder], tmp_path / "out", config())
    assert not (tmp_path / "out").exists()


def test_checkpoint_task_sets_output_labels(tmp_path):
    """A post-treatment glioma model (4 channels) writes RC = 4 for a case detected as 2021."""
    folder = make_cases(tmp_path / "cases", 1, shape=(16, 16, 16), seed=5)[0]
    ckpt = _unet(tmp_path / "gli.pt", 0, labels="gli", out_channels=4)
    summary = predict_cases(ckpt, [folder], tmp_path / "out", config(overlay_slices=1))
    record = summary.outcomes[0]
    assert record.status == "done" and record.detail["scheme"] == "gli"
    assert set(record.detail["voxels"]) == {"TC", "WT", "ET", "RC"}
    assert summary.extra["labels"] == "gli" and summary.extra["regions"] == ["TC", "WT", "ET", "RC"]
    with pytest.raises(HistoError, match=r"scheme 2021 .* has channels"):
        predict_case(
            load_model(ckpt)[0],
            find_case(folder, labels="2021"),
            tmp_path / "x",
            config(),
            "cpu",
            "gli",
            ("TC", "WT", "ET", "RC"),
        )
