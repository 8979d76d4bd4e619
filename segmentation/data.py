"""BraTS case folders: discovery under all common naming schemes and the nnU-Net raw layout, loading, and
training crops.

Arrays are returned in RAS voxel order (MONAI `Orientation`): raw as acquired (`load_raw`, what corruptions
act on) or channel-wise z-scored over non-zero voxels (`preprocess`, the model input; `load_case` does both);
the source affine and header travel along so `from_ras` can write outputs in the input's own voxel order.

nnU-Net raw layout: a folder of `CASE_0000.nii.gz`, `CASE_0001.nii.gz`, ... (one file per channel) with a
`dataset.json` in it or its parent whose `channel_names` (v2) or `modality` (v1) map names the channels;
labels are `labelsTr/CASE.nii.gz` beside `imagesTr/`. A dataset root (holding `dataset.json` and
`imagesTr/`) stands for its training cases. Such a case is identified by its `_0000` file.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from histo.errors import InputFileError
from histo.io import atomic_path
from segmentation.config import CropAugment
from segmentation.label_schemes import SCHEMES, detect_scheme, get_scheme, labels_to_regions

log = logging.getLogger(__name__)

MODALITIES = ("t1", "t1ce", "t2", "flair")
# filename token -> modality; 2018-2021 (t1, t1ce, t2, flair), 2023 (t1n, t1c, t2w, t2f), variants (t1c, fla, t1gd).
TOKENS = {
    "t1": "t1",
    "t1n": "t1",
    "t1ce": "t1ce",
    "t1c": "t1ce",
    "t1gd": "t1ce",
    "t2": "t2",
    "t2w": "t2",
    "flair": "flair",
    "fla": "flair",
    "t2f": "flair",
}
TOKENS_2023 = {"t1n", "t2w", "t2f"}
NIFTI = re.compile(r"\.nii(\.gz)?$", re.IGNORECASE)
NNUNET_FILE = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})\.nii(\.gz)?$", re.IGNORECASE)
DATASET_JSON = "dataset.json"


@dataclass(frozen=True)
class Case:
    """One BraTS case: a path per modality, the label map if present, its label scheme and why that one
    (`--labels`, or what detection saw), and for nnU-Net cases the dataset's channel order."""

    case_id: str
    images: dict[str, Path]
    seg: Path | None
    scheme: str
    folder: Path = field(default=Path("."), compare=False)
    scheme_source: str = field(default="", compare=False)
    channel_order: tuple[str, ...] | None = field(default=None, compare=False)


def _tokens(path: Path) -> list[str]:
    return [t for t in re.split(r"[_\-.\s]+", NIFTI.sub("", path.name).lower()) if t]


def _scheme_of(case_id: str, labels: str | None, names_2023: bool) -> tuple[str, str]:
    """(scheme, source): `labels` when given (`--labels`), else detected from the case ID and file names."""
    if labels is not None:
        return get_scheme(labels).name, "--labels"
    name, why = detect_scheme(case_id, names_2023)
    return name, f"detected from {why}"


def find_case(folder: str | Path, labels: str | None = None, images: bool = True) -> Case:
    """Identify the four modalities (and `*_seg`/`*-seg`) in a case folder, or an nnU-Net case from its
    `_0000` file; InputFileError if a modality is missing (unless `images` is False: the label map is all
    an evaluation needs). `labels` names the label scheme; None detects it (see label_schemes.detect_scheme)."""
    folder = Path(folder)
    if folder.is_file() and NNUNET_FILE.match(folder.name):
        return _nnunet_case(folder, labels, images)
    if not folder.is_dir():
        raise InputFileError(folder, "case folder not found")
    found: dict[str, list[Path]] = {}
    segs: list[Path] = []
    uses_2023 = False
    # Hidden files (temporary writes, macOS "._" companions) are never case files.
    for path in sorted(
        p for p in folder.iterdir() if p.is_file() and NIFTI.search(p.name) and p.name[0] != "."
    ):
        tokens = _tokens(path)
        if tokens and tokens[-1] == "seg":
            segs.append(path)
            continue
        hits = {TOKENS[t] for t in tokens if t in TOKENS}
        if len(hits) == 1:
            found.setdefault(hits.pop(), []).append(path)
            uses_2023 |= any(t in TOKENS_2023 for t in tokens)
    missing = [m for m in MODALITIES if m not in found]
    nifti = [p for p in folder.iterdir() if p.is_file() and NIFTI.search(p.name) and p.name[0] != "."]
    if missing and nifti and all(NNUNET_FILE.match(p.name) for p in nifti):
        raise InputFileError(
            folder,
            f"nnU-Net channel files (CASE_0000.nii.gz, ...) but no {DATASET_JSON} here or in the parent",
        )
    if missing and images:
        expected = ", ".join(f"*_{m}.nii.gz" for m in missing)
        raise InputFileError(
            folder, f"case {folder.name} is missing modality {', '.join(missing)} ({expected})"
        )
    for modality, paths in found.items():
        if len(paths) > 1:
            names = ", ".join(p.name for p in paths)
            raise InputFileError(folder, f"case {folder.name}: several files for {modality}: {names}")
    if len(segs) > 1:
        raise InputFileError(
            folder, f"case {folder.name}: several label files: {', '.join(p.name for p in segs)}"
        )
    scheme, source = _scheme_of(folder.name, labels, uses_2023)
    paths = {m: found[m][0] for m in MODALITIES if m in found}
    return Case(folder.name, paths, segs[0] if segs else None, scheme, folder, source)


def _dataset_json(images_dir: Path) -> Path | None:
    """The nnU-Net `dataset.json` of an images folder (in it or its parent), None when there is none."""
    for candidate in (images_dir / DATASET_JSON, images_dir.parent / DATASET_JSON):
        if candidate.is_file():
            return candidate
    return None


def read_dataset_json(path: Path) -> tuple[dict[str, str], set[int] | None]:
    """({channel index "0000": modality}, declared non-background label values or None) of an nnU-Net
    dataset.json (v1 `modality` or v2 `channel_names`); one-line errors for a bad map."""
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise InputFileError(path, f"not a readable JSON file ({type(e).__name__})") from None
    names = meta.get("channel_names", meta.get("modality")) if isinstance(meta, dict) else None
    if not isinstance(names, dict) or not names:
        raise InputFileError(path, "no channel map ('channel_names' or 'modality': {\"0\": \"T1\", ...})")
    channels: dict[str, str] = {}
    for index, name in names.items():
        hits = {TOKENS[t] for t in re.split(r"[^a-z0-9]+", str(name).lower()) if t in TOKENS}
        if not str(index).isdigit() or len(hits) != 1:
            raise InputFileError(
                path, f"channel {index}: {name!r} is not one BraTS modality (T1, T1ce, T2, FLAIR)"
            )
        channels[f"{int(index):04d}"] = hits.pop()
    doubled = sorted({m for m in channels.values() if list(channels.values()).count(m) > 1})
    if doubled:
        raise InputFileError(path, f"modality {', '.join(doubled)} is named by several channels")
    return channels, _label_values(path, meta.get("labels"))


def _label_values(path: Path, labels) -> set[int] | None:
    """The non-background values of a dataset.json `labels` map (v1 {"1": name}, v2 {name: 1}); refuses
    region-based maps (nnU-Net's converted BraTS relabels 1 ED, 2 NCR, 3 ET)."""
    if not isinstance(labels, dict):
        return None
    if any(isinstance(v, list) for v in labels.values()):
        raise InputFileError(
            path,
            "declares region-based labels (nnU-Net's converted BraTS: 1 ED, 2 NCR, 3 ET); "
            "histo reads label files in the BraTS values of one --labels task",
        )
    try:
        values = [int(k) for k in labels] if all(str(k).isdigit() for k in labels) else labels.values()
        return {int(v) for v in values} - {0}
    except (TypeError, ValueError):
        raise InputFileError(path, f"'labels' is not a map of label names and values: {labels}") from None


def _nnunet_case(first: Path, labels: str | None, images: bool) -> Case:
    """The nnU-Net case whose `_0000` file is `first`: channels through dataset.json, labels from labelsTr."""
    match = NNUNET_FILE.match(first.name)
    case_id, folder = match.group("case"), first.parent
    meta = _dataset_json(folder)
    if meta is None:
        raise InputFileError(first, f"no {DATASET_JSON} in {folder} or its parent to name the channels")
    channels, declared = read_dataset_json(meta)
    suffix = first.name[len(case_id) + 5 :]
    paths = {m: folder / f"{case_id}_{index}{suffix}" for index, m in channels.items()}
    missing = [f"{case_id}_{i}{suffix} ({m})" for i, m in channels.items() if not paths[m].is_file()]
    if missing and images:
        raise InputFileError(first, f"case {case_id} is missing channel {', '.join(missing)}")
    absent = [m for m in MODALITIES if m not in channels.values()]
    if absent and images:
        raise InputFileError(meta, f"names no channel for modality {', '.join(absent)}")
    label_dir = folder.parent / folder.name.replace("images", "labels", 1)
    segs = [label_dir / f"{case_id}{s}" for s in (suffix, ".nii.gz", ".nii")]
    seg = next((p for p in segs if p.is_file() and label_dir != folder), None)
    scheme, source = _scheme_of(case_id, labels, False)
    if seg is not None and declared is not None and declared != set(SCHEMES[scheme].labels):
        raise InputFileError(
            meta,
            f"declares label values {sorted(declared)}, not those of scheme {scheme} "
            f"({SCHEMES[scheme].describe()}; {source}); pass --labels TASK",
        )
    present = {m: p for m, p in paths.items() if p.is_file()}
    order = tuple(channels[i] for i in sorted(channels))
    return Case(case_id, present, seg, scheme, first, source, order)


def case_id_of(path: Path) -> str:
    """The case ID of a discovered case path: a folder's name, or the CASE of an nnU-Net `CASE_0000` file."""
    match = NNUNET_FILE.match(path.name) if path.is_file() else None
    return match.group("case") if match else path.name


def _nnunet_images(root: Path) -> Path | None:
    """The nnU-Net images folder `root` stands for (itself, or `imagesTr` of a dataset root), else None."""
    if (root / DATASET_JSON).is_file() and (root / "imagesTr").is_dir():
        return root / "imagesTr"
    files = [p for p in root.iterdir() if p.is_file() and NIFTI.search(p.name) and p.name[0] != "."]
    if files and _dataset_json(root) is not None and all(NNUNET_FILE.match(p.name) for p in files):
        return root
    return None


def _is_first_channel(path: Path) -> bool:
    match = NNUNET_FILE.match(path.name)
    return bool(match) and match.group("channel") == "0000" and path.name[0] != "."


def case_folders(root: str | Path) -> list[Path]:
    """The cases under `root`: the `_0000` files of an nnU-Net images folder (or of a dataset root's
    imagesTr), else `root` itself when it holds NIfTI files, else its sub-folders that do (sorted)."""
    root = Path(root)
    images = _nnunet_images(root)
    if images is not None:
        return sorted(p for p in images.iterdir() if p.is_file() and _is_first_channel(p))
    if any(NIFTI.search(p.name) for p in root.iterdir() if p.is_file()):
        return [root]
    return sorted(p for p in root.iterdir() if p.is_dir() and any(NIFTI.search(q.name) for q in p.iterdir()))


@dataclass(frozen=True)
class CaseFolder:
    """A case folder to process (an item of `histo.batch.run_batch`); `duplicate_of` when its case ID
    was already taken by an earlier folder (both would write one output)."""

    id: str
    path: Path
    duplicate_of: Path | None = None


def case_items(case_dirs: Sequence[str | os.PathLike]) -> list[CaseFolder]:
    """The case folders named or found in `case_dirs`; a named path that is no folder stays an item (it
    fails as one), a folder holding no case adds nothing (a warning says so when others do add cases;
    when none does, the caller's one-line error says it)."""
    found = {d: case_folders(d) if d.is_dir() else [d] for d in map(Path, case_dirs)}
    folders = [f for fs in found.values() for f in fs]
    for d, fs in found.items():
        if folders and not fs:
            log.warning("%s: no case folders with NIfTI files", d)
    first: dict[str, Path] = {}
    ids = [case_id_of(f) for f in folders]
    return [
        CaseFolder(i, f, None if first.setdefault(i, f) == f else first[i])
        for i, f in zip(ids, folders, strict=True)
    ]


def find_cases(root: str | Path, errors: list[dict] | None = None, labels: str | None = None) -> list[Case]:
    """Cases under `root` (itself a case folder, a folder of case folders, or an nnU-Net folder), sorted by
    id; `labels` names their label scheme (None: detected per case).

    A bad case raises InputFileError, or, when `errors` is a list, is appended to it as
    {"case_id", "status": "failed", "reason"} and left out.
    """
    root = Path(root)
    if not root.is_dir():
        raise InputFileError(root, "data folder not found")
    folders = case_folders(root)
    if not folders:
        raise InputFileError(root, "no case folders with NIfTI files found")
    cases = []
    for folder in folders:
        try:
            cases.append(find_case(folder, labels))
        except InputFileError as e:
            if errors is None:
                raise
            errors.append({"case_id": case_id_of(folder), "status": "failed", "reason": str(e)})
    return cases


def read_nifti(path: Path) -> nib.Nifti1Image:
    """Open a 3D NIfTI (a trailing singleton 4th axis is dropped); one-line error otherwise."""
    try:
        img = nib.load(str(path))
        shape = img.shape
    except Exception as e:  # nibabel raises several types for truncated/foreign files
        raise InputFileError(
            path, f"not a readable NIfTI file ({type(e).__name__}: {str(e)[:100]})"
        ) from None
    if len(shape) == 4 and shape[3] == 1:
        img = nib.Nifti1Image(np.asarray(img.dataobj)[..., 0], img.affine, img.header)
    elif len(shape) != 3:
        raise InputFileError(path, f"expected a 3D volume, got shape {shape}")
    return img


def _data(img: nib.Nifti1Image, path: Path) -> np.ndarray:
    try:
        return np.asarray(img.dataobj, dtype=np.float32)
    except Exception as e:
        raise InputFileError(path, f"cannot read voxel data ({type(e).__name__}: {str(e)[:100]})") from None


def to_ras(array: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Reorder a channel-first array (C, *spatial) from the source's voxel axes to RAS (MONAI Orientation)."""
    from monai.data import MetaTensor
    from monai.transforms import Orientation

    meta = MetaTensor(
        torch.as_tensor(np.ascontiguousarray(array)), affine=torch.as_tensor(affine, dtype=torch.float64)
    )
    return Orientation(axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S")))(meta).as_tensor().numpy()


def from_ras(array: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Inverse of `to_ras`: a RAS-ordered (C, *spatial) array back to the voxel order of `affine`."""
    ornt = nib.orientations.io_orientation(affine)
    back = nib.orientations.ornt_transform(nib.orientations.axcodes2ornt("RAS"), ornt)
    out = [nib.orientations.apply_orientation(channel, back) for channel in array]
    return np.ascontiguousarray(np.stack(out))


def load_raw(case: Case, with_labels: bool = True):
    """-> (raw float32 (4,D,H,W) as acquired, regions uint8 (C,D,H,W) | None, affine, header), in RAS order.

    The raw intensities are what corruptions act on (`segmentation.corruptions`); `preprocess` makes the
    model input. `affine` and `header` are the source's (FLAIR), for writing outputs with `from_ras`.
    """
    ref_img = read_nifti(case.images["flair"])
    channels = []
    for modality in MODALITIES:
        path = case.images[modality]
        img = ref_img if modality == "flair" else read_nifti(path)
        _check_grid(img, ref_img, path, case.images["flair"])
        channels.append(_data(img, path))
    affine, header = ref_img.affine.copy(), ref_img.header.copy()
    regions = None
    if with_labels and case.seg is not None:
        seg_img = read_nifti(case.seg)
        _check_grid(seg_img, ref_img, case.seg, case.images["flair"])
        try:
            regions = labels_to_regions(_data(seg_img, case.seg), case.scheme).astype(np.uint8)
        except ValueError as e:
            raise InputFileError(case.seg, label_error(e, case)) from None
        regions = to_ras(regions, affine)
    return to_ras(np.stack(channels), affine), regions, affine, header


def preprocess(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """-> (model input float32: each channel z-scored over its own non-zero voxels, brain mask bool: any
    channel non-zero), from a raw (C, D, H, W) volume; the one preprocessing of training and inference."""
    from monai.transforms import NormalizeIntensity

    brain = np.any(raw != 0, axis=0)
    # NormalizeIntensity writes into a float32 numpy input: normalise a copy, never the caller's volume
    image = NormalizeIntensity(nonzero=True, channel_wise=True)(np.array(raw, dtype=np.float32))
    return np.asarray(image, dtype=np.float32), brain


def load_case(case: Case, with_labels: bool = True):
    """-> (image float32 (4,D,H,W) z-scored, brain_mask bool (D,H,W), regions uint8 (C,D,H,W) | None, affine, header).

    `preprocess` of `load_raw`: arrays in RAS order; `affine` and `header` are the source's (FLAIR).
    """
    raw, regions, affine, header = load_raw(case, with_labels)
    image, brain = preprocess(raw)
    return image, brain, regions, affine, header


def label_error(error: ValueError, case: Case) -> str:
    """The one-line reason for a label map outside its scheme, naming the case and where the scheme came from."""
    return f"{error} in case {case.case_id} ({case.scheme_source or 'scheme given'}); pass --labels TASK"


def _check_grid(img: nib.Nifti1Image, ref: nib.Nifti1Image, path: Path, ref_path: Path) -> None:
    if img.shape[:3] != ref.shape[:3]:
        raise InputFileError(path, f"shape {img.shape[:3]} differs from {ref_path.name} {ref.shape[:3]}")
    if not np.allclose(img.affine, ref.affine, atol=1e-3):
        raise InputFileError(path, f"affine differs from {ref_path.name} (volumes must be co-registered)")


def write_nifti(path: str | Path, image: nib.Nifti1Image) -> Path:
    """Save a NIfTI image atomically (a `.nii.gz` name is gzipped)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        # nibabel picks the format from the suffix, so write under a temporary name that keeps it.
        target = tmp.with_name(
            tmp.name + ("".join(path.suffixes[-2:]) if path.name.endswith(".gz") else ".nii")
        )
        try:
            nib.save(image, str(target))
            target.replace(tmp)
        finally:
            target.unlink(missing_ok=True)
    return path


def spacing_of(header: nib.Nifti1Header) -> tuple[float, ...]:
    """Voxel size in mm along the source's voxel axes."""
    return tuple(float(z) for z in header.get_zooms()[:3])


def ras_spacing(affine: np.ndarray) -> tuple[float, ...]:
    """Voxel size in mm along the RAS axes of `to_ras` arrays (the source's axes, permuted)."""
    zooms = np.sqrt((np.asarray(affine, dtype=np.float64)[:3, :3] ** 2).sum(axis=0))
    out = np.empty(3)
    out[nib.orientations.io_orientation(affine)[:, 0].astype(int)] = zooms
    return tuple(float(z) for z in out)


KEYS = ("image", "label", "mask")


class CropDataset(torch.utils.data.Dataset):
    """Random training crops indexed by (case index, seed): the seed fixes the crop, flips, intensity change
    and acquisition corruptions, so any worker layout and any resumed epoch draws exactly the same samples.

    With `aug.corruption_prob` > 0 each sample's raw volume first goes through
    `segmentation.corruptions.augment` (every corruption with a training range, with that probability)
    and is then preprocessed as at inference, so the model trains on inputs the pipeline produces.
    """

    def __init__(
        self, cases: list[Case], roi: tuple[int, int, int], aug: CropAugment, cache: bool = True
    ) -> None:
        from monai.transforms import (
            Compose,
            RandCropByPosNegLabeld,
            RandFlipd,
            RandScaleIntensityd,
            RandShiftIntensityd,
        )

        self.cases, self.roi, self.cache = cases, tuple(roi), cache
        self.corruption_prob = aug.corruption_prob
        self._store: dict[int, dict] = {}
        flips = [RandFlipd(KEYS, prob=aug.flip_prob, spatial_axis=axis) for axis in range(3)]
        self.random = Compose(
            [
                RandCropByPosNegLabeld(
                    KEYS,
                    label_key="label",
                    spatial_size=self.roi,
                    pos=aug.pos,
                    neg=aug.neg,
                    num_samples=1,
                    fg_indices_key="fg",
                    bg_indices_key="bg",
                ),
                *flips,
                RandScaleIntensityd("image", factors=aug.intensity_scale, prob=1.0),
                RandShiftIntensityd("image", offsets=aug.intensity_shift, prob=1.0),
            ]
        )

    def _prepared(self, index: int) -> dict:
        """Load, pad to at least the ROI and index foreground/background voxels (cached when enabled)."""
        if index in self._store:
            return self._store[index]
        from monai.transforms import FgBgToIndicesd, SpatialPadd

        case = self.cases[index]
        raw, regions, _, _ = load_raw(case)
        if regions is None:
            raise InputFileError(case.folder, f"case {case.case_id} has no label file (*_seg) for training")
        image, brain = preprocess(raw)
        data = {"image": image, "label": regions, "mask": brain[None].astype(np.uint8)}
        data = SpatialPadd(KEYS, spatial_size=self.roi)(data)
        # Background crops are centred in the brain (mask), foreground crops on any tumour region.
        data = FgBgToIndicesd("label", image_key="mask", image_threshold=0.0)(data)
        data = {k: (v.as_tensor() if hasattr(v, "as_tensor") else v) for k, v in data.items()}
        data["fg"], data["bg"] = data.pop("label_fg_indices"), data.pop("label_bg_indices")
        if self.corruption_prob > 0:
            data["raw"] = raw  # corrupted per sample in `__getitem__`
        if self.cache:
            self._store[index] = data
        return data

    def __len__(self) -> int:
        return len(self.cases)

    def __getitem__(self, item: tuple[int, int]) -> dict[str, torch.Tensor]:
        index, seed = item
        data = dict(self._prepared(index))
        if self.corruption_prob > 0:
            data["image"] = self._corrupted_input(data.pop("raw"), seed)
        self.random.set_random_state(seed=seed)
        out = self.random(data)
        out = out[0] if isinstance(out, list) else out
        return {key: torch.as_tensor(np.asarray(out[key]), dtype=torch.float32) for key in KEYS}

    def _corrupted_input(self, raw: np.ndarray, seed: int) -> torch.Tensor:
        """The model input of a corrupted acquisition: `augment` (seeded), `preprocess`, padded like the rest."""
        from monai.transforms import SpatialPad

        from segmentation.corruptions import augment

        image, _ = preprocess(augment(raw, np.random.default_rng(seed), self.corruption_prob))
        return torch.as_tensor(np.asarray(SpatialPad(self.roi)(image)))


class PlanSampler(torch.utils.data.Sampler):
    """Yields this epoch's (case index, seed) items; the DataLoader's workers can stay alive across epochs."""

    def __init__(self) -> None:
        self.plan: list[tuple[int, int]] = []

    def set_plan(self, plan: list[tuple[int, int]]) -> None:
        self.plan = list(plan)

    def __iter__(self):
        return iter(self.plan)

    def __len__(self) -> int:
        return len(self.plan)


def epoch_plan(n_cases: int, samples: int, seed: int, epoch: int) -> list[tuple[int, int]]:
    """`samples` (case index, seed) items for one epoch: shuffled passes over the cases, seeded by (seed, epoch)."""
    rng = np.random.default_rng([seed, epoch])
    passes = -(-samples // n_cases)
    order = np.concatenate([rng.permutation(n_cases) for _ in range(passes)])[:samples]
    seeds = rng.integers(0, 2**31 - 1, size=samples)
    return [(int(i), int(s)) for i, s in zip(order, seeds, strict=True)]
