"""`histo tile`: high-cellularity mosaic tiling of whole-slide images into a zarr tile store."""

from __future__ import annotations

import sys

import click

from histo.cli.options import config_option, emit_json, json_option, parse_shard, shard_option, stage_config


def _table(summary: dict) -> str:
    lines = [f"{'slide':<40} {'status':<8} {'mosaic':>6} {'selected':>8} {'mpp':>7} {'mpp from':<16} reason"]
    for r in summary["slides"]:
        mpp = f"{r['mpp']:.4g}" if r["mpp"] else "-"
        lines.append(
            f"{r['slide_id'][:40]:<40} {r['status']:<8} {r['n_mosaic']:>6} {r['n_selected']:>8} {mpp:>7} "
            f"{r['mpp_source'] or '-':<16} {r['reason'] or ''}"
        )
    c = summary["counts"]
    lines.append(f"{c['done']} done, {c['skipped']} skipped, {c['failed']} failed -> {summary['store']}")
    return "\n".join(lines)


@click.command(name="tile")
@click.argument("slides", nargs=-1, required=True, type=click.Path())
@click.option(
    "--out", required=True, type=click.Path(), help="Tile store (zarr v3 folder), created if absent."
)
@config_option
@click.option(
    "--labels",
    "labels_csv",
    type=click.Path(dir_okay=False),
    help="CSV: slide,label[,patient,site,project,mpp].",
)
@shard_option
@click.option("--workers", type=int, default=None, help="Processes over slides (run.workers).")
@click.option("--save-pixels", is_flag=True, help="Store the selected tiles' RGB at the target resolution.")
@click.option("--qc-dir", type=click.Path(file_okay=False), help="Write a QC PNG per slide here.")
@click.option(
    "--mpp",
    "mpp_override",
    type=click.FloatRange(min=0, min_open=True),
    help="µm/px for slides without a scale.",
)
@click.option("--tile-px", type=int, help="Override tile.px (pixels at the target resolution).")
@click.option("--magnification", type=float, help="Override tile.magnification.")
@click.option("--seed", type=int, help="Override seed.")
@json_option
def tile(
    slides: tuple[str, ...],
    out: str,
    config_path: str | None,
    labels_csv: str | None,
    shard: str | None,
    workers: int | None,
    save_pixels: bool,
    qc_dir: str | None,
    mpp_override: float | None,
    tile_px: int | None,
    magnification: float | None,
    seed: int | None,
    as_json: bool,
) -> None:
    """Tile SLIDES (files or folders searched for slide files) into the tile store OUT.

    Exit code 0 when every slide is done or skipped, 1 when any failed (after all the others).
    """
    from pathology.config import TileConfig
    from pathology.tiler import tile_slides

    keys = {
        "tile_px": "tile.px",
        "magnification": "tile.magnification",
        "seed": "seed",
        "workers": "run.workers",
    }
    config = stage_config(TileConfig, config_path, keys)
    summary = tile_slides(
        list(slides), out, config, labels_csv=labels_csv, shard=parse_shard(shard), save_pixels=save_pixels,
        qc_dir=qc_dir, mpp_override=mpp_override,
    )  # fmt: skip
    click.echo(_table(summary), err=as_json)
    if as_json:
        emit_json(summary)
    if summary["counts"]["failed"]:
        sys.exit(1)
