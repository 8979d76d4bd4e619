"""`histo robustness pathology|segment`: models under image corruptions, ImageNet-C metrics and plots."""

from __future__ import annotations

import click

from histo.batch import ALREADY_DONE, BatchSummary
from histo.cli.options import compose, config_option, device_option, json_option, stage_config
from histo.cli.outcomes import failure_lines, finish

common_options = compose(
    click.option("--model", required=True, type=click.Path(exists=True, dir_okay=False), help="Checkpoint."),
    click.option(
        "--corruptions", default=None, help="Comma-separated corruption names (default: all of the domain)."
    ),
    click.option("--severities", default=None, help="Severities, e.g. 1-5 or 1,3,5."),
    click.option("--alpha-bn", "alpha_bn", type=float, default=None, help="Also run with α-BN, e.g. 0.1."),
    click.option(
        "--reference",
        type=click.Path(exists=True, dir_okay=False),
        default=None,
        help="Reference checkpoint for CE/mCE (the plain-BN model of the task).",
    ),
    click.option("--seed", type=int, default=None, help="Corruption seed."),
    click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Output folder."),
    device_option,
    config_option,
    json_option,
)


COMMON_KEYS = {
    "corruptions": "corruptions",
    "severities": "severities",
    "alpha_bn": "alpha_bn",
    "seed": "seed",
    "device": "run.device",
}


def _config(config_path: str | None, **keys: str):
    """The validated RobustnessConfig: defaults, --config, the common flags and the command's own `keys`."""
    from histo.robustness_config import RobustnessConfig

    return stage_config(RobustnessConfig, config_path, {**COMMON_KEYS, **keys})


def _finish(batch: BatchSummary, out_dir: str, as_json: bool) -> None:
    """A short table of mean scores (and mCE when there is a reference), the failed cells and the
    summary line; the JSON under --json; exit code 1 when a cell failed."""
    lines = []
    for metric, entry in batch.extra["metrics"].items():
        lines.append(f"{metric}:")
        for model, per in sorted(entry["mean"].items()):
            corrupted = [v for c, v in per.items() if c != "clean"]
            line = f"  {model:32s} clean {per.get('clean', float('nan')):.4f}"
            line += f"  corrupted mean {sum(corrupted) / max(len(corrupted), 1):.4f}"
            if "mce" in entry:
                line += f"  mCE {entry['mce'][model]:.3f}  rel. mCE {entry['rmce'][model]:.3f}"
            lines.append(line)
    left_out = [o for o in batch.outcomes if o.status == "skipped" and o.reason != ALREADY_DONE]
    lines += [f"left out: {o.id}: {o.reason}" for o in left_out]
    lines += failure_lines(batch)
    lines.append(f"results in {out_dir}: {', '.join(batch.extra['files'])}")
    finish(batch, as_json, lines)


@click.group(name="robustness")
def robustness() -> None:
    """Evaluate models under image corruptions (ImageNet-C CE, relative CE, mCE; plots)."""


@robustness.command("pathology")
@click.option("--tiles", required=True, type=click.Path(exists=True), help="Tile store (zarr).")
@click.option("--k", type=int, default=None, help="Neighbours voting for a query tile's label.")
@click.option("--encoder", default=None, help="Registered encoder: --model/--reference are its weight files.")
@common_options
def pathology_command(
    tiles,
    k,
    encoder,
    model,
    corruptions,
    severities,
    alpha_bn,
    reference,
    seed,
    out_dir,
    device,
    config_path,
    as_json,
):
    """Leave-one-patient-out nearest-neighbour tile classification under H&E corruptions."""
    from pathology.robustness import evaluate_pathology

    config = _config(config_path, k="pathology.k", encoder="pathology.encoder")
    summary = evaluate_pathology(model, tiles, out_dir, config, reference=reference)
    _finish(summary, out_dir, as_json)


@robustness.command("segment")
@click.option(
    "--data", required=True, type=click.Path(exists=True, file_okay=False), help="BraTS case folders."
)
@click.option("--max-cases", type=int, default=None, help="Evaluate only the first N labelled cases.")
@common_options
def segment_command(
    data,
    max_cases,
    model,
    corruptions,
    severities,
    alpha_bn,
    reference,
    seed,
    out_dir,
    device,
    config_path,
    as_json,
):
    """Dice and HD95 per region (TC, WT, ET) of a 3D U-Net under MRI corruptions."""
    from segmentation.robustness import evaluate_segmentation

    config = _config(config_path, max_cases="segment.max_cases")
    summary = evaluate_segmentation(model, data, out_dir, config, reference=reference)
    _finish(summary, out_dir, as_json)
