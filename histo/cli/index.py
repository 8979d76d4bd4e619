"""`histo index`: extract KimiaNet features of a tile store and build a FAISS slide index."""

from __future__ import annotations

from pathlib import Path

import click

from histo.cli.options import (
    choices,
    config_option,
    device_option,
    emit_json,
    json_option,
    parse_shard,
    shard_option,
    stage_config,
)
from search.config import IndexType

KEYS = {"index_type": "type", "batch_size": "run.batch_size", "device": "run.device"}


@click.command("index")
@click.option("--tiles", "tiles", required=True, type=click.Path(), help="Tile store (from `histo tile`).")
@click.option(
    "--model", required=True, type=click.Path(), help="Feature extractor checkpoint (`histo train`)."
)
@click.option(
    "--out", required=True, type=click.Path(file_okay=False), help="Index directory (created/resumed)."
)
@click.option("--type", "index_type", default=None, help=f"Float index type: {choices(IndexType)}.")
@click.option("--batch-size", type=int, default=None, help="Tiles per forward pass.")
@click.option("--evaluate", "evaluate", is_flag=True, help="Leave-one-patient-out evaluation after building.")
@device_option
@shard_option
@config_option
@json_option
def index(
    tiles: str,
    model: str,
    out: str,
    index_type: str | None,
    batch_size: int | None,
    evaluate: bool,
    device: str | None,
    shard: str | None,
    config_path: str | None,
    as_json: bool,
) -> None:
    """Extract features of every selected tile (resumable per slide; --shard I/N extracts only that share,
    a final run without --shard builds the index) and build barcode + float FAISS indexes in OUT."""
    from search.config import IndexConfig
    from search.slide_index import SlideIndex

    cfg = stage_config(IndexConfig, config_path, KEYS)
    shard_pair = parse_shard(shard)
    log = _echo(as_json)
    built = SlideIndex.build(tiles, model, out, cfg, shard=shard_pair)
    if built is None:
        report = {"out": out, "shard": f"{shard_pair[0]}/{shard_pair[1]}", "status": "features extracted"}
        log(f"shard {report['shard']}: features extracted in {out}; run without --shard to build the index")
        if as_json:
            emit_json(report)
        return
    m = built.manifest
    report = {
        "out": out,
        "type": m["index"]["type"],
        "params": m["index"]["params"],
        "counts": m["counts"],
        "failed_slides": m["failed_slides"],
        "device": built.float_index.device_info(),
    }
    log(f"{out}: {m['counts']['slides']} slides, {m['counts']['tiles']} tiles, {m['index']['type']} index")
    for f in m["failed_slides"]:
        log(f"  skipped {f['slide_id']}: {f['reason']}")
    if evaluate:
        ev_dir = Path(out) / "evaluation"
        ev = built.evaluate(k=cfg.evaluate.k, mode=cfg.evaluate.mode, out_dir=ev_dir)
        report["evaluation"] = {"rows": ev.summary_rows(), "pngs": ev.pngs}
        log(f"{'scope':<11} {'k':>2} {'n':>5} {'accuracy':>9} {'macro-F1':>9}")
        for r in ev.summary_rows():
            log(f"{r['scope']:<11} {r['k']:>2} {r['n']:>5} {r['accuracy']:>9.3f} {r['macro_f1']:>9.3f}")
    if as_json:
        emit_json(report)


def _echo(as_json: bool):
    """Human output: stdout normally, stderr with --json."""
    return lambda msg: click.echo(msg, err=as_json)
