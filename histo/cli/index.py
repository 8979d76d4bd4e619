"""`histo index`: extract features of a tile store (a histo checkpoint or a registry encoder) and build a
FAISS slide index."""

from __future__ import annotations

from pathlib import Path

import click

from histo.cli.options import config_option, device_option, emit_json, json_option, parse_shard, shard_option

INDEX_TYPES = ("flat", "ivf", "ivfpq", "hnsw")  # = search.index.INDEX_TYPES (kept here so --help is light)


@click.command("index")
@click.option("--tiles", "tiles", required=True, type=click.Path(), help="Tile store (from `histo tile`).")
@click.option(
    "--model", default=None, type=click.Path(), help="Feature extractor checkpoint (`histo train`)."
)
@click.option("--encoder", default=None, help="Registered encoder (`histo encoders`), with --weights.")
@click.option(
    "--weights", default=None, type=click.Path(), help="The encoder's weight file (.pth/.bin/.safetensors)."
)
@click.option(
    "--tile-rule", type=click.Choice(["resize", "grid"]), default=None, help="Tile -> encoder input."
)
@click.option(
    "--grid", type=int, default=None, help="Grid rule: crops per side (default: the encoder's µm/px)."
)
@click.option(
    "--precision",
    type=click.Choice(["float32", "bfloat16", "float16"]),
    default=None,
    help="Compute precision.",
)
@click.option(
    "--out", required=True, type=click.Path(file_okay=False), help="Index directory (created/resumed)."
)
@click.option("--type", "index_type", type=click.Choice(INDEX_TYPES), default=None, help="Float index type.")
@click.option("--batch-size", type=int, default=None, help="Tiles per forward pass.")
@click.option("--evaluate", "evaluate", is_flag=True, help="Leave-one-patient-out evaluation after building.")
@device_option
@shard_option
@config_option
@json_option
def index(
    tiles: str,
    model: str | None,
    encoder: str | None,
    weights: str | None,
    tile_rule: str | None,
    grid: int | None,
    precision: str | None,
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
    from histo.config import load_config
    from search.slide_index import SlideIndex

    flags = {
        "encoder": encoder,
        "weights": weights,
        "tile_rule": tile_rule,
        "grid": grid,
        "precision": precision,
    }
    cfg = load_config(
        "index", config_path, {"type": index_type, "device": device, "batch_size": batch_size, **flags}
    )
    shard_pair = parse_shard(shard)
    log = _echo(as_json)
    built = SlideIndex.build(
        tiles, model, out, index_type=cfg["type"], device=cfg["device"], shard=shard_pair,
        params=cfg["params"], batch_size=cfg["batch_size"], search=cfg["search"],
        encoder=cfg["encoder"], weights=cfg["weights"], tile_rule=cfg["tile_rule"], grid=cfg["grid"],
        precision=cfg["precision"], input_px=cfg["input_px"],
    )  # fmt: skip
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
        ev = built.evaluate(k=tuple(cfg["evaluate"]["k"]), mode=cfg["evaluate"]["mode"], out_dir=ev_dir)
        report["evaluation"] = {"rows": ev.summary_rows(), "pngs": ev.pngs, **ev.definitions}
        log(f"{'scope':<11} {'k':>2} {'n':>5} {'accuracy':>9} {'macro-F1':>9}")
        for r in ev.summary_rows():
            log(f"{r['scope']:<11} {r['k']:>2} {r['n']:>5} {r['accuracy']:>9.3f} {r['macro_f1']:>9.3f}")
    if as_json:
        emit_json(report)


def _echo(as_json: bool):
    """Human output: stdout normally, stderr with --json."""
    return lambda msg: click.echo(msg, err=as_json)
