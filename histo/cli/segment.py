"""`histo segment train|predict|eval`: reversible-MBConv 3D U-Nets on BraTS case folders."""

from __future__ import annotations

import click

from histo.cli.options import config_option, device_option, emit_json, json_option, stage_config
from histo.cli.outcomes import failure_lines, finish


def _int_list(ctx: click.Context, param: click.Parameter, value: str | None) -> list[int] | None:
    """A click callback parsing `16,32,64` into [16, 32, 64] (the config model checks count and range)."""
    if value is None:
        return None
    try:
        return [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {value!r}") from None


labels_option = click.option(
    "--labels",
    default=None,
    help="The task's label scheme (data.labels): 2021, 2023, gli, ped, menpre, menrt, mets or goat "
    "(segmentation/label_schemes.py), or auto: detected from case IDs and file names.",
)


@click.group(name="segment")
def segment() -> None:
    """Train, apply and evaluate reversible-MBConv 3D U-Nets on BraTS MRI (T1, T1ce, T2, FLAIR)."""


@segment.command("train")
@click.option(
    "--data", "data_dir", required=True, type=click.Path(file_okay=False), help="Folder of case folders."
)
@click.option(
    "--out", "out_path", required=True, type=click.Path(dir_okay=False), help="Best checkpoint (.pt)."
)
@click.option("--norm", default=None, help="Norm name from histo.norms (e.g. instance, group, rn_b).")
@click.option("--reversible/--no-reversible", default=None, help="Reversible blocks or the plain twin.")
@click.option("--roi", default=None, callback=_int_list, help="Training crop, e.g. 128,128,128.")
@click.option("--channels", default=None, callback=_int_list, help="Channels per level, e.g. 16,32,64,128.")
@click.option("--epochs", type=int, default=None, help="Number of epochs.")
@labels_option
@click.option("--folds", type=int, default=None, help="Patient-level K-fold split (data.folds, K >= 2).")
@click.option("--fold", type=int, default=None, help="The validation fold of --folds, 0..K-1 (data.fold).")
@device_option
@click.option(
    "--resume", is_flag=True, default=None, help="Continue the run whose <stem>.last.pt exists (same config)."
)
@click.option("--overwrite", is_flag=True, default=None, help="Start over, replacing the run at --out.")
@config_option
@json_option
def train(
    data_dir, out_path, norm, reversible, roi, channels, epochs, labels, folds, fold, device, resume, overwrite,
    config_path, as_json,
):  # fmt: skip
    """Train a UNet3D on BraTS case folders (runs under torchrun for DDP).

    Writes OUT = STEM.pt (best model), STEM.last.pt (training state), STEM.metrics.csv and STEM.curves.png.
    A re-run with the same config resumes (a finished run does nothing); another config is refused unless
    --overwrite."""
    from segmentation.config import SegmentConfig
    from segmentation.train import train_segmenter

    keys = {
        "norm": "model.norm",
        "reversible": "model.reversible",
        "roi": "data.roi",
        "channels": "model.channels",
        "epochs": "train.epochs",
        "labels": "data.labels",
        "folds": "data.folds",
        "fold": "data.fold",
        "device": "run.device",
        "resume": "run.resume",
        "overwrite": "run.overwrite",
    }
    config = stage_config(SegmentConfig, config_path, keys)
    summary = train_segmenter(data_dir, out_path, config)
    if summary["rank"] != 0:  # under torchrun only the main process reports
        return
    if as_json:
        emit_json(summary)
    else:
        monitor = summary["monitor"]
        best = summary[f"best_{monitor}"]
        best_text = "n/a (no validation cases)" if best is None else f"{best:.4f}"
        click.echo(f"trained {summary['epochs_run']}/{summary['epochs']} epochs; best {monitor} {best_text}")
        split = summary["split"]
        held_out = f"fold {split['fold']} of {split['folds']}" if split["folds"] else "val_fraction"
        click.echo(
            f"labels {summary['labels']}; validation: {held_out}, {len(split['val_patients'])} patients"
        )
        click.echo(f"best checkpoint: {summary['out']}; metrics: {summary['metrics_csv']}")


@segment.command("predict")
@click.option(
    "--model",
    "model_paths",
    required=True,
    multiple=True,
    type=click.Path(dir_okay=False),
    help="Checkpoint; repeat for an ensemble (mean probabilities; same scheme, channels and ROI).",
)
@click.argument("case_dirs", nargs=-1, required=True, type=click.Path(file_okay=False))
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Output folder.")
@click.option("--roi", default=None, callback=_int_list, help="Sliding-window size, e.g. 128,128,128.")
@click.option("--overlap", type=float, default=None, help="Window overlap in [0, 1).")
@click.option("--tta/--no-tta", default=None, help="Average the 8 flips (test-time augmentation).")
@click.option(
    "--save-probabilities/--no-save-probabilities",
    default=None,
    help="Also write <case>_probabilities.npz (float16 channel probabilities, affine, regions).",
)
@labels_option
@click.option(
    "--overwrite", is_flag=True, help="Recompute every case, even in an --out made with other settings."
)
@click.option(
    "--replace",
    is_flag=True,
    help="Segment a case whose ID has a map in --out from another case in its place.",
)
@device_option
@config_option
@json_option
def predict(
    model_paths, case_dirs, out_dir, roi, overlap, tta, save_probabilities, labels, overwrite, replace,
    device, config_path, as_json,
):  # fmt: skip
    """Segment case folders (or folders of cases) into <out>/<case_id>.nii.gz label maps + overlay PNGs.

    Exit code 0 when every case is done or skipped (already segmented), 1 when any failed, 2 when no
    case is found or an option is wrong (nothing is created then)."""
    from segmentation.config import SegmentConfig
    from segmentation.infer import predict_cases

    keys = {
        "roi": "infer.roi",
        "overlap": "infer.overlap",
        "tta": "infer.tta",
        "save_probabilities": "infer.save_probabilities",
        "labels": "data.labels",
        "device": "run.device",
    }
    config = stage_config(SegmentConfig, config_path, keys)
    batch = predict_cases(model_paths, case_dirs, out_dir, config, overwrite, replace)
    lines = [f"{o.id}: {o.status} {o.detail.get('output', o.reason)}" for o in batch.outcomes]
    finish(batch, as_json, lines)


@segment.command("eval")
@click.option(
    "--pred", "pred_dir", required=True, type=click.Path(file_okay=False), help="Predicted label maps."
)
@click.option("--data", "data_dir", required=True, type=click.Path(file_okay=False), help="Cases with *_seg.")
@click.option(
    "--out", "out_dir", default=None, type=click.Path(file_okay=False), help="Report folder (default --pred)."
)
@labels_option
@click.option(
    "--hd95/--no-hd95",
    default=None,
    help="Also legacy, global and lesion-wise HD95 (eval.hd95), or Dice and lesion counts only.",
)
@click.option("--workers", type=int, default=None, help="Cases scored in parallel processes (run.workers).")
@config_option
@json_option
def evaluate(pred_dir, data_dir, out_dir, labels, hd95, workers, config_path, as_json):
    """Per case and region of the task: legacy, global and lesion-wise Dice and HD95 (BraTS definitions,
    see segmentation.evaluate) in metrics.csv + summary.json.

    Exit code 0 when every labelled case is scored (a case without *_seg is skipped), 1 when a
    prediction is missing or does not fit, 2 when no labelled case is found (nothing is written)."""
    from segmentation.config import SegmentConfig
    from segmentation.evaluate import evaluate_predictions

    keys = {"labels": "data.labels", "hd95": "eval.hd95", "workers": "run.workers"}
    config = stage_config(SegmentConfig, config_path, keys)
    batch = evaluate_predictions(pred_dir, data_dir, out_dir, config)
    finish(batch, as_json, [*table_lines(batch), *failure_lines(batch)])


TABLE = (
    ("Dice legacy", "legacy_dice"),
    ("global", "global_dice"),
    ("lesion-wise", "lesionwise_dice"),
    ("HD95 legacy", "legacy_hd95"),
    ("global", "global_hd95"),
    ("lesion-wise", "lesionwise_hd95"),
)


def table_lines(batch) -> list[str]:
    """The mean of every metric per region as a small table (HD95 columns when computed), with the scheme
    and the HD95 definitions."""
    labels, stats = batch.extra["labels"], batch.extra["metrics"]
    regions = list(labels["regions"])
    columns = [(head, key) for head, key in TABLE if f"{key}_{regions[0]}" in stats]
    lines = [f"{batch.counts['done']} cases scored; labels {labels['scheme']} ({labels['description']})"]
    lines.append("means   " + "".join(f"{head:>13s}" for head, _ in columns) + "  lesions TP/FP/FN")
    done = [o.detail for o in batch.outcomes if o.status == "done"]
    for region in regions:
        counts = "/".join(str(sum(d[f"lesions_{c}_{region}"] for d in done)) for c in ("tp", "fp", "fn"))
        means = "".join(f"{stats[f'{key}_{region}']['mean']:13.4f}" for _, key in columns)
        lines.append(f"{region:8s}{means}  {counts:>16s}")
    if any(key.endswith("hd95") for _, key in columns):
        lines += [f"HD95 {name}: {text}" for name, text in batch.extra["hd95_definitions"].items()]
    return lines
