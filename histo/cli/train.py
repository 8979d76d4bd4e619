"""`histo train`: train or fine-tune KimiaNet (DenseNet-121) or a CBR baseline on a tile store."""

from __future__ import annotations

import click

from histo.cli.options import compose, config_option, device_option, emit_json, json_option

_options = compose(
    click.option("--tiles", "tiles", required=True, type=click.Path(), help="Tile store (from `histo tile`)."),
    click.option("--out", "out", required=True, type=click.Path(dir_okay=False), help="Model checkpoint to write."),
    click.option("--variant", type=click.Choice(["I", "II", "III", "IV", "scratch"]), default=None,
                 help="Train the last 1/2/3 dense blocks (I-III), all layers (IV), or from random init (scratch)."),
    click.option("--arch", default=None, help="densenet121 | cbr-tiny | cbr-small | cbr-large-t | cbr-large-w."),
    click.option("--norm", default=None, help="Normalization block (histo.norms name: batch, ibn_a, group, ...)."),
    click.option("--init", "init", type=click.Path(dir_okay=False), default=None,
                 help="Pretrained weights: official KimiaNet or torchvision DenseNet-121 checkpoint."),
    click.option("--epochs", type=int, default=None),
    click.option("--batch-size", type=int, default=None, help="Global batch per step (over all processes)."),
    click.option("--input-px", type=int, default=None, help="Network input size in pixels (paper: 1000)."),
    click.option("--lr", type=float, default=None),
    click.option("--workers", type=int, default=None, help="DataLoader workers per process."),
    click.option("--seed", type=int, default=None),
    click.option("--resume", is_flag=True, default=None, help="Continue exactly from OUT's last training state."),
    click.option("--skip-missing", is_flag=True, default=None, help="Skip slides whose file has moved."),
    device_option,
    config_option,
    json_option,
)  # fmt: skip


@click.command(name="train")
@_options
def train(tiles, out, config_path, as_json, **flags) -> None:
    """Train on the high-cellularity tiles of a tile store (weak slide labels, split by patient).

    Writes OUT (best model), OUT.last.pt (training state for --resume), metrics CSV and a curve PNG.
    Under torchrun (scripts/torchrun_local.sh) it runs DistributedDataParallel.
    """
    from histo.config import load_config
    from pathology.train import train_kimianet

    overrides = {
        "model.variant": flags["variant"],
        "model.arch": flags["arch"],
        "model.norm": flags["norm"],
        "model.init": flags["init"],
        "model.input_px": flags["input_px"],
        "optim.epochs": flags["epochs"],
        "optim.batch_size": flags["batch_size"],
        "optim.lr": flags["lr"],
        "data.workers": flags["workers"],
        "data.skip_missing": flags["skip_missing"],
        "seed": flags["seed"],
        "resume": flags["resume"],
        "device": flags["device"],
    }
    config = load_config("train", config_path, overrides)
    summary = train_kimianet(tiles, out, config)
    if summary.get("world_size", 1) > 1 and summary.get("rank", 0) != 0:
        return
    if as_json:
        emit_json(summary)
    else:
        best = summary["best"]
        click.echo(
            f"best epoch {summary['best_epoch']}: val acc {best.get('val_acc', float('nan')):.3f}, "
            f"macro-F1 {best.get('val_macro_f1', float('nan')):.3f} -> {summary['out']}",
            err=True,
        )
