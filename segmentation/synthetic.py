"""Synthetic BraTS-like cases for tests and the demo: four MRI contrasts of a textured, brain-shaped
ellipsoid with a tumour (necrosis, enhancing rim, edema) at a random place and size, as NIfTI folders.

Contrasts follow the clinical pattern: enhancing tumour bright on T1ce, edema and necrosis bright on T2,
edema bright on FLAIR, the core dark on T1. Volumes use BraTS's 1 mm LPS-style affine.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
from scipy.ndimage import gaussian_filter

from segmentation.data import write_nifti
from segmentation.label_schemes import get_scheme

NAMES = {
    "2021": {"t1": "t1", "t1ce": "t1ce", "t2": "t2", "flair": "flair", "seg": "seg"},
    "2023": {"t1": "t1n", "t1ce": "t1c", "t2": "t2w", "flair": "t2f", "seg": "seg"},
}
# Mean intensity (x 1000) of each tissue per modality: grey matter, white matter, necrosis, edema, enhancing.
CONTRAST = {
    "t1": {"gm": 0.60, "wm": 0.80, "ncr": 0.30, "ed": 0.50, "et": 0.55},
    "t1ce": {"gm": 0.60, "wm": 0.80, "ncr": 0.30, "ed": 0.50, "et": 1.40},
    "t2": {"gm": 0.65, "wm": 0.45, "ncr": 1.15, "ed": 0.95, "et": 0.75},
    "flair": {"gm": 0.60, "wm": 0.50, "ncr": 0.55, "ed": 1.15, "et": 0.85},
}


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], sigma: float) -> np.ndarray:
    field = gaussian_filter(rng.standard_normal(shape), sigma)
    return field / (field.std() + 1e-12)


def _case_id(index: int, scheme: str) -> str:
    return f"BraTS-SYN-{index:05d}-000" if scheme == "2023" else f"synth_{index:03d}"


def synthesize(
    shape: tuple[int, int, int], rng: np.random.Generator
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """-> ({modality: float32 volume}, tissue map) with tissue codes 0 bg, 1 gm, 2 wm, 3 ncr, 4 ed, 5 et."""
    axes = [np.linspace(-1, 1, n) for n in shape]
    grid = np.stack(np.meshgrid(*axes, indexing="ij"))
    radii = np.array([0.82, 0.86, 0.78]) * rng.uniform(0.93, 1.05, size=3)
    radius = np.sqrt(sum((grid[i] / radii[i]) ** 2 for i in range(3)))
    brain = radius + 0.06 * _smooth_noise(rng, shape, 4.0) < 1.0
    tissue = np.where(brain, 1, 0)
    white = brain & (radius + 0.25 * _smooth_noise(rng, shape, 2.5) < 0.7)
    tissue[white] = 2

    centre = np.array([rng.uniform(-0.45, 0.45) for _ in range(3)]) * radii
    dist = np.sqrt(sum((grid[i] - centre[i]) ** 2 for i in range(3)))  # in half-extent units
    core_r = rng.uniform(0.12, 0.25)
    edema_r = core_r * rng.uniform(1.4, 2.0)
    core_d = dist / core_r + 0.12 * _smooth_noise(rng, shape, 2.0)
    edema = brain & (dist / edema_r + 0.2 * _smooth_noise(rng, shape, 3.0) < 1.0)
    core = brain & (core_d < 1.0)
    rim = core & (core_d > rng.uniform(0.45, 0.7))
    tissue[edema] = 4
    tissue[core] = 3
    tissue[rim] = 5

    bias = 1.0 + 0.08 * _smooth_noise(rng, shape, 12.0)
    texture = 0.04 * _smooth_noise(rng, shape, 1.0)
    codes = ("bg", "gm", "wm", "ncr", "ed", "et")
    images = {}
    for modality, means in CONTRAST.items():
        lut = np.array([0.0] + [means[c] for c in codes[1:]])
        volume = gaussian_filter(lut[tissue], 0.6) * bias + texture + 0.03 * rng.standard_normal(shape)
        images[modality] = np.where(brain, np.clip(volume, 0.01, None) * 1000.0, 0.0).astype(np.float32)
    return images, tissue


def brats_affine(shape: tuple[int, int, int]) -> np.ndarray:
    """BraTS's 1 mm affine (axes L, P, S as in the released volumes)."""
    affine = np.diag([-1.0, -1.0, 1.0, 1.0])
    affine[1, 3] = shape[1] - 1
    return affine


def make_cases(
    out_dir: str | Path, n_cases: int, shape=(64, 64, 64), seed: int = 0, scheme: str = "2021"
) -> list[Path]:
    """Write `n_cases` case folders (4 modalities + seg, naming and labels of `scheme`); return the folders."""
    fill = get_scheme(scheme).fill  # the label value of each channel region: TC -> NCR, WT -> ED, ET -> ET
    labels = {"ncr": fill["TC"], "ed": fill["WT"], "et": fill["ET"]}
    names = NAMES[scheme]
    shape = tuple(int(s) for s in shape)
    affine = brats_affine(shape)
    out_dir = Path(out_dir)
    folders = []
    for index in range(n_cases):
        rng = np.random.default_rng([seed, index])
        images, tissue = synthesize(shape, rng)
        case_id = _case_id(index, scheme)
        folder = out_dir / case_id
        folder.mkdir(parents=True, exist_ok=True)
        for modality, volume in images.items():
            write_nifti(
                folder / f"{case_id}{_sep(scheme)}{names[modality]}.nii.gz",
                nib.Nifti1Image(volume.astype(np.int16), affine),
            )
        seg = np.zeros(shape, dtype=np.uint8)
        seg[tissue == 3], seg[tissue == 4], seg[tissue == 5] = labels["ncr"], labels["ed"], labels["et"]
        write_nifti(folder / f"{case_id}{_sep(scheme)}{names['seg']}.nii.gz", nib.Nifti1Image(seg, affine))
        folders.append(folder)
    return folders


def _sep(scheme: str) -> str:
    return "-" if scheme == "2023" else "_"
