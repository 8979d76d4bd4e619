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
@device_option
@click.option(
    "--resume", is_flag=True, default=None, help="Continue the run whose <out>.last.pt exists (same config)."
)
@config_option
@json_option
def train(data_dir, out_path, norm, reversible, roi, channels, epochs, device, resume, config_path, as_json):
    """Train a UNet3D on BraTS case folders (runs under torchrun for DDP)."""
    from segmentation.config import SegmentConfig
    from segmentation.train import train_segmenter

    keys = {
        "norm": "model.norm",
        "reversible": "model.reversible",
        "roi": "data.roi",
        "channels": "model.channels",
        "epochs": "train.epochs",
        "device": "run.device",
        "resume": "run.resume",
    }
    config = stage_config(SegmentConfig, config_path, keys)
    summary = train_segmenter(data_dir, out_path, config)
    if summary["rank"] != 0:  # under torchrun only the main process reports
        return
    if as_json:
        emit_json(summary)
    else:
        best = summary["best_val_dice_mean"]
        best_text = "n/a (no validation cases)" if best is None else f"{best:.4f}"
        click.echo(
            f"trained {summary['epochs_done']}/{summary['epochs']} epochs; best mean val Dice {best_text}"
        )
        click.echo(f"best checkpoint: {summary['best']}; metrics: {summary['csv']}")


@segment.command("predict")
@click.option("--model", "model_path", required=True, type=click.Path(dir_okay=False), help="Checkpoint.")
@click.argument("case_dirs", nargs=-1, required=True, type=click.Path(file_okay=False))
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Output folder.")
@click.option("--roi", default=None, callback=_int_list, help="Sliding-window size, e.g. 128,128,128.")
@click.option("--overlap", type=float, default=None, help="Window overlap in [0, 1).")
@click.option("--tta/--no-tta", default=None, help="Average the 8 flips (test-time augmentation).")
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
    model_path, case_dirs, out_dir, roi, overlap, tta, overwrite, replace, device, config_path, as_json
):
    """Segment case folders (or folders of cases) into <out>/<case_id>.nii.gz label maps + overlay PNGs.

    Exit code 0 when every case is done or skipped (already segmented), 1 when any failed, 2 when no
    case is found or an option is wrong (nothing is created then)."""
    from segmentation.config import SegmentConfig
    from segmentation.infer import predict_cases

    keys = {"roi": "infer.roi", "overlap": "infer.overlap", "tta": "infer.tta", "device": "run.device"}
    config = stage_config(SegmentConfig, config_path, keys)
    batch = predict_cases(model_path, case_dirs, out_dir, config, overwrite, replace)
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
@click.option("--hd95/--no-hd95", default=None, help="Also HD95 per region (eval.hd95), or Dice only.")
@config_option
@json_option
def evaluate(pred_dir, data_dir, out_dir, hd95, config_path, as_json):
    """Dice and HD95 per region (TC, WT, ET) with BraTS conventions: metrics.csv + summary.json.

    Exit code 0 when every labelled case is scored (a case without *_seg is skipped), 1 when a
    prediction is missing or does not fit, 2 when no labelled case is found (nothing is written)."""
    from segmentation.config import SegmentConfig
    from segmentation.metrics import evaluate_predictions

    config = stage_config(SegmentConfig, config_path, {"hd95": "eval.hd95"})
    batch = evaluate_predictions(pred_dir, data_dir, out_dir, config)
    lines = [f"{batch.counts['done']} cases scored; HD95 = {batch.extra['hd95_definition']}"]
    lines += [
        f"  {key:9s} mean {stats['mean']:.4f}  median {stats['median']:.4f}  std {stats['std']:.4f}"
        for key, stats in batch.extra["metrics"].items()
    ]
    finish(batch, as_json, [*lines, *failure_lines(batch)])
