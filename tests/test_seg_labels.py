"""Label schemes as data: every task's table encodes its label maps both ways, detection and `--labels`
are recorded, an unexpected value is one line naming the case, the value and the scheme, and the model's
outputs follow the scheme's channels."""

from __future__ import annotations

import shutil

import nibabel as nib
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch import nn

from histo.cli import main
from histo.config import load_config
from histo.errors import InputFileError
from segmentation.config import SegmentConfig
from segmentation.data import find_case, load_case
from segmentation.infer import region_probabilities
from segmentation.label_schemes import (
    SCHEMES,
    LabelScheme,
    class_regions,
    detect_scheme,
    labels_to_regions,
    regions_to_labels,
)
from segmentation.synthetic import make_cases
from segmentation.train import SegLoss, build_model, regions_to_classes

# The regions each task scores (REFERENCE.md §8; the official configs are compared in test_seg_official.py).
EXPECTED_REGIONS = {
    "2021": {"ET": {4}, "TC": {1, 4}, "WT": {1, 2, 4}},
    "2023": {"ET": {3}, "TC": {1, 3}, "WT": {1, 2, 3}},
    "gli": {"ET": {3}, "TC": {1, 3}, "WT": {1, 2, 3}, "RC": {4}, "NETC": {1}, "SNFH": {2}},
    "ped": {"ET": {1}, "NETC": {2}, "CC": {3}, "ED": {4}, "TC": {1, 2, 3}, "WT": {1, 2, 3, 4}},
    "menpre": {"ET": {3}, "TC": {1, 3}, "WT": {1, 2, 3}},
    "menrt": {"GTV": {1}},
    "mets": {"ET": {3}, "TC": {1, 3}, "WT": {1, 2, 3}, "RC": {4}},
    "goat": {"ET": {3}, "TC": {1, 3}, "WT": {1, 2, 3}},
}


def test_the_table_holds_every_task_with_its_regions():
    assert {
        name: {r: set(v) for r, v in s.regions.items()} for name, s in SCHEMES.items()
    } == EXPECTED_REGIONS
    assert SCHEMES["mets"].lesionwise == "penalised"
    assert {s.lesionwise for n, s in SCHEMES.items() if n != "mets"} == {"matched"}


@pytest.mark.parametrize("name", sorted(SCHEMES))
def test_every_scheme_round_trips_label_maps_through_its_channels(name):
    scheme = SCHEMES[name]
    seg = np.random.default_rng(1).choice([0, *scheme.values], size=(9, 8, 7)).astype(np.uint8)
    channels = labels_to_regions(seg, name)
    assert channels.shape == (len(scheme.channels), 9, 8, 7)
    for i, region in enumerate(scheme.channels):
        assert np.array_equal(channels[i], np.isin(seg, sorted(scheme.regions[region])))
    assert np.array_equal(regions_to_labels(channels, name), seg)
    classes = regions_to_classes(torch.from_numpy(channels).float()[None], name)[0, 0].numpy()
    expected = np.select([seg == v for v in scheme.values], list(range(1, len(scheme.values) + 1)), 0)
    assert np.array_equal(classes, expected)


def test_inconsistent_tables_are_refused():
    with pytest.raises(ValueError, match="overlap without nesting"):
        LabelScheme(
            "x", "x", {1: "A", 2: "B", 3: "C"}, {"P": frozenset({1, 2}), "Q": frozenset({2, 3})}, ("P", "Q")
        )
    with pytest.raises(ValueError, match="do not encode every label"):
        LabelScheme("x", "x", {1: "A", 2: "B"}, {"P": frozenset({1})}, ("P",))


def test_detection_by_case_id_prefix_and_file_names():
    assert detect_scheme("BraTS-PED-00012-000", False)[0] == "ped"
    assert detect_scheme("BraTS-MEN-RT-0001-1", False)[0] == "menrt"
    assert detect_scheme("BraTS-MEN-00004-000", False)[0] == "menpre"
    assert detect_scheme("BraTS-MET-00002-000", False)[0] == "mets"
    assert detect_scheme("BraTS-GoAT-00002", False)[0] == "goat"
    assert detect_scheme("BraTS-GLI-00002-000", False) == ("2023", "case ID prefix BraTS-GLI")
    assert detect_scheme("BraTS2021_00002", False) == ("2021", "2018-2021 file names")
    assert detect_scheme("BraTS-SYN-00000-000", True)[0] == "2023"


def test_case_records_its_scheme_and_where_it_came_from(tmp_path):
    folder = make_cases(tmp_path, 1, shape=(16, 16, 16), seed=1, scheme="2023")[0]
    case = find_case(folder)
    assert (case.scheme, case.scheme_source) == ("2023", "detected from 2023 file names (t1n, t1c, t2w, t2f)")
    given = find_case(folder, labels="gli")
    assert (given.scheme, given.scheme_source) == ("gli", "--labels")
    assert load_case(given)[2].shape[0] == 4  # TC, WT, ET, RC


def test_unexpected_label_value_is_one_line_naming_case_value_and_scheme(tmp_path):
    folder = make_cases(tmp_path / "cases", 1, shape=(16, 16, 16), seed=2, scheme="2023")[0]
    seg = next(folder.glob("*seg.nii.gz"))
    img = nib.load(seg)
    data = np.asarray(img.dataobj).copy()
    data[0, 0, 0] = 4  # a resection cavity: post-treatment glioma, not 2023
    nib.save(nib.Nifti1Image(data, img.affine), seg)
    with pytest.raises(InputFileError) as error:
        load_case(find_case(folder))
    message = str(error.value)
    assert "label values [4] are not in scheme 2023" in message and f"in case {folder.name}" in message
    assert "pass --labels TASK" in message and "\n" not in message

    pred = tmp_path / "pred"
    pred.mkdir()
    shutil.copy(seg, pred / f"{folder.name}.nii.gz")
    runner = CliRunner()
    result = runner.invoke(main, ["segment", "eval", "--pred", str(pred), "--data", str(folder.parent)])
    assert result.exit_code == 1 and "label values [4] are not in scheme 2023" in result.output
    result = runner.invoke(
        main,
        ["segment", "eval", "--pred", str(pred), "--data", str(folder.parent), "--labels", "gli", "--json"],
    )
    assert result.exit_code == 0, result.output
    assert "lesionwise_dice_RC" in result.stdout and "legacy_hd95_SNFH" in result.stdout
    result = runner.invoke(
        main, ["segment", "eval", "--pred", str(pred), "--data", str(folder), "--labels", "x"]
    )
    assert result.exit_code == 2 and result.output.startswith(
        "error: --labels: data.labels: input should be 'auto', '2021', '2023', 'gli', 'ped', 'menpre', 'menrt', "
        "'mets' or 'goat', got 'x'"
    )


@pytest.mark.parametrize("name", ["2021", "ped", "menrt"])
def test_model_outputs_follow_the_scheme(name):
    scheme = SCHEMES[name]
    config = load_config(SegmentConfig, overrides={"model.channels": [4, 8], "model.blocks_per_level": 1})
    assert build_model(config, name).config["out_channels"] == len(scheme.channels)
    labels_config = load_config(SegmentConfig, overrides={"model.channels": [4, 8], "model.head": "labels"})
    assert build_model(labels_config, name).config["out_channels"] == 1 + len(scheme.labels)
    with pytest.raises(ValueError, match="labels head needs the label scheme"):
        SegLoss("labels")


def test_labels_head_sums_class_probabilities_into_the_channels():
    model = nn.Module()
    model.config = {"head": "labels"}
    logits = torch.randn(2, 5, 3, 3, 3)  # ped: background, ET, NETC, CC, ED
    p = torch.softmax(logits, 1)
    channels = region_probabilities(model, logits, "ped")  # TC, WT, ET, CC
    torch.testing.assert_close(channels[:, 0], p[:, 1] + p[:, 2] + p[:, 3])
    torch.testing.assert_close(channels[:, 1], 1 - p[:, 0])
    torch.testing.assert_close(channels[:, 2], p[:, 1])
    torch.testing.assert_close(channels[:, 3], p[:, 3])
    assert class_regions("ped").shape == (4, 5)
    with pytest.raises(ValueError, match="5 classes, got 4"):
        region_probabilities(model, torch.randn(1, 4, 2, 2, 2), "ped")
