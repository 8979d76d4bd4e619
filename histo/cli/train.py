"""`histo train`: train or fine-tune a registry encoder (KimiaNet by default) with a head on a tile store."""

from __future__ import annotations

import logging

import click

from histo.cli.options import (
    choices,
    compose,
    config_option,
    device_option,
    emit_json,
    json_option,
    stage_config,
)
from histo.errors import HistoError
from pathology.config import Variant

logger = logging.getLogger(__name__)

# click parameter -> config key (flags override the --config file, which overrides the defaults)
KEYS = {
    "variant": "model.variant",
    "encoder": "model.encoder",
    "norm": "model.norm",
    "init": "model.init",
    "input_px": "model.input_px",
    "epochs": "optim.epochs",
    "batch_size": "optim.batch_size",
    "lr": "optim.lr",
    "workers": "run.workers",
    "skip_missing": "data.skip_missing",
    "seed": "seed",
    "resume": "run.resume",
    "overwrite": "run.overwrite",
    "device": "run.device",
}

_options = compose(
    click.option("--tiles", "tiles", required=True, type=click.Path(), help="Tile store (from `histo tile`)."),
    click.option("--out", "out", required=True, type=click.Path(dir_okay=False), help="Model checkpoint to write."),
    click.option("--encoder", default=None,
                 help="Registry encoder to fine-tune (`histo encoders`): kimianet, densenet121-imagenet, cbr-*, resnet50-trunc, ..."),
    click.option("--arch", default=None, hidden=True, help="Deprecated spelling of --encoder (densenet121: kimianet)."),
    click.option("--variant", default=None,
                 help=f"{choices(Variant)}: the last 1/2/3 dense blocks (I-III, DenseNet), all layers (IV), random init "
                      "(scratch), norm scales+shifts (norm_only) or shifts (norm_shift), each with the head."),
    click.option("--norm", default=None, help="DenseNet/CBR: normalization block (histo.norms name: batch, ibn_a, group, ...)."),
    click.option("--init", "init", type=click.Path(dir_okay=False), default=None,
                 help="The encoder's pretrained weight file (e.g. KimiaNetPyTorchWeights.pth, torchvision .pth, timm .safetensors)."),
    click.option("--epochs", type=int, default=None),
    click.option("--batch-size", type=int, default=None, help="Global batch per step (over all processes)."),
    click.option("--input-px", type=int, default=None, help="Network input size in pixels (default: the encoder's; KimiaNet 1000)."),
    click.option("--lr", type=float, default=None),
    click.option("--workers", type=int, default=None, help="DataLoader workers per process."),
    click.option("--seed", type=int, default=None),
    click.option("--resume", is_flag=True, default=None,
                 help="Continue exactly from OUT's training state (a re-run without it also resumes; this one requires it)."),
    click.option("--overwrite", is_flag=True, default=None, help="Start over, replacing the run at OUT."),
    click.option("--skip-missing", is_flag=True, default=None, help="Skip slides whose file has moved."),
    device_option,
    config_option,
    json_option,
)  # fmt: skip


def _arch_alias(ctx: click.Context, arch: str | None) -> None:
    """`--arch NAME`, the flag before the encoder registry, sets --encoder to the entry it means (with a
    warning), so old scripts keep working; giving both is refused."""
    from pathology.kimianet import encoder_of_arch

    if arch is None:
        return
    if ctx.params["encoder"] is not None:
        raise HistoError("--arch is the deprecated spelling of --encoder: give only --encoder")
    try:
        ctx.params["encoder"] = encoder_of_arch(arch)
    except HistoError as e:
        raise HistoError(f"--arch: {e} (use --encoder NAME, see `histo encoders`)") from None
    logger.warning("--arch is deprecated; use --encoder %s", ctx.params["encoder"])


@click.command(name="train")
@_options
@click.pass_context
def train(ctx, tiles, out, config_path, as_json, arch, **flags) -> None:
    """Fine-tune (or train) an encoder on the high-cellularity tiles of a tile store (weak slide labels,
    split by patient); prints what the variant trains (parameter counts, also in --json).

    Writes OUT = STEM.pt (best model), STEM.last.pt (training state), STEM.metrics.csv and STEM.curves.png.
    A re-run with the same config resumes (a finished run does nothing); another config is refused unless
    --overwrite. Under torchrun (scripts/torchrun_local.sh) it runs DistributedDataParallel.
    """
    from pathology.config import TrainConfig
    from pathology.train import train_kimianet
    from pathology.variants import counts_line

    _arch_alias(ctx, arch)
    config = stage_config(TrainConfig, config_path, KEYS)
    summary = train_kimianet(tiles, out, config)
    if summary.get("world_size", 1) > 1 and summary.get("rank", 0) != 0:
        return
    if as_json:
        emit_json(summary)
    else:
        best, counts = summary["best"], summary["parameters"]
        click.echo(counts_line(summary["variant"], counts), err=True)
        click.echo(
            f"best epoch {summary['best_epoch']}: val acc {best.get('val_acc', float('nan')):.3f}, "
            f"macro-F1 {best.get('val_macro_f1', float('nan')):.3f} -> {summary['out']}",
            err=True,
        )
