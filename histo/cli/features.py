"""`histo features`: per-slide feature files of a tile store in the CLAM/TRIDENT layout."""

from __future__ import annotations

import click

from histo.batch import BatchSummary
from histo.cli.options import (
    config_option,
    device_option,
    json_option,
    parse_shard,
    shard_option,
    stage_config,
)
from histo.cli.outcomes import failure_lines, finish


def _lines(batch: BatchSummary) -> list[str]:
    done = [
        f"{o.id}: {o.detail['n_tiles']} tiles -> {o.detail['file']}"
        for o in batch.outcomes
        if o.status == "done"
    ]
    return [*done, *failure_lines(batch)]


@click.command("features")
@click.option("--tiles", required=True, type=click.Path(), help="Tile store (from `histo tile`).")
@click.option(
    "--model", required=True, type=click.Path(), help="Feature extractor checkpoint (`histo train`)."
)
@click.option(
    "--out", required=True, type=click.Path(file_okay=False), help="Folder of feature files (created)."
)
@click.option(
    "--layout",
    type=click.Choice(["trident", "clam"]),
    default="trident",
    show_default=True,
    help="trident: OUT/<id>.h5; clam: OUT/h5_files/<id>.h5 (+ OUT/pt_files/<id>.pt with --pt).",
)
@click.option(
    "--pt", is_flag=True, help="Also write the features as a torch tensor <id>.pt (CLAM's MIL input)."
)
@click.option(
    "--batch-size",
    type=int,
    default=None,
    help="Tiles per forward pass (run.batch_size of the index config).",
)
@device_option
@shard_option
@config_option
@json_option
def features(
    tiles: str,
    model: str,
    out: str,
    layout: str,
    pt: bool,
    batch_size: int | None,
    device: str | None,
    shard: str | None,
    config_path: str | None,
    as_json: bool,
) -> None:
    """Write one .h5 per tiled slide of the store (--config: an index config, for run.device and
    run.batch_size) (datasets features and coords, with the attributes
    CLAM, TRIDENT and their MIL code read). Resumable: a slide whose file exists with the same model is
    skipped. `histo index --features OUT` builds an index from the folder.

    Exit code 0 when every slide is done or skipped, 1 when any failed, 2 for a wrong option."""
    from search.config import IndexConfig
    from search.feature_files import write_feature_files
    from search.slide_index import load_extractor

    run = stage_config(IndexConfig, config_path, {"batch_size": "run.batch_size", "device": "run.device"}).run
    extractor = load_extractor(model, run.device)
    batch = write_feature_files(
        tiles, extractor, out, layout=layout, pt=pt, shard=parse_shard(shard), batch_size=run.batch_size
    )
    finish(batch, as_json, _lines(batch))
