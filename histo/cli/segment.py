"""`histo segment train|predict|eval`: reversible-MBConv 3D U-Nets on BraTS case folders."""

from __future__ import annotations

import sys

import click

from histo.cli.options import config_option, device_option, emit_json, json_option


def _int_list(count: int | None = None):
    """A click callback parsing `16,32,64` into [16, 32, 64] (exactly `count` values when given)."""

    def parse(ctx: click.Context, param: click.Parameter, value: str | None) -> list[int] | None:
        if value is None:
            return None
        try:
            values = [int(v) for v in value.split(",") if v.strip()]
        except ValueError:
            raise click.BadParameter(f"expected comma-separated integers, got {value!r}") from None
        if not values or (count is not None and len(values) != count) or min(values) < 1:
            want = f"{count} positive integers" if count else "positive integers"
            raise click.BadParameter(f"expected {want}, got {value!r}")
        return values

    return parse


def _say(as_json: bool, text: str) -> None:
    click.echo(text, err=as_json)


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
@click.option("--roi", default=None, callback=_int_list(3), help="Training crop, e.g. 128,128,128.")
@click.option("--channels", default=None, callback=_int_list(), help="Channels per level, e.g. 16,32,64,128.")
@click.option("--epochs", type=int, default=None, help="Number of epochs.")
@device_option
@click.option("--resume", is_flag=True, help="Continue the run whose <out>.last.pt exists (same config).")
@config_option
@json_option
def train(data_dir, out_path, norm, reversible, roi, channels, epochs, device, resume, config_path, as_json):
    """Train a UNet3D on BraTS case folders (runs under torchrun for DDP)."""
    from histo.config import load_config
    from segmentation.train import train_segmenter

    overrides = {
        "model.norm": norm,
        "model.reversible": reversible,
        "data.roi": roi,
        "model.channels": channels,
        "train.epochs": epochs,
        "device": device,
    }
    config = load_config("segment", config_path, overrides)
    summary = train_segmenter(data_dir, out_path, config, resume=resume)
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
@click.option("--roi", default=None, callback=_int_list(3), help="Sliding-window size, e.g. 128,128,128.")
@click.option(
    "--overlap", type=click.FloatRange(0, 1, max_open=True), default=None, help="Window overlap in [0, 1)."
)
@click.option("--tta/--no-tta", default=None, help="Average the 8 flips (test-time augmentation).")
@click.option(
    "--overwrite", is_flag=True, help="Recompute every case, even in an --out made with other settings."
)
@device_option
@config_option
@json_option
def predict(model_path, case_dirs, out_dir, roi, overlap, tta, overwrite, device, config_path, as_json):
    """Segment case folders (or folders of cases) into <out>/<case_id>.nii.gz label maps + overlay PNGs."""
    from histo.config import load_config
    from segmentation.infer import predict_cases

    overrides = {"infer.roi": roi, "infer.overlap": overlap, "infer.tta": tta, "device": device}
    config = load_config("segment", config_path, overrides)
    summary = predict_cases(model_path, case_dirs, out_dir, config["infer"], config["device"], overwrite)
    if as_json:
        emit_json(summary)
    for record in summary["cases"]:
        detail = record.get("output") if record["status"] != "error" else record["reason"]
        _say(as_json, f"{record['case_id']}: {record['status']} {detail}")
    if summary["n_failed"]:
        _say(as_json, f"error: {summary['n_failed']} case(s) failed (see {out_dir}/predictions.json)")
        sys.exit(1)


@segment.command("eval")
@click.option(
    "--pred", "pred_dir", required=True, type=click.Path(file_okay=False), help="Predicted label maps."
)
@click.option("--data", "data_dir", required=True, type=click.Path(file_okay=False), help="Cases with *_seg.")
@click.option(
    "--out", "out_dir", default=None, type=click.Path(file_okay=False), help="Report folder (default --pred)."
)
@json_option
def evaluate(pred_dir, data_dir, out_dir, as_json):
    """Dice and HD95 per region (TC, WT, ET) with BraTS conventions: metrics.csv + summary.json."""
    from segmentation.metrics import evaluate_predictions

    summary = evaluate_predictions(pred_dir, data_dir, out_dir)
    if as_json:
        emit_json(summary)
    _say(as_json, f"{summary['n_ok']}/{summary['n_cases']} cases scored; HD95 = {summary['hd95_definition']}")
    for key, stats in summary["metrics"].items():
        _say(
            as_json,
            f"  {key:9s} mean {stats['mean']:.4f}  median {stats['median']:.4f}  std {stats['std']:.4f}",
        )
    for failed in summary["failed"]:
        _say(as_json, f"error: {failed['case_id']}: {failed['reason']}")
    if summary["failed"]:
        sys.exit(1)
