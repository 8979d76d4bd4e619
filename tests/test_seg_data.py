"""BraTS case discovery (all naming schemes), label conversion, loading (raw in RAS, then z-score and mask)
and crops (with optional acquisition corruptions)."""

from __future__ import annotations

import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import SHARED_DATA

from histo.config import load_config
from histo.errors import ConfigError, InputFileError
from segmentation.config import SegmentConfig
from segmentation.corruptions import augment as corrupt_augment
from segmentation.data import (
    CropDataset,
    epoch_plan,
    find_case,
    find_cases,
    from_ras,
    load_case,
    load_raw,
    preprocess,
    to_ras,
)
from segmentation.label_schemes import labels_to_regions, regions_to_labels
from segmentation.synthetic import make_cases

BRATS = SHARED_DATA / "brats"
TCGA = BRATS / "TCGA-DU-7294"
DEEPMEDIC = BRATS / "deepmedic_brats2013_pat0005_1"
AUG = {
    "pos": 1.0,
    "neg": 1.0,
    "flip_prob": 0.5,
    "intensity_scale": 0.1,
    "intensity_shift": 0.1,
    "corruption_prob": 0.0,
}


def augment(**keys):
    """The crop augmentation config from AUG with `keys` changed (validated like a config file)."""
    return load_config(
        SegmentConfig, overrides={f"data.augment.{k}": v for k, v in {**AUG, **keys}.items()}
    ).data.augment


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    return make_cases(tmp_path_factory.mktemp("synth"), 2, shape=(24, 28, 20), seed=5)[0].parent


# --- labels ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scheme,et", [("2021", 4), ("2023", 3)])
def test_labels_to_regions_by_definition(scheme, et):
    seg = np.array([0, 1, 2, et, 0])
    tc, wt, etm = labels_to_regions(seg, scheme)
    assert tc.tolist() == [False, True, False, True, False]  # TC = NCR + ET
    assert wt.tolist() == [False, True, True, True, False]  # WT = NCR + ED + ET
    assert etm.tolist() == [False, False, False, True, False]
    assert regions_to_labels(np.stack([tc, wt, etm]), scheme).tolist() == seg.tolist()


@pytest.mark.parametrize("scheme,et", [("2021", 4), ("2023", 3)])
def test_label_round_trip_random(scheme, et):
    seg = np.random.default_rng(0).choice([0, 1, 2, et], size=(7, 6, 5)).astype(np.uint8)
    assert np.array_equal(regions_to_labels(labels_to_regions(seg, scheme), scheme), seg)


def test_labels_reject_values_outside_the_scheme():
    with pytest.raises(ValueError, match=r"\[3\].*2021"):
        labels_to_regions(np.array([0, 1, 3]), "2021")
    with pytest.raises(ValueError, match=r"\[4\].*2023"):
        labels_to_regions(np.array([0, 4]), "2023")
    with pytest.raises(ValueError, match="non-integer"):
        labels_to_regions(np.array([0.0, 1.5]), "2021")


def test_regions_to_labels_resolves_overlaps_inner_first():
    tc, wt, et = np.array([[1, 0, 0]]), np.array([[1, 1, 0]]), np.array([[0, 0, 1]])  # ET outside WT
    assert regions_to_labels(np.stack([tc, wt, et]).astype(bool), "2021").tolist() == [[1, 2, 4]]


# --- discovery ------------------------------------------------------------------------------------------


def _copy_case(src: Path, dst: Path, rename: dict[str, str]) -> Path:
    dst.mkdir(parents=True)
    for f in src.iterdir():
        name = f.name
        for old, new in rename.items():
            name = name.replace(old, new)
        shutil.copy(f, dst / name)
    return dst


def test_find_real_tcga_case_with_variant_names():
    case = find_case(TCGA)
    assert {m: p.name for m, p in case.images.items()} == {
        "t1": "TCGA-DU-7294_t1_bet.nii.gz",
        "t1ce": "TCGA-DU-7294_t1c_bet.nii.gz",
        "t2": "TCGA-DU-7294_t2_bet.nii.gz",
        "flair": "TCGA-DU-7294_fla_bet.nii.gz",
    }
    assert case.seg is None  # seg_<model>.nii.gz files are model outputs, not the case's *_seg
    assert case.scheme == "2021" and case.case_id == "TCGA-DU-7294"


def test_missing_modality_names_case_and_files():
    with pytest.raises(InputFileError) as err:
        find_case(DEEPMEDIC)
    message = str(err.value)
    assert "deepmedic_brats2013_pat0005_1" in message and "t1, t2" in message and "*_t2.nii.gz" in message


def test_naming_schemes_and_uncompressed(synth, tmp_path):
    src = sorted(synth.iterdir())[0]
    brats23 = _copy_case(
        src,
        tmp_path / "BraTS-GLI-00001-000",
        {"_t1ce": "-t1c", "_t1.": "-t1n.", "_t2": "-t2w", "_flair": "-t2f", "_seg": "-seg"},
    )
    case = find_case(brats23)
    assert (
        case.scheme == "2023"
        and case.images["t1"].name.endswith("-t1n.nii.gz")
        and case.seg.name.endswith("-seg.nii.gz")
    )
    plain = tmp_path / "plain"
    plain.mkdir()
    for f in src.iterdir():
        nib.save(nib.load(f), plain / f.name.replace(".nii.gz", ".nii"))
    case = find_case(plain)
    assert case.images["flair"].suffix == ".nii" and case.seg is not None and case.scheme == "2021"
    (plain / next(p.name for p in plain.iterdir() if "_t2." in p.name)).unlink()
    with pytest.raises(InputFileError, match="missing modality t2"):
        find_case(plain)


def test_duplicate_modality_is_an_error(synth, tmp_path):
    src = sorted(synth.iterdir())[0]
    case = _copy_case(src, tmp_path / "dup", {})
    shutil.copy(next(case.glob("*_flair.nii.gz")), case / ".synth_000_flair.nii.gz.x1.tmp.nii.gz")
    assert find_case(case).images["flair"].name == "synth_000_flair.nii.gz"  # hidden leftovers are ignored
    shutil.copy(next(case.glob("*_flair.nii.gz")), case / "extra_fla.nii.gz")
    with pytest.raises(InputFileError, match="several files for flair"):
        find_case(case)


def test_find_cases_records_bad_cases(synth, tmp_path):
    root = tmp_path / "root"
    for src in sorted(synth.iterdir()):
        shutil.copytree(src, root / src.name)
    next((root / "synth_001").glob("*_t1ce.nii.gz")).unlink()
    with pytest.raises(InputFileError, match="synth_001"):
        find_cases(root)
    errors: list[dict] = []
    assert [c.case_id for c in find_cases(root, errors=errors)] == ["synth_000"]
    assert errors[0]["case_id"] == "synth_001" and "t1ce" in errors[0]["reason"]


# --- loading --------------------------------------------------------------------------------------------


def test_load_case_ras_zscore_and_mask(synth):
    case = find_cases(synth)[0]
    image, brain, regions, affine, header = load_case(case)
    imgs = [nib.load(case.images[m]) for m in ("t1", "t1ce", "t2", "flair")]
    canonical = [nib.as_closest_canonical(i) for i in imgs]
    raw = np.stack([np.asarray(c.dataobj, dtype=np.float64) for c in canonical])
    assert nib.aff2axcodes(imgs[0].affine) == ("L", "P", "S")  # the synthetic data really needs reorienting
    assert image.shape == (4, *canonical[0].shape) and image.dtype == np.float32
    assert np.array_equal(brain, np.any(raw != 0, axis=0))
    for c in range(4):  # z-score over each channel's own non-zero voxels, float64 reference
        nz = raw[c] != 0
        expected = (raw[c][nz] - raw[c][nz].mean()) / raw[c][nz].std()
        np.testing.assert_allclose(image[c][nz], expected, atol=1e-4)
        assert np.all(image[c][~nz] == 0)
    seg = np.asarray(nib.as_closest_canonical(nib.load(case.seg)).dataobj)
    assert np.array_equal(regions.astype(bool), labels_to_regions(seg, "2021"))
    assert np.array_equal(affine, imgs[3].affine) and header["dim"][1] == imgs[3].shape[0]


def test_load_raw_is_the_acquisition_and_load_case_its_preprocessing(synth):
    case = find_cases(synth)[0]
    raw, regions, affine, header = load_raw(case)
    canonical = [nib.as_closest_canonical(nib.load(case.images[m])) for m in ("t1", "t1ce", "t2", "flair")]
    assert raw.dtype == np.float32
    np.testing.assert_array_equal(raw, np.stack([np.asarray(c.dataobj, dtype=np.float32) for c in canonical]))
    image, brain, regions2, affine2, _ = load_case(case)
    expected_image, expected_brain = preprocess(raw)
    assert np.array_equal(image, expected_image) and np.array_equal(brain, expected_brain)
    assert np.array_equal(regions, regions2) and np.array_equal(affine, affine2)
    flair = nib.load(case.images["flair"])
    assert np.array_equal(affine, flair.affine) and np.array_equal(header.get_best_affine(), flair.affine)


def test_to_ras_and_back_round_trip():
    rng = np.random.default_rng(0)
    volume = rng.random((2, 5, 6, 7))
    for affine in (
        np.diag([-1.0, -1.0, 1.0, 1.0]),
        np.array([[0, 0, 2.0, 0], [-1.0, 0, 0, 0], [0, 1.0, 0, 0], [0, 0, 0, 1]]),
    ):
        ras = to_ras(volume, affine)
        expected = nib.as_closest_canonical(nib.Nifti1Image(volume[0], affine)).get_fdata()
        np.testing.assert_array_equal(ras[0], expected)
        np.testing.assert_array_equal(from_ras(ras, affine), volume)


def test_load_case_rejects_mismatched_grids(synth, tmp_path):
    case_dir = _copy_case(sorted(synth.iterdir())[0], tmp_path / "bad", {})
    t2 = next(case_dir.glob("*_t2.nii.gz"))
    img = nib.load(t2)
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj)[:-1], img.affine), t2)
    with pytest.raises(InputFileError, match=r"_t2\.nii\.gz: shape"):
        load_case(find_case(case_dir))


def test_load_case_rejects_labels_outside_scheme(synth, tmp_path):
    case_dir = _copy_case(sorted(synth.iterdir())[0], tmp_path / "badseg", {})
    seg = next(case_dir.glob("*_seg.nii.gz"))
    img = nib.load(seg)
    data = np.asarray(img.dataobj).copy()
    data[0, 0, 0] = 3
    nib.save(nib.Nifti1Image(data, img.affine), seg)
    with pytest.raises(InputFileError, match=r"_seg\.nii\.gz: label values \[3\]"):
        load_case(find_case(case_dir))


# --- training crops -------------------------------------------------------------------------------------


def test_crops_are_seeded_and_tumour_biased(synth):
    cases = find_cases(synth)
    ds = CropDataset(cases, (16, 16, 16), augment(neg=0.0))
    plan = epoch_plan(len(cases), 6, seed=0, epoch=0)
    items = [ds[item] for item in plan]
    for item in items:
        assert item["image"].shape == (4, 16, 16, 16) and item["label"].shape == (3, 16, 16, 16)
        assert item["label"][1].sum() > 0  # pos-only crops are centred on tumour
        assert set(np.unique(item["mask"].numpy())) <= {0.0, 1.0}
    again = ds[plan[3]]
    assert all(np.array_equal(again[k], items[3][k]) for k in again)
    other = epoch_plan(len(cases), 6, seed=0, epoch=1)
    assert not all(np.array_equal(ds[item]["image"], items[k]["image"]) for k, item in enumerate(other))


def test_crops_pad_small_volumes_and_negatives_sit_in_the_brain(synth):
    cases = find_cases(synth)
    big = CropDataset(cases, (32, 32, 32), augment())
    assert big[(0, 0)]["image"].shape == (4, 32, 32, 32)  # padded up from (24, 28, 20)
    ds = CropDataset(cases, (8, 8, 8), augment(pos=0.0, flip_prob=0.0))
    for seed in range(12):
        item = ds[(0, seed)]
        assert item["mask"][0, 4, 4, 4] == 1 and item["label"][1, 4, 4, 4] == 0  # centred on non-tumour brain


def test_crops_can_carry_seeded_acquisition_corruptions(synth):
    """corruption_prob > 0: the raw volume is corrupted (seeded by the item) and then preprocessed."""
    cases = find_cases(synth)
    whole = {"flip_prob": 0.0, "intensity_scale": 0.0, "intensity_shift": 0.0}
    roi = (24, 28, 20)  # the whole volume: the crop is the model input itself
    plain = CropDataset(cases, roi, augment(**whole))
    corrupted = CropDataset(cases, roi, augment(**whole, corruption_prob=0.5))
    raw = load_raw(cases[0])[0]
    changed = 0
    for seed in range(4):
        item, clean = corrupted[(0, seed)], plain[(0, seed)]
        expected, _ = preprocess(corrupt_augment(raw, np.random.default_rng(seed), 0.5))
        np.testing.assert_array_equal(item["image"].numpy(), expected)
        assert np.array_equal(item["label"], clean["label"]) and np.array_equal(item["mask"], clean["mask"])
        assert np.array_equal(corrupted[(0, seed)]["image"], item["image"])  # seeded: the same sample again
        changed += not np.array_equal(item["image"], clean["image"])
    assert changed >= 3
    np.testing.assert_array_equal(plain[(0, 0)]["image"].numpy(), load_case(cases[0])[0])  # 0 = today's input
    with pytest.raises(ConfigError, match=r"data\.augment\.corruption_prob: .*less than or equal to 1"):
        augment(corruption_prob=1.5)


def test_epoch_plan_is_deterministic_and_balanced():
    a, b = epoch_plan(5, 10, seed=1, epoch=3), epoch_plan(5, 10, seed=1, epoch=3)
    assert a == b and a != epoch_plan(5, 10, seed=1, epoch=4)
    assert sorted(i for i, _ in a) == sorted(list(range(5)) * 2)


# --- synthetic cases ------------------------------------------------------------------------------------


@pytest.mark.parametrize("scheme,et", [("2021", 4), ("2023", 3)])
def test_synthetic_contrasts_geometry_and_naming(tmp_path, scheme, et):
    folders = make_cases(tmp_path, 2, shape=(32, 32, 32), seed=4, scheme=scheme)
    centres = []
    for folder in folders:
        case = find_case(folder)
        assert case.scheme == scheme
        vol = {m: np.asarray(nib.load(p).dataobj, dtype=np.float64) for m, p in case.images.items()}
        seg = np.asarray(nib.load(case.seg).dataobj)
        assert set(np.unique(seg)) == {0, 1, 2, et}
        assert nib.load(case.seg).header.get_zooms() == (1.0, 1.0, 1.0)
        normal = (vol["flair"] != 0) & (seg == 0)

        def mean(m, mask, vol=vol):
            return vol[m][mask].mean()

        assert mean("t1ce", seg == et) > 1.4 * mean("t1ce", normal)  # enhancing rim bright on T1ce
        assert mean("flair", seg == 2) > 1.4 * mean("flair", normal)  # edema bright on FLAIR
        assert mean("t2", seg == 2) > 1.4 * mean("t2", normal) and mean("t2", seg == 1) > mean(
            "t2", seg == et
        )
        assert mean("t1", seg == 1) < 0.7 * mean("t1", normal)  # core dark on T1
        assert np.all(vol["t1"][vol["flair"] == 0] == 0)  # background is exactly 0 in every modality
        centres.append(np.argwhere(seg > 0).mean(axis=0))
    assert np.abs(centres[0] - centres[1]).max() > 1.0  # the tumour moves between cases


def test_ras_spacing_matches_nibabel_canonical_zooms():
    import nibabel as nib

    from segmentation.data import ras_spacing

    affine = np.array(
        [[0, 0, 3.0, 5], [-2.0, 0, 0, 1], [0, 1.5, 0, 2], [0, 0, 0, 1]]
    )  # permuted, one axis flipped
    canonical = nib.as_closest_canonical(nib.Nifti1Image(np.zeros((4, 5, 6), np.float32), affine))
    assert ras_spacing(affine) == pytest.approx(canonical.header.get_zooms()[:3])
    assert ras_spacing(affine) == pytest.approx((3.0, 2.0, 1.5))
