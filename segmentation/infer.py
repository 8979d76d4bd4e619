"""Whole-volume inference: Gaussian-blended sliding windows (MONAI), optional flip test-time augmentation,
ensembles of checkpoints (their probabilities averaged before thresholding), NIfTI label maps in the
task's label scheme with the input's affine and header, optional probability maps, and overlay PNGs.

A checkpoint records its task: the label scheme, the region of each output channel and the modality order
of its input. One without (histo 0.1, or saved with no `labels`) predicts TC, WT, ET from t1, t1ce, t2,
flair and writes each case's own 2018-2021 or 2023 label values, as histo 0.1 did.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
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
from segmentation.data import MODALITIES, Case, from_ras, load_case, write_nifti
from segmentation.label_schemes import (
    REGIONS,
    SCHEMES,
    LabelScheme,
    class_regions,
    get_scheme,
    regions_to_labels,
)

log = logging.getLogger(__name__)

KIND = "unet3d"  # histo.checkpoint kind of a trained segmentation model


def model_config(model: nn.Module, train_config: dict, labels: str | None = None) -> dict:
    """The `config` of a `unet3d` checkpoint: the network's arguments, its training config and, with
    `labels`, its task (label scheme, output channel regions, input modality order)."""
    config = {"network": model.config, "train_config": train_config}
    if labels is not None:
        scheme = get_scheme(labels)
        config["task"] = {
            "labels": scheme.name,
            "regions": list(scheme.channels),
            "modalities": list(MODALITIES),
        }
    return config


def save_model(
    path: str | os.PathLike, model: nn.Module, train_config: dict, labels: str | None = None, **extra
) -> None:
    """Atomically write a `unet3d` checkpoint (weights and `model_config`)."""
    from histo import checkpoint

    config = model_config(model, train_config, labels)
    checkpoint.save(path, KIND, checkpoint.KINDS[KIND].version, model.state_dict(), config, **extra)


@dataclass(frozen=True)
class Segmenter:
    """A loaded checkpoint: the model (eval mode), its training config and recorded task (labels None for a
    checkpoint that records none), and the file it came from."""

    model: nn.Module
    train_config: dict
    labels: str | None
    regions: tuple[str, ...]
    modalities: tuple[str, ...]
    path: Path

    @property
    def roi(self) -> list[int]:
        """The training crop ([] when the checkpoint records none)."""
        return list(self.train_config.get("data", {}).get("roi", []))


def load_segmenter(ckpt_path: str | os.PathLike, device: torch.device | str = "cpu") -> Segmenter:
    """Rebuild the UNet3D of a `unet3d` checkpoint with its recorded task; one-line errors for a bad file."""
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
    task = ckpt.config.get("task", {})
    labels = task.get("labels")
    if labels is not None and labels not in SCHEMES:
        raise InputFileError(ckpt_path, f"records label scheme {labels!r}, which this histo does not know")
    regions = tuple(task.get("regions", REGIONS))
    if model.config["head"] == "regions" and model.config["out_channels"] != len(regions):
        raise InputFileError(
            ckpt_path, f"has {model.config['out_channels']} output channels for the regions {list(regions)}"
        )
    return Segmenter(
        model.to(device).eval(),
        dict(ckpt.config.get("train_config", {})),
        labels,
        regions,
        tuple(task.get("modalities", MODALITIES)),
        Path(ckpt_path),
    )


def load_model(ckpt_path: str | os.PathLike, device: torch.device | str = "cpu") -> tuple[nn.Module, dict]:
    """Rebuild the UNet3D of a `unet3d` checkpoint; -> (model in eval mode on `device`, training config)."""
    segmenter = load_segmenter(ckpt_path, device)
    return segmenter.model, segmenter.train_config


def region_probabilities(
    model: nn.Module, logits: torch.Tensor, scheme: str | LabelScheme = "2021"
) -> torch.Tensor:
    """Logits -> (N, C, …) probabilities of the scheme's channels for either head: sigmoids (regions head),
    or sums of softmax class probabilities (labels head; classes background, then the label values)."""
    if model.config["head"] == "regions":
        return torch.sigmoid(logits.float())
    matrix = torch.from_numpy(class_regions(scheme)).to(logits.device)
    if logits.shape[1] != matrix.shape[1]:
        raise ValueError(
            f"a labels head for scheme {get_scheme(scheme).name} has {matrix.shape[1]} classes, got {logits.shape[1]}"
        )
    p = torch.softmax(logits.float(), dim=1)
    return torch.einsum("ck,nk...->nc...", matrix, p)


def _window_predictor(model: nn.Module, device: torch.device, scheme: str | LabelScheme):
    """Predictor for one window whose last input channel is the brain mask (handed to rn_b norms)."""
    from histo.devices import autocast
    from histo.norms import set_region_mask

    def predict(window: torch.Tensor) -> torch.Tensor:
        image, mask = window[:, :-1], window[:, -1:] > 0.5
        set_region_mask(model, mask)
        with autocast(device):
            return region_probabilities(model, model(image), scheme)

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
    scheme: str | LabelScheme = "2021",
) -> np.ndarray:
    """(4, D, H, W) z-scored image -> (C, D, H, W) float32 probabilities of the model's output channels
    (2021 and 2023: [TC, WT, ET]; `scheme` maps a labels head's classes to them).

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
    predictor = _window_predictor(model, device, scheme)
    flips = [a for n in range(4) for a in itertools.combinations((2, 3, 4), n)] if tta else [()]
    total = None
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
        prob = torch.flip(prob, axes) if axes else prob
        total = prob if total is None else total + prob
    return (total / len(flips))[0].float().cpu().numpy()


def write_labels(path: Path, labels_ras: np.ndarray, affine: np.ndarray, header: nib.Nifti1Header) -> None:
    """Write a RAS-ordered uint8 label map in the source's voxel order with its affine and header (atomic)."""
    data = from_ras(labels_ras[None], affine)[0].astype(np.uint8)
    header = header.copy()
    header.set_data_dtype(np.uint8)
    header.set_slope_inter(1.0, 0.0)
    write_nifti(path, nib.Nifti1Image(data, affine, header))


# A colour for every channel region of label_schemes.SCHEMES.
OVERLAY_COLOURS = {"WT": "yellow", "TC": "red", "ET": "cyan", "RC": "magenta", "CC": "lime", "GTV": "orange"}


def overlay_png(
    path: Path,
    flair: np.ndarray,
    regions: np.ndarray,
    title: str,
    n_slices: int = 3,
    names: Sequence[str] = REGIONS,
) -> Path:
    """Axial FLAIR slices through the predicted tumour with a contour per channel `names` of `regions`
    (RAS arrays, axis 2 = S); the largest region is drawn first."""
    from matplotlib import pyplot as plt

    from histo.plots import save_figure

    area = regions.any(axis=0).sum(axis=(0, 1)).astype(np.float64)
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
    colours = {name: OVERLAY_COLOURS[name] for name in names}
    order = sorted(range(len(names)), key=lambda i: -int(regions[i].sum()))
    for ax, z in zip(axes[0], picks, strict=True):
        ax.imshow(shown[:, :, z].T, cmap=cmap, origin="lower", vmin=vmin, vmax=vmax)
        for index in order:
            if regions[index, :, :, z].any():
                ax.contour(
                    regions[index, :, :, z].T.astype(float),
                    levels=[0.5],
                    colors=[colours[names[index]]],
                    linewidths=1,
                )
        ax.set_title(f"axial z={z}", fontsize=8)
        ax.axis("off")
    legend = ", ".join(f"{names[i]} {colours[names[i]]}" for i in order)
    fig.suptitle(f"{title}  {legend}", fontsize=9)
    return save_figure(fig, path)


def output_scheme(case: Case, labels: str | None, regions: Sequence[str]) -> str:
    """The scheme a case's label map is written in: the case's own (`--labels` or detected) when the model
    predicts its channels, else the model's `labels`; HistoError when neither fits the model's channels."""
    if tuple(get_scheme(case.scheme).channels) == tuple(regions):
        return case.scheme
    if labels is not None and case.scheme_source != "--labels":
        return labels
    raise HistoError(
        f"case {case.case_id}: scheme {case.scheme} ({case.scheme_source}) has channels "
        f"{list(get_scheme(case.scheme).channels)}, the model predicts {list(regions)}"
    )


def ensemble_probabilities(
    models: Sequence[nn.Module],
    image: np.ndarray,
    brain: np.ndarray,
    config: SegmentConfig,
    device,
    scheme: str,
) -> np.ndarray:
    """The mean over `models` of their (C, …) channel probabilities for one z-scored image (`config.infer`
    with its roi resolved, `config.run.sw_batch_size`)."""
    settings, total = config.infer, None
    for model in models:
        prob = predict_volume(
            model,
            image,
            roi=settings.roi,
            overlap=settings.overlap,
            tta=settings.tta,
            device=device,
            brain_mask=brain,
            sw_batch_size=config.run.sw_batch_size,
            scheme=scheme,
        )
        total = prob if total is None else total + prob
    return total / len(models)


def probabilities_path(out_dir: Path, case_id: str) -> Path:
    """Where `--save-probabilities` writes a case's probability maps."""
    return out_dir / f"{case_id}_probabilities.npz"


def write_probabilities(
    path: Path, prob_ras: np.ndarray, affine: np.ndarray, regions: Sequence[str], scheme: str
) -> None:
    """Save (C, …) channel probabilities as float16 in the source's voxel order, with the affine, the
    channel regions and the scheme, in a compressed .npz (atomic)."""
    from histo.io import atomic_path

    data = from_ras(prob_ras, affine).astype(np.float16)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez_compressed(
            f, probabilities=data, affine=affine, regions=np.array(list(regions)), scheme=np.array(scheme)
        )


def predict_case(
    models: nn.Module | Sequence[nn.Module],
    case: Case,
    out_dir: str | os.PathLike,
    config: SegmentConfig,
    device,
    labels: str | None = None,
    regions: Sequence[str] = REGIONS,
) -> Outcome:
    """Segment one case with one model or the mean of several, per `config.infer` (roi resolved):
    `<out>/<case_id>.nii.gz` (+ `_overlay.png`, + `_probabilities.npz` with infer.save_probabilities);
    -> done, with voxels per region. `labels` and `regions` are the models' recorded scheme (None: none
    recorded) and output channels."""
    models = [models] if isinstance(models, nn.Module) else list(models)
    out_dir, settings = Path(out_dir), config.infer
    scheme = output_scheme(case, labels, regions)
    image, brain, _, affine, header = load_case(case, with_labels=False)
    prob = ensemble_probabilities(models, image, brain, config, device, labels or scheme)
    masks = prob >= settings.threshold
    out = out_dir / f"{case.case_id}.nii.gz"
    if settings.save_probabilities:
        write_probabilities(probabilities_path(out_dir, case.case_id), prob, affine, regions, scheme)
    if settings.overlay_slices > 0:
        overlay = out_dir / f"{case.case_id}_overlay.png"
        overlay_png(overlay, image[3], masks, case.case_id, settings.overlay_slices, regions)
    # Last: the label map's presence marks the case done.
    write_labels(out, regions_to_labels(masks, scheme), affine, header)
    voxels = {name: int(masks[i].sum()) for i, name in enumerate(regions)}
    return Outcome.done(
        case.case_id,
        case.folder,
        output=str(out),
        scheme=scheme,
        scheme_source=case.scheme_source,
        voxels=voxels,
    )


LABEL_SETTINGS = ("roi", "overlap", "tta", "threshold")  # what a resumed run must share with the first


def check_roi(model: nn.Module, roi: Sequence[int], key: str, model_path: str | os.PathLike) -> None:
    """Refuse a sliding window the U-Net cannot take, before anything is written (`key` names the setting)."""
    problem = roi_problem(tuple(roi), len(model.config["channels"]))
    if problem:
        raise ConfigError(f"{key}: {problem} (the U-Net in {model_path})")


def load_ensemble(model_paths: Sequence[str | os.PathLike], device) -> list[Segmenter]:
    """Load the checkpoints of an ensemble; HistoError when two differ in scheme, channels, modality order
    or training crop (their probabilities would not be comparable)."""
    segmenters = [load_segmenter(p, device) for p in model_paths]
    first = segmenters[0]
    for other in segmenters[1:]:
        for what, a, b in (
            ("label scheme", first.labels, other.labels),
            ("output channels", _outputs(first), _outputs(other)),
            ("modality order", first.modalities, other.modalities),
            ("training crop (ROI)", first.roi, other.roi),
        ):
            if a != b:
                raise HistoError(f"{other.path}: {what} {_shown(b)} differs from {first.path}'s {_shown(a)}")
    if tuple(first.modalities) != MODALITIES:
        raise HistoError(
            f"{first.path}: expects modalities in the order {list(first.modalities)}; "
            f"histo stacks {list(MODALITIES)}"
        )
    return segmenters


SOURCE_SUFFIX = ".source.json"  # beside each label map: the identity of the case it was made from


def case_source(where: str | os.PathLike, case: Case) -> Any:
    """The identity of a case's images (histo.identity.SourceIdentity; `where`: its folder or file)."""
    from histo.identity import SourceIdentity

    return SourceIdentity.of_files(where, [case.images[m] for m in sorted(case.images)])


def _outputs(segmenter: Segmenter) -> str:
    """`regions head TC, WT, ET` or `labels head, 4 classes`: what a checkpoint's outputs mean."""
    config = segmenter.model.config
    if config["head"] == "regions":
        return f"(regions head {', '.join(segmenter.regions)})"
    return f"(labels head, {config['out_channels']} classes)"


def _shown(value) -> str:
    return "none recorded" if value is None else str(list(value) if isinstance(value, tuple) else value)


def predict_cases(
    model_paths: str | os.PathLike | Sequence[str | os.PathLike],
    case_dirs: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    config: SegmentConfig | Mapping[str, Any] | None = None,
    overwrite: bool = False,
    replace: bool = False,
) -> BatchSummary:
    """Segment every case under `case_dirs` into `out_dir` with one checkpoint or the mean probabilities of
    several (same scheme, channels, modality order and training crop); a bad case is failed and the rest
    goes on, finished outputs are kept (a re-run resumes, skipping them). Writes `predictions.json` (the
    summary's JSON) and returns the BatchSummary. No case found is a HistoError, before `out_dir` exists.

    `config`: a SegmentConfig, None (the defaults) or a mapping over the defaults (its `infer` and `run`
    sections apply, and `data.labels`: the cases' label scheme, auto = detected per case, see
    `output_scheme`). `out_dir/settings.json` records the models' sha256 and the settings that change a
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
    labels = None if config.data.labels == "auto" else config.data.labels
    paths = [model_paths] if isinstance(model_paths, (str, os.PathLike)) else list(model_paths)
    if not paths:
        raise HistoError("no checkpoint given (--model)")
    dev = resolve_device(config.run.device)
    segmenters = load_ensemble(paths, dev)
    first = segmenters[0]
    # An empty roi means the training crop: instance-norm statistics then match those seen in training.
    if not config.infer.roi:
        if not first.roi:
            raise HistoError(f"{first.path}: the checkpoint records no training crop; set infer.roi (--roi)")
        config = config.updated({"infer.roi": first.roi}, source=f"{first.path} (data.roi)")
    for segmenter in segmenters:
        check_roi(segmenter.model, config.infer.roi, "infer.roi", segmenter.path)
    settings = config.infer.model_dump(mode="json")
    items = case_items(case_dirs)
    if not items:
        raise HistoError(f"no case folders with NIfTI files found in {', '.join(map(str, case_dirs))}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if overwrite:
        (out_dir / "settings.json").unlink(missing_ok=True)
    hashes = [file_sha256(p) for p in paths]
    run = {  # one model: its hash alone, as in the folders of earlier releases (they still resume)
        "model_sha256": hashes[0] if len(hashes) == 1 else hashes,
        **{k: settings[k] for k in LABEL_SETTINGS},
    }
    check_run_settings(out_dir, run, remedy="use a new --out or --overwrite")
    models = [s.model for s in segmenters]

    def outputs(item) -> list[Path]:
        found = [out_dir / f"{item.id}.nii.gz"]
        return [*found, probabilities_path(out_dir, item.id)] if settings["save_probabilities"] else found

    def recorded(item) -> SourceIdentity | None:
        """The source of the item's existing map; None without one (or from a run that kept none)."""
        if overwrite or not outputs(item)[0].exists():
            return None
        try:
            return SourceIdentity.from_dict(json.loads((out_dir / f"{item.id}{SOURCE_SUFFIX}").read_text()))
        except (OSError, ValueError):
            return None

    def predict(item) -> Outcome:
        if item.duplicate_of is not None:
            return Outcome.failed(item.id, item.path, f"duplicate case ID (also {item.duplicate_of})")
        case = find_case(item.path, labels)
        _check_channel_order(case, first)
        source, before = case_source(item.path, case), recorded(item)
        change = None if before is None else source_change(before, source)
        if change is not None:
            if not replace:
                return Outcome.failed(
                    item.id, item.path,
                    f"case ID {item.id!r} is already segmented in {out_dir}: {change}; "
                    "pass --replace to segment this case in its place",
                )  # fmt: skip
            for path in outputs(item):  # the other case's outputs go first: none ever names the wrong case
                path.unlink(missing_ok=True)
        atomic_write_json(out_dir / f"{item.id}{SOURCE_SUFFIX}", source.to_dict())
        return predict_case(models, case, out_dir, config, dev, first.labels, first.regions)

    def finished(item) -> dict | None:
        if overwrite or item.duplicate_of is not None or not all(p.exists() for p in outputs(item)):
            return None
        before = recorded(item)
        if before is not None:
            try:
                if source_change(before, case_source(item.path, find_case(item.path, labels))) is not None:
                    return None
            except InputFileError:
                return None  # a case that cannot be read any more fails when processed
        return {"output": str(outputs(item)[0])}

    with writer_lock(out_dir, "histo segment predict"):
        outcomes = run_batch(
            items, predict, is_done=finished, desc="segment", unit="case", outputs=(out_dir,)
        )
    extra = {
        "model": [str(p) for p in paths],
        "labels": first.labels,
        "regions": list(first.regions),
        "settings": settings,
    }
    batch = BatchSummary(tuple(outcomes), out=str(out_dir), extra=extra)
    atomic_write_json(out_dir / "predictions.json", batch.to_dict())
    return batch


def _check_channel_order(case: Case, segmenter: Segmenter) -> None:
    """For an nnU-Net case, log when dataset.json orders the channels otherwise than the checkpoint (they
    are matched by modality name, never by position)."""
    if case.channel_order is not None and tuple(case.channel_order) != tuple(segmenter.modalities):
        log.info(
            "%s: dataset.json orders channels %s, %s expects %s: matched by name",
            case.case_id,
            list(case.channel_order),
            segmenter.path.name,
            list(segmenter.modalities),
        )
