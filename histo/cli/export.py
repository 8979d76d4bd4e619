"""`histo export`: a tile store's tiles as CLAM/TRIDENT coordinate files or QuPath GeoJSON."""

from __future__ import annotations

import click

from histo.batch import BatchSummary
from histo.cli.options import json_option, parse_shard, shard_option
from histo.cli.outcomes import failure_lines, finish

FORMATS = ("clam", "trident", "qupath")  # = pathology.interop.export.EXPORT_FORMATS (light --help)


def _lines(batch: BatchSummary) -> list[str]:
    """One line per written file, then the failures."""
    done = [f"{o.id}: {o.detail['file']}" for o in batch.outcomes if o.status == "done"]
    return [*done, *failure_lines(batch)]


@click.command("export")
@click.argument("store", type=click.Path())
@click.option("--format", "fmt", required=True, type=click.Choice(FORMATS), help="File layout to write.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output folder (created).")
@click.option(
    "--which",
    type=click.Choice(["selected", "mosaic"]),
    default="selected",
    show_default=True,
    help="clam/trident: the high-cellularity tiles or the whole mosaic.",
)
@shard_option
@json_option
def export(store: str, fmt: str, out: str, which: str, shard: str | None, as_json: bool) -> None:
    """Write one file per tiled slide of STORE: clam -> OUT/patches/<id>.h5, trident ->
    OUT/patches/<id>_patches.h5 (level-0 coords with the attributes each tool reads), qupath ->
    OUT/<id>.geojson (tissue outline, mosaic and high-cellularity tiles, level-0 coordinates).

    Exit code 0 when every slide is written, 1 when any failed, 2 for a wrong option or store."""
    from pathology.interop.export import export_store

    batch = export_store(store, out, fmt, which=which, shard=parse_shard(shard))
    finish(batch, as_json, _lines(batch))
