"""`histo index`: extract features of a tile store (a histo checkpoint or a registry encoder) and build a
FAISS slide index."""

from __future__ import annotations

from pathlib import Path

import click

from histo.cli.options import (
    config_option,
    device_option,
    json_option,
    parse_shard,
    shard_option,
    stage_config,
)
from histo.cli.outcomes import failure_lines, finish, update_lines
from search.kinds import kind_names

KEYS = {"index_type": "type", "batch_size": "run.batch_size", "device": "run.device"}


@click.command("index")
@click.option("--tiles", "tiles", type=click.Path(), help="Tile store (from `histo tile`).")
@click.option(
    "--features",
    "features_dir",
    type=click.Path(file_okay=False),
    help="Instead of --tiles: a folder of per-slide CLAM/TRIDENT feature .h5 files (`histo features`).",
)
@click.option(
    "--model", type=click.Path(), help="Feature extractor checkpoint (`histo train`), or --encoder/--weights."
)
@click.option(
    "--labels",
    "labels_csv",
    type=click.Path(dir_okay=False),
    help="--features: CSV slide,label[,patient,site].",
)
@click.option(
    "--encoder",
    help="--tiles: a registered encoder (`histo encoders`), with --weights; --features: the encoder name "
    "the files must carry (needed if they carry none).",
)
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
@click.option(
    "--type",
    "index_type",
    default=None,
    help=f"Float index type: {' | '.join(kind_names())} (search/kinds.py).",
)
@click.option("--batch-size", type=int, default=None, help="Tiles per forward pass.")
@click.option("--evaluate", "evaluate", is_flag=True, help="Leave-one-patient-out evaluation after building.")
@device_option
@shard_option
@config_option
@json_option
def index(
    tiles: str | None,
    features_dir: str | None,
    model: str | None,
    labels_csv: str | None,
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
    a final run without --shard builds the index) and build barcode + float FAISS indexes in OUT.

    Exit code 0 when every slide is done or skipped, 1 when any failed, 2 for a store without a tiled
    slide or a wrong option (nothing is created then)."""
    from search.config import IndexConfig
    from search.slide_index import SlideIndex

    rule = {"weights": "weights", "tile_rule": "tile_rule", "grid": "grid", "precision": "precision"}
    # --encoder: a registry name for --tiles (in the config); for --features the name its files carry
    cfg = stage_config(
        IndexConfig, config_path, {**KEYS, **rule, **({"encoder": "encoder"} if tiles else {})}
    )
    shard_pair = parse_shard(shard)
    if (tiles is None) == (features_dir is None):
        raise click.UsageError("give exactly one of --tiles STORE or --features DIR")
    if features_dir is not None and shard_pair[1] > 1:
        raise click.UsageError("--shard applies to --tiles (feature files are imported in one run)")
    if shard_pair[1] > 1:
        batch = SlideIndex.extract(tiles, model, out, cfg, shard=shard_pair)
        note = f"shard {shard_pair[0]}/{shard_pair[1]}: features in {out}; run without --shard to build the index"
        finish(batch, as_json, [*failure_lines(batch), note])
        return
    if features_dir is not None:
        built = SlideIndex.build_from_features(
            features_dir, out, cfg, labels_csv=labels_csv, encoder=encoder, model=model
        )
    else:
        built = SlideIndex.build(tiles, model, out, cfg)
    m = built.manifest
    batch = built.extraction.with_extra(
        index={
            "type": m["index"]["type"],
            "params": m["index"]["params"],
            "counts": m["counts"],
            "failed_slides": m["failed_slides"],
            "device": built.float_index.device_info(),
        }
    )
    lines = [
        f"{out}: {m['counts']['slides']} slides, {m['counts']['tiles']} tiles, {m['index']['type']} index"
    ]
    lines += [*failure_lines(batch), *update_lines(batch)]
    if evaluate:
        ev_dir = Path(out) / "evaluation"
        ev_cfg = cfg.evaluate
        ev = built.evaluate(ev_cfg.k, ev_cfg.mode, ev_dir, strategy=ev_cfg.strategy)
        batch = batch.with_extra(
            evaluation={
                "rows": ev.summary_rows(), "pngs": ev.pngs, "strategy": ev.strategy, "agreement": ev.agreements(),
                **ev.definitions,
            }
        )  # fmt: skip
        lines += ev.strategy_lines()
        lines.append(f"{'scope':<11} {'k':>2} {'n':>5} {'accuracy':>9} {'macro-F1':>9}")
        for r in ev.summary_rows():
            lines.append(
                f"{r['scope']:<11} {r['k']:>2} {r['n']:>5} {r['accuracy']:>9.3f} {r['macro_f1']:>9.3f}"
            )
    finish(batch, as_json, lines)
