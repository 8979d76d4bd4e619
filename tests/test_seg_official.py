"""Agreement with the official BraTS scorer (`brats-evaluation` 0.0.10 on panoptica 2.1.7), run through
scripts/brats_official.py in its own venv (`make .venv-brats`; the `full` lane).

The same predictions go through `histo segment eval` (segmentation.evaluate.evaluate_predictions) and
through the package's `evaluate_single_exam` + task parser: the real shared BraTS-space cases (model
segmentations of TCGA-DU-7294, expert labels of BraTS 2013 patient 0005 against a shifted copy with a
spurious lesion) and synthetic lesions that are split, merged, missed, spurious, tiny and shifted, for
every label scheme. Global and lesion-wise Dice and HD95 and the TP/FP/FN counts must be equal within
1e-9 (absolute): the definitions are the same, but the sums and the pooled percentile run in another
order and the package's numbers pass through its CSV, which may change the last bits. The package
reports a lesion-wise HD95 with no matched lesion as infinite, histo as 373 (the package's penalty
elsewhere); NaN (nothing to score) must be NaN on both sides. Tasks with a bundled config are scored with
it, and its label groups must equal histo's table; 2018-2021 uses a config built like the bundled ones.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import SHARED_DATA
from scipy import ndimage

from segmentation.evaluate import evaluate_predictions
from segmentation.label_schemes import SCHEMES, LabelScheme

pytestmark = pytest.mark.full

ROOT = Path(__file__).resolve().parents[1]
ORACLE = Path(os.environ.get("HISTO_BRATS_ORACLE", ROOT / ".venv-brats" / "bin" / "python"))
TOLERANCE = 1e-9
FIELDS = {  # official key -> histo key prefix
    "global_dice": "global_dice",
    "global_hd95": "global_hd95",
    "lesionwise_dice": "lesionwise_dice",
    "lesionwise_hd95": "lesionwise_hd95",
    "tp": "lesions_tp",
    "fp": "lesions_fp",
    "fn": "lesions_fn",
}
TCGA = SHARED_DATA / "brats" / "TCGA-DU-7294"
DEEPMEDIC = SHARED_DATA / "brats" / "deepmedic_brats2013_pat0005_1"
AGREEMENT: dict[str, dict] = {}  # scheme -> {"comparisons": n, metric: max |difference|}, printed at the end


def official(pairs: list[tuple[str, Path, Path]], scheme: LabelScheme) -> dict:
    """The official scorer's numbers for (case id, prediction, reference) files."""
    if not ORACLE.exists():
        pytest.fail(f"the official scorer's venv is missing ({ORACLE}): run `make .venv-brats`")
    job = {
        "cases": [{"id": i, "pred": str(p), "ref": str(r)} for i, p, r in pairs],
        "config": scheme.official,
        "groups": {region: sorted(values) for region, values in scheme.regions.items()},
        "parser": "mets" if scheme.lesionwise == "penalised" else "seg",
    }
    script = ROOT / "scripts" / "brats_official.py"
    done = subprocess.run(
        [str(ORACLE), str(script)], input=json.dumps(job), capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)
    assert report["groups"] == {r: sorted(v) for r, v in scheme.regions.items()}  # histo's table = the config
    return report


def expected(value) -> float:
    """An official number as histo reports it: NaN for none, 373 for an infinite lesion-wise HD95."""
    if value is None:
        return math.nan
    return 373.0 if value == "inf" else float(value)


def assert_agreement(
    tmp: Path, scheme_name: str, cases: dict[str, tuple[np.ndarray, np.ndarray]], affine
) -> None:
    """Write the cases, score them both ways and require equal numbers for every region and field."""
    scheme = SCHEMES[scheme_name]
    data, pred = tmp / f"data_{scheme_name}", tmp / f"pred_{scheme_name}"
    pairs = []
    for case_id, (p, r) in cases.items():
        (data / case_id).mkdir(parents=True)
        pred.mkdir(exist_ok=True)
        ref_path, pred_path = data / case_id / f"{case_id}_seg.nii.gz", pred / f"{case_id}.nii.gz"
        nib.save(nib.Nifti1Image(r.astype(np.uint8), affine), ref_path)
        nib.save(nib.Nifti1Image(p.astype(np.uint8), affine), pred_path)
        pairs.append((case_id, pred_path, ref_path))
    ours = {
        o.id: o
        for o in evaluate_predictions(
            pred, data, tmp / f"report_{scheme_name}", {"data": {"labels": scheme_name}}, progress=False
        ).outcomes
    }
    theirs = official(pairs, scheme)["cases"]
    row = AGREEMENT.setdefault(scheme_name, {"comparisons": 0} | {k: 0.0 for k in FIELDS})
    for case_id in cases:
        assert ours[case_id].status == "done", ours[case_id].reason
        for region in scheme.regions:
            for field, key in FIELDS.items():
                want, got = expected(theirs[case_id][region][field]), ours[case_id].detail[f"{key}_{region}"]
                where = f"{scheme_name} {case_id} {region} {field}: official {want}, histo {got}"
                if math.isnan(want):
                    assert math.isnan(got), where
                    continue
                assert abs(got - want) <= TOLERANCE, where
                row[field] = max(row[field], abs(got - want))
                row["comparisons"] += 1


def box(volume: np.ndarray, value: int, lo, hi) -> None:
    volume[tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))] = value


def synthetic(values: tuple[int, ...]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """(prediction, reference) label maps with split, merged, missed, spurious, tiny and shifted lesions,
    using the scheme's label values in turn; a second case leaves most regions empty on one or both sides."""
    a, b, c = (values * 3)[:3]
    ref, pred = np.zeros((96, 96, 96), np.uint8), np.zeros((96, 96, 96), np.uint8)
    box(ref, a, (10, 10, 10), (22, 22, 22))  # split: the prediction is cut in two by a plane
    box(pred, a, (10, 10, 10), (15, 22, 22))
    box(pred, a, (17, 10, 10), (22, 22, 22))
    box(ref, b, (40, 10, 10), (46, 16, 16))  # merged: two reference lesions, one predicted lesion
    box(ref, b, (48, 10, 10), (54, 16, 16))
    box(pred, b, (40, 10, 10), (54, 16, 16))
    box(ref, c, (70, 10, 10), (78, 18, 18))  # missed
    box(pred, c, (70, 70, 70), (76, 76, 76))  # spurious
    box(ref, a, (10, 70, 10), (12, 72, 13))  # tiny (12 voxels < 20 mm3), missed
    box(ref, b, (40, 40, 40), (50, 50, 50))  # shifted by 3 voxels
    box(pred, b, (43, 42, 41), (53, 52, 51))
    blob = ndimage.gaussian_filter(np.random.default_rng(0).standard_normal((20, 20, 20)), 2) > 0.1
    ref[60:80, 40:60, 40:60][blob] = c  # an irregular lesion, predicted dilated
    pred[60:80, 40:60, 40:60][ndimage.binary_dilation(blob)] = c
    lone_ref, lone_pred = np.zeros_like(ref), np.zeros_like(ref)
    box(lone_ref, a, (30, 30, 30), (40, 40, 40))  # only one label in the reference, nothing predicted
    return {"lesions": (pred, ref), "nothing_predicted": (lone_pred, lone_ref)}


@pytest.mark.parametrize("scheme", sorted(SCHEMES))
def test_synthetic_lesions_agree_with_the_official_scorer(tmp_path, scheme):
    assert_agreement(tmp_path, scheme, synthetic(SCHEMES[scheme].values), np.eye(4))


def test_real_model_segmentations_agree_with_the_official_scorer(tmp_path):
    segs = {
        name: np.asarray(nib.load(TCGA / f"seg_{name}.nii.gz").dataobj)
        for name in ("hnfnetv1-20", "sanet0-20", "fusion_simple")
    }
    affine = nib.load(TCGA / "seg_hnfnetv1-20.nii.gz").affine
    pairs = {f"{p}_vs_{r}": (segs[p], segs[r]) for p in segs for r in segs if p != r}
    assert_agreement(tmp_path, "2021", pairs, affine)
    as_2023 = {k: (np.where(p == 4, 3, p), np.where(r == 4, 3, r)) for k, (p, r) in pairs.items()}
    for scheme in ("2023", "menpre", "goat"):
        assert_agreement(tmp_path, scheme, as_2023, affine)
    as_gtv = {k: ((p > 0).astype(np.uint8), (r > 0).astype(np.uint8)) for k, (p, r) in pairs.items()}
    assert_agreement(tmp_path, "menrt", as_gtv, affine)


def test_real_expert_labels_agree_with_the_official_scorer(tmp_path):
    """Expert labels 1-4 (BraTS 2013) against a copy shifted by (2, -1, 1) voxels with a spurious lesion."""
    img = nib.load(DEEPMEDIC / "OTMultiClass.nii.gz")
    ref = np.asarray(img.dataobj).astype(np.uint8)
    pred = np.roll(ref, (2, -1, 1), axis=(0, 1, 2))
    box(pred, 4, (20, 20, 20), (26, 26, 26))
    box(pred, 3, (30, 200, 40), (33, 203, 44))
    for scheme in ("gli", "ped", "mets"):
        assert_agreement(tmp_path, scheme, {"pat0005": (pred, ref), "pat0005_self": (ref, ref)}, img.affine)


def test_print_agreement_table():
    """The largest difference per scheme and field over every comparison above (run with -s to see it)."""
    assert AGREEMENT, "run with the agreement tests"
    print("\nscheme   numbers " + " ".join(f"{f:>16s}" for f in FIELDS))
    for scheme, row in sorted(AGREEMENT.items()):
        print(f"{scheme:8s} {row['comparisons']:7d} " + " ".join(f"{row[f]:16.2e}" for f in FIELDS))
    assert all(row[f] <= TOLERANCE for row in AGREEMENT.values() for f in FIELDS)
