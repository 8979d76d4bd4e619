"""Whole-volume inference: Gaussian-blended sliding windows (MONAI), optional flip test-time augmentation,
NIfTI label maps in the input's label scheme, affine and header, and overlay PNGs for a quick look."""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from torch import nn

from histo.batch import BatchSummary, Outcome, run_batch
from histo.errors import ConfigError, HistoError, InputFileError
from histo.norms.placement import stale_placement_hint
from segmentation.config import SegmentConfig, roi_problem
from segmentation.data import Case, from_ras, load_case, write_nifti
from segmentation.labels import regions_to_labels

KIND = "unet3d"  # histo.checkpoint kind of a trained segmentation model


def save_model(path: str | os.PathLike, model: nn.Module, train_config: dict, **extra) -> None:
    """Atomically write a `unet3d` checkpoint: weights, the network's arguments and its training config."""
    from histo import checkpoint

    config = {"network": model.config, "train_config": train_config}
    checkpoint.save(path, KIND, checkpoint.KINDS[KIND].version, model.state_dict(), config, **extra)


def load_model(ckpt_path: str | os.PathLike, device: torch.device | str = "cpu") -> tuple[nn.Module, dict]:
    """Rebuild the UNet3D of a `unet3d` checkpoint; -> (model in eval mode on `device`, training config)."""
    from histo import checkpoint
    from segmentation.unet import UNet3D

    ckpt = checkpoint.load(ckpt_path, KIND)
    try:
        model = UNet3D(**ckpt.config["network"])
        model.load_state_dict(ckpt.weights)
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        hint = stale_placement_hint(ckpt.config.get("network", {}).get("norm"))
        raise InputFileError(
            ckpt_path, f"weights do not fit the stored model config: {' '.join(str(e).split())[:160]}{hint}"
        ) from None
    return model.to(device).eval(), dict(ckpt.config.get("train_config", {}))


def region_probabilities(model: nn.Module, logits: torch.Tensor) -> torch.Tensor:
    """Logits -> (N, 3, …) probabilities of [TC, WT, ET] for either head (labels: classes bg, NCR, ED, ET)."""
    if model.config["head"] == "regions":
        return torch.sigmoid(logits.float())
    p = torch.softmax(logits.float(), dim=1)
    return torch.stack([p[:, 1] + p[:, 3], p[:, 1] + p[:, 2] + p[:, 3], p[:, 3]], dim=1)


def _window_predictor(model: nn.Module, device: torch.device):
    """Predictor for one window whose last input channel is the brain mask (handed to rn_b norms)."""
    from histo.devices import autocast
    from histo.norms import set_region_mask

    def predict(window: torch.Tensor) -> torch.Tensor:
        image, mask = window[:, :-1], window[:, -1:] > 0.5
        set_region_mask(model, mask)
        with autocast(device):
            return region_probabilities(model, model(image))

    return predict


@torch.no_grad()
def predict_volume(
    model: nn.Module,
    image: np.ndarray,
    roi: Sequence[int],
    overlap: float,
    tta: bool = False,
    device: torch.device | str = "cpu",
    brain_mask: np.ndarray | None = None,
    sw_batch_size: int = 1,
    progress: bool = False,
) -> np.ndarray:
    """(4, D, H, W) z-scored image -> (3, D, H, W) float32 probabilities of [TC, WT, ET].

    Windows of `roi` overlap by `overlap` and are blended with a Gaussian weight; `tta` averages the 8
    flips over the spatial axes. `brain_mask` (default: any channel non-zero) feeds rn_b norms.
    """
    from monai.inferers import sliding_window_inference

    device = torch.device(device)
    problem = roi_problem(tuple(int(r) for r in roi), len(model.config["channels"]))
    if problem:
        raise ValueError(f"roi {problem}")
    if brain_mask is None:
        brain_mask = np.any(image != 0, axis=0)
    x = torch.from_numpy(np.concatenate([image, brain_mask[None].astype(np.float32)]))[None].to(device)
    predictor = _window_predictor(model, device)
    flips = [a for n in range(4) for a in itertools.combinations((2, 3, 4), n)] if tta else [()]
    total = torch.zeros((1, 3, *image.shape[1:]), dtype=torch.float32, device=device)
    for axes in flips:
        xi = torch.flip(x, axes) if axes else x
        prob = sliding_window_inference(
            xi,
            tuple(int(r) for r in roi),
            sw_batch_size,
            predictor,
            overlap=overlap,
            mode="gaussian",
            progress=progress,
        )
        total += torch.flip(prob, axes) if axes else prob
    return (total / len(flips))[0].float().cpu().numpy()


def write_labels(path: Path, labels_ras: np.ndarray, affine: np.ndarray, header: nib.Nifti1Header) -> None:
    """Write a RAS-ordered uint8 label map in the source's voxel order with its affine and header (atomic)."""
    data = from_ras(labels_ras[None], affine)[0].astype(np.uint8)
    header = header.copy()
    header.set_data_dtype(np.uint8)
    header.set_slope_inter(1.0, 0.0)
    write_nifti(path, nib.Nifti1Image(data, affine, header))


def overlay_png(path: Path, flair: np.ndarray, regions: np.ndarray, title: str, n_slices: int = 3) -> Path:
    """Axial FLAIR slices through the predicted tumour with WT/TC/ET contours (RAS arrays, axis 2 = S)."""
    from matplotlib import pyplot as plt

    from histo.plots import save_figure

    area = regions[1].sum(axis=(0, 1)).astype(np.float64)
    if area.any():  # slices at quantiles of the cumulative tumour volume: through the main mass
        cumulative = np.cumsum(area) / area.sum()
        picks = np.unique(np.searchsorted(cumulative, np.linspace(0.5, n_slices - 0.5, n_slices) / n_slices))
    else:
        picks = np.unique(np.linspace(0.35, 0.65, n_slices) * (flair.shape[2] - 1)).astype(int)
        title += " (no tumour predicted)"
    brain = flair[flair != 0]
    vmin, vmax = np.percentile(brain, [1, 99]) if brain.size else (0.0, 1.0)
    shown = np.ma.masked_equal(flair, 0)
    cmap = plt.get_cmap("gray").with_extremes(bad="black")  # background (masked) stays black
    fig, axes = plt.subplots(1, len(picks), figsize=(3.2 * len(picks), 3.4), squeeze=False)
    colours = {"WT": "yellow", "TC": "red", "ET": "cyan"}
    for ax, z in zip(axes[0], picks, strict=True):
        ax.imshow(shown[:, :, z].T, cmap=cmap, origin="lower", vmin=vmin, vmax=vmax)
        for name, index in (("WT", 1), ("TC", 0), ("ET", 2)):
            if regions[index, :, :, z].any():
                ax.contour(
                    regions[index, :, :, z].T.astype(float), levels=[0.5], colors=colours[name], linewidths=1
                )
        ax.set_title(f"axial z={z}", fontsize=8)
        ax.axis("off")
    fig.suptitle(f"{title}  WT yellow, TC red, ET cyan", fontsize=9)
    return save_figure(fig, path)


def check_roi(model: nn.Module, roi: Sequence[int], key: str, model_path: str | os.PathLike) -> None:
    """Refuse a sliding window the U-Net cannot take, before anything is written (`key` names the setting)."""
    problem = roi_problem(tuple(roi), len(model.config["channels"]))
    if problem:
        raise ConfigError(f"{key}: {problem} (the U-Net in {model_path})")


def predict_case(
    model: nn.Module, case: Case, out_dir: str | os.PathLike, config: SegmentConfig, device
) -> Outcome:
    """Segment one case per `config.infer` (roi resolved): `<out>/<case_id>.nii.gz` (+ `_overlay.png`);
    -> done, with voxels per region."""
    out_dir = Path(out_dir)
    settings = config.infer
    image, brain, _, affine, header = load_case(case, with_labels=False)
    prob = predict_volume(
        model,
        image,
        roi=settings.roi,
        overlap=settings.overlap,
        tta=settings.tta,
        device=device,
        brain_mask=brain,
        sw_batch_size=config.run.sw_batch_size,
    )
    regions = prob >= settings.threshold
    labels = regions_to_labels(regions, case.scheme)
    out = out_dir / f"{case.case_id}.nii.gz"
    if settings.overlay_slices > 0:
        overlay_png(
            out_dir / f"{case.case_id}_overlay.png", image[3], regions, case.case_id, settings.overlay_slices
        )
    write_labels(out, labels, affine, header)  # last: its presence marks the case as done
    voxels = {name: int(regions[i].sum()) for i, name in enumerate(("TC", "WT", "ET"))}
    return Outcome.done(case.case_id, case.folder, output=str(out), scheme=case.scheme, voxels=voxels)


LABEL_SETTINGS = ("roi", "overlap", "tta", "threshold")  # what a resumed run must share with the first
SOURCE_SUFFIX = ".source.json"  # beside each label map: the identity of the case it was made from


def case_source(case: Case) -> Any:
    """The identity of a case's four images (histo.identity.SourceIdentity of the case folder)."""
    from histo.identity import SourceIdentity
    from segmentation.data import MODALITIES

    return SourceIdentity.of_files(case.folder, [case.images[m] for m in MODALITIES])


def predict_cases(
    model_path: str | os.PathLike,
    case_dirs: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    config: SegmentConfig | Mapping[str, Any] | None = None,
    overwrite: bool = False,
    replace: bool = False,
) -> BatchSummary:
    """Segment every case under `case_dirs` into `out_dir`; a bad case is failed and the rest goes on,
    finished outputs are kept (a re-run resumes, skipping them). Writes `predictions.json` (the
    summary's JSON) and returns the BatchSummary. No case found is a HistoError, before `out_dir` exists.

    `config`: a SegmentConfig, None (the defaults) or a mapping over the defaults (its `infer` and `run`
    sections apply). `out_dir/settings.json` records the model's sha256 and the settings that change a
    label map; a re-run with others is refused unless `overwrite`, which recomputes every case.
    `<out>/<case_id>.source.json` records the case each map came from: a case of another folder or
    content under a segmented ID is failed, its map kept, unless `replace` (an output without it, from
    an older run, is taken as the same case).
    """
    from histo.devices import resolve_device
    from histo.identity import SourceIdentity, source_change
    from histo.io import atomic_write_json, check_run_settings, file_sha256
    from histo.lock import writer_lock
    from segmentation.data import case_items, find_case

    config = SegmentConfig.coerce(config)
    dev = resolve_device(config.run.device)
    model, trained = load_model(model_path, dev)
    # An empty roi means the training crop: instance-norm statistics then match those seen in training.
    if not config.infer.roi:
        crop = trained.get("data", {}).get("roi", [])
        if not crop:
            raise HistoError(f"{model_path}: the checkpoint records no training crop; set infer.roi (--roi)")
        config = config.updated({"infer.roi": crop}, source=f"{model_path} (data.roi)")
    check_roi(model, config.infer.roi, "infer.roi", model_path)
    settings = config.infer.model_dump(mode="json")
    items = case_items(case_dirs)
    if not items:
        raise HistoError(f"no case folders with NIfTI files found in {', '.join(map(str, case_dirs))}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if overwrite:
        (out_dir / "settings.json").unlink(missing_ok=True)
    run = {"model_sha256": file_sha256(model_path), **{k: settings[k] for k in LABEL_SETTINGS}}
    check_run_settings(out_dir, run, remedy="use a new --out or --overwrite")

    def output(item) -> Path:
        return out_dir / f"{item.id}.nii.gz"

    def recorded(item) -> SourceIdentity | None:
        """The source of the item's existing map; None without one (or from a run that kept none)."""
        if overwrite or not output(item).exists():
            return None
        try:
            return SourceIdentity.from_dict(json.loads((out_dir / f"{item.id}{SOURCE_SUFFIX}").read_text()))
        except (OSError, ValueError):
            return None

    def predict(item) -> Outcome:
        if item.duplicate_of is not None:
            return Outcome.failed(item.id, item.path, f"duplicate case ID (also {item.duplicate_of})")
        case = find_case(item.path)
        source, before = case_source(case), recorded(item)
        change = None if before is None else source_change(before, source)
        if change is not None:
            if not replace:
                return Outcome.failed(
                    item.id, item.path,
                    f"case ID {item.id!r} is already segmented in {out_dir}: {change}; "
                    "pass --replace to segment this case in its place",
                )  # fmt: skip
            output(item).unlink()  # the other case's map goes first: no map ever names the wrong case
        atomic_write_json(out_dir / f"{item.id}{SOURCE_SUFFIX}", source.to_dict())
        return predict_case(model, case, out_dir, config, dev)

    def finished(item) -> dict | None:
        if overwrite or item.duplicate_of is not None or not output(item).exists():
            return None
        before = recorded(item)
        if before is not None:
            try:
                if source_change(before, case_source(find_case(item.path))) is not None:
                    return None
            except InputFileError:
                return None  # a case that cannot be read any more fails when processed
        return {"output": str(output(item))}

    with writer_lock(out_dir, "histo segment predict"):
        outcomes = run_batch(
            items, predict, is_done=finished, desc="segment", unit="case", outputs=(out_dir,)
        )
    batch = BatchSummary(
        tuple(outcomes), out=str(out_dir), extra={"model": str(model_path), "settings": settings}
    )
    atomic_write_json(out_dir / "predictions.json", batch.to_dict())
    return batch
