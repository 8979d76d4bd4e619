"""`histo tile`: high-cellularity mosaic tiling of whole-slide images into a zarr tile store."""

from __future__ import annotations

import click

from histo.batch import BatchSummary
from histo.cli.options import config_option, json_option, parse_shard, shard_option
from histo.cli.outcomes import finish


def _table(batch: BatchSummary) -> list[str]:
    """One row per slide: status, mosaic and selected tile counts, scale and its source, reason."""
    lines = [f"{'slide':<40} {'status':<8} {'mosaic':>6} {'selected':>8} {'mpp':>7} {'mpp from':<16} reason"]
    for o in batch.outcomes:
        d = o.detail
        mpp = f"{d['mpp']:.4g}" if d.get("mpp") else "-"
        lines.append(
            f"{o.id[:40]:<40} {o.status:<8} {d.get('n_mosaic', 0):>6} {d.get('n_selected', 0):>8} {mpp:>7} "
            f"{d.get('mpp_source') or '-':<16} {o.reason or ''}"
        )
    return lines


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
@click.option(
    "--workers", type=click.IntRange(min=1), default=1, show_default=True, help="Processes over slides."
)
@click.option("--save-pixels", is_flag=True, help="Store the selected tiles' RGB at the target resolution.")
@click.option("--qc-dir", type=click.Path(file_okay=False), help="Write a QC PNG per slide here.")
@click.option(
    "--mpp",
    "mpp_override",
    type=click.FloatRange(min=0, min_open=True),
    help="µm/px for slides without a scale.",
)
@click.option(
    "--tile-px", type=click.IntRange(min=8), help="Override tile.px (pixels at the target resolution)."
)
@click.option(
    "--magnification", type=click.FloatRange(min=0, min_open=True), help="Override tile.magnification."
)
@click.option("--seed", type=int, help="Override seed.")
@click.option(
    "--from-coords",
    type=click.Path(file_okay=False),
    help="Folder of CLAM/TRIDENT coordinate .h5 files: their patches are the tiles (see from_coords.select).",
)
@click.option(
    "--roi",
    type=click.Path(),
    help="QuPath GeoJSON (a file, or a folder of <slide id>.geojson): regions restrict or replace the tissue mask.",
)
@click.option(
    "--reader",
    type=click.Choice(["auto", "openslide", "tiatoolbox"]),
    default="auto",
    show_default=True,
    help="Slide reader (auto: OpenSlide, then tiatoolbox for OME-TIFF/NGFF/JP2/... when installed).",
)
@json_option
def tile(
    slides: tuple[str, ...],
    out: str,
    config_path: str | None,
    labels_csv: str | None,
    shard: str | None,
    workers: int,
    save_pixels: bool,
    qc_dir: str | None,
    mpp_override: float | None,
    tile_px: int | None,
    magnification: float | None,
    seed: int | None,
    from_coords: str | None,
    roi: str | None,
    reader: str,
    as_json: bool,
) -> None:
    """Tile SLIDES (files or folders searched for slide files) into the tile store OUT.

    Exit code 0 when every slide is done or skipped, 1 when any failed (after all the others), 2 when
    no slide is found or an option is wrong (nothing is created then).
    """
    from histo.config import load_config
    from pathology.tiler import tile_slides

    config = load_config(
        "tile", config_path, {"tile.px": tile_px, "tile.magnification": magnification, "seed": seed}
    )
    batch = tile_slides(
        list(slides), out, config, labels_csv=labels_csv, shard=parse_shard(shard), workers=workers,
        save_pixels=save_pixels, qc_dir=qc_dir, mpp_override=mpp_override, from_coords=from_coords, roi=roi, reader=reader,
    )  # fmt: skip
    finish(batch, as_json, _table(batch))
