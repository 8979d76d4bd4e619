"""`histo tile`: high-cellularity mosaic tiling of whole-slide images into a zarr tile store."""

from __future__ import annotations

import click

from histo.batch import BatchSummary
from histo.cli.options import choices, config_option, json_option, parse_shard, shard_option, stage_config
from histo.cli.outcomes import finish, update_lines
from pathology.config import Reader, StainMethod


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
@click.option("--workers", type=int, default=None, help="Processes over slides (run.workers).")
@click.option("--save-pixels", is_flag=True, help="Store the selected tiles' RGB at the target resolution.")
@click.option("--qc-dir", type=click.Path(file_okay=False), help="Write a QC PNG per slide here.")
@click.option(
    "--mpp",
    "mpp_override",
    type=click.FloatRange(min=0, min_open=True),
    help="µm/px for slides without a scale.",
)
@click.option(
    "--replace",
    is_flag=True,
    help="Tile a slide whose ID is done in the store from another file (or a changed one) in its place.",
)
@click.option("--tile-px", type=int, help="Override tile.px (pixels at the target resolution).")
@click.option("--magnification", type=float, help="Override tile.magnification.")
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
    default=None,
    help=f"Slide reader (run.reader): {choices(Reader)} (auto: ngff for OME-Zarr, OpenSlide, then "
    "tiatoolbox for OME-TIFF/DICOM/JP2/... when installed).",
)
@click.option(
    "--stain-norm", default=None, help=f"Stain normalization (stain.method): {choices(StainMethod)}."
)
@click.option(
    "--stain-target",
    default=None,
    help="What the stains are fitted to (stain.target): an RGB image, or a tile store (its tiles: the archive).",
)
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
    replace: bool,
    tile_px: int | None,
    magnification: float | None,
    seed: int | None,
    from_coords: str | None,
    roi: str | None,
    reader: str | None,
    stain_norm: str | None,
    stain_target: str | None,
    as_json: bool,
) -> None:
    """Tile SLIDES (files or folders searched for slide files) into the tile store OUT.

    Exit code 0 when every slide is done or skipped, 1 when any failed (after all the others), 2 when
    no slide is found or an option is wrong (nothing is created then).
    """
    from pathology.config import TileConfig
    from pathology.tiler import tile_slides

    keys = {
        "tile_px": "tile.px",
        "magnification": "tile.magnification",
        "seed": "seed",
        "workers": "run.workers",
        "reader": "run.reader",
        "stain_norm": "stain.method",
        "stain_target": "stain.target",
    }
    config = stage_config(TileConfig, config_path, keys)
    batch = tile_slides(
        list(slides), out, config, labels_csv=labels_csv, shard=parse_shard(shard), save_pixels=save_pixels,
        qc_dir=qc_dir, mpp_override=mpp_override, from_coords=from_coords, roi=roi, replace=replace,
    )  # fmt: skip
    finish(batch, as_json, [*_table(batch), *update_lines(batch)])
