"""`histo index`: extract features of a tile store (a histo checkpoint or a registry encoder) or import
CLAM/TRIDENT feature files and build a FAISS slide index, or grow, shrink, retrain, check and evaluate an
existing one."""

from __future__ import annotations

from pathlib import Path
from typing import Any

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

KEYS = {
    "index_type": "type",
    "batch_size": "run.batch_size",
    "device": "run.device",
    "verify": "run.verify_features",
}


@click.command("index")
@click.option(
    "--tiles",
    "tiles",
    type=click.Path(),
    help="Tile store (from `histo tile`): build OUT from it, or add its new slides to the index in OUT.",
)
@click.option(
    "--features",
    "features_dir",
    type=click.Path(file_okay=False),
    help="Instead of --tiles: a folder of per-slide CLAM/TRIDENT feature .h5 files (`histo features`); "
    "on an existing index, its new slides are added.",
)
@click.option(
    "--model",
    type=click.Path(),
    help="Feature extractor checkpoint (`histo train`), or --encoder/--weights; an existing index "
    "defaults to its own.",
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
@click.option("--remove", "remove", is_flag=True, help="Remove the slides SLIDE_IDS from the index in OUT.")
@click.argument("slide_ids", nargs=-1)
@click.option(
    "--retrain",
    is_flag=True,
    help="Rebuild OUT from its stored features: IVF training and nprobe calibration on the slides it has now.",
)
@click.option(
    "--drift",
    is_flag=True,
    help="Check whether OUT should be retrained (recall on the held-out calibration slides, list imbalance).",
)
@click.option("--evaluate", "evaluate", is_flag=True, help="Leave-one-patient-out evaluation of OUT.")
@click.option(
    "--verify",
    "verify",
    flag_value="full",
    default=None,
    help="--tiles on an existing OUT: decode every stored slide's features (their crc32c checked) before "
    "adding, not only those whose files changed size, time or inode (config run.verify_features).",
)
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
    remove: bool,
    slide_ids: tuple[str, ...],
    retrain: bool,
    drift: bool,
    evaluate: bool,
    verify: str | None,
    device: str | None,
    shard: str | None,
    config_path: str | None,
    as_json: bool,
) -> None:
    """Extract features of every selected tile (resumable per slide; --shard I/N extracts only that share,
    a final run without --shard builds the index) and build barcode + float FAISS indexes in OUT.

    On an existing index, --tiles (or --features) adds the new slides and the corrected labels of the
    store to its trained structures (no retraining), --remove SLIDE_ID... removes slides, --retrain rebuilds it, --drift says whether to retrain. Each
    change is a new version: searches running on OUT see the old or the new one, never half of it.

    Exit code 0 when every slide is done or skipped, 1 when any failed, 2 for a store without a tiled
    slide or a wrong option (nothing is created then)."""
    from histo.batch import BatchSummary, Outcome
    from search.config import IndexConfig
    from search.growth import remove_slides
    from search.growth import retrain as retrain_index
    from search.slide_index import SlideIndex, grow

    rule = {"weights": "weights", "tile_rule": "tile_rule", "grid": "grid", "precision": "precision"}
    # --encoder: a registry name for --tiles (in the config); for --features the name its files carry
    cfg = stage_config(
        IndexConfig, config_path, {**KEYS, **rule, **({"encoder": "encoder"} if tiles else {})}
    )
    source = tiles if features_dir is None else features_dir
    exists = _check_options(
        Path(out), tiles, features_dir, remove, slide_ids, retrain, drift, evaluate, shard, verify
    )
    shard_pair = parse_shard(shard)
    if shard_pair[1] > 1:
        batch = SlideIndex.extract(tiles, model, out, cfg, shard=shard_pair)
        note = f"shard {shard_pair[0]}/{shard_pair[1]}: features in {out}; run without --shard to build the index"
        finish(batch, as_json, [*failure_lines(batch), note])
        return
    opened, lines, updates = None, [], []
    batch = BatchSummary((), out=str(out))
    if tiles is not None and exists:  # grow without loading the index
        batch, update = grow(tiles, model, out, cfg)
        updates.append(update)
    elif features_dir is not None:
        opened = SlideIndex.build_from_features(
            features_dir, out, cfg, labels_csv=labels_csv, encoder=encoder, model=model
        )
        batch = opened.extraction
        updates.append(opened.update if exists else None)
    elif tiles is not None:
        opened = SlideIndex.build(tiles, model, out, cfg)
        batch = opened.extraction
    if source is not None and exists and updates[-1] is None:
        lines.append(f"{out}: no new slide or change in {source}; the index is unchanged")
    if remove:
        updates.append(remove_slides(Path(out), list(slide_ids), cfg.update))
        batch = BatchSummary(tuple(Outcome.done(sid, None) for sid in slide_ids), out=str(out))
    if retrain:
        updates.append(retrain_index(Path(out)))
    if (drift or evaluate) and (opened is None or retrain):
        opened = SlideIndex.open(out, {"run": {"device": cfg.run.device}})
    manifest = _manifest(Path(out)) if opened is None else opened.manifest
    record = _index_record(manifest, opened)
    lines += [f"{out}: {u.op} {_change(u)}" for u in updates if u is not None]
    c = manifest["counts"]
    lines.append(
        f"{out}: {c['slides']} slides, {c['tiles']} tiles, {manifest['index']['type']} index "
        f"(version {manifest['version']}, x{manifest['growth']['tiles_vs_trained']:.2f} the tiles it was trained on)"
    )
    lines += [*failure_lines(batch), *update_lines(batch)]
    batch = batch.with_extra(index=record, updates=[u.record() for u in updates if u is not None])
    if drift:
        check = opened.drift(cfg.update.model_dump())
        batch = batch.with_extra(drift=check.to_dict())
        lines += check.lines()
    if evaluate:
        ev_dir = Path(out) / "evaluation"
        ev_cfg = cfg.evaluate
        ev = opened.evaluate(ev_cfg.k, ev_cfg.mode, ev_dir, strategy=ev_cfg.strategy)
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


def _check_options(
    out: Path,
    tiles: str | None,
    features_dir: str | None,
    remove: bool,
    slide_ids: tuple[str, ...],
    retrain: bool,
    drift: bool,
    evaluate: bool,
    shard: str | None,
    verify: str | None,
) -> bool:
    """Refuse option combinations that mean nothing (one line each); True when OUT holds an index."""
    from histo.errors import HistoError
    from search.manifest import MANIFEST

    exists = (out / MANIFEST).exists()
    if tiles is not None and features_dir is not None:
        raise HistoError("give exactly one of --tiles STORE or --features DIR")
    if features_dir is not None and shard is not None:
        raise HistoError("--shard applies to --tiles (feature files are imported in one run)")
    source = tiles if features_dir is None else features_dir
    if slide_ids and not remove:
        raise HistoError(f"unexpected arguments {' '.join(slide_ids)} (slide IDs go with --remove)")
    if remove and (not slide_ids or source is not None or retrain):
        raise HistoError("--remove takes the slide IDs to remove, without --tiles/--features or --retrain")
    if source is None and not (remove or retrain or drift or evaluate):
        raise HistoError(
            "give --tiles STORE or --features DIR (build or grow OUT), or --remove, --retrain, --drift or "
            "--evaluate"
        )
    if shard is not None and (tiles is None or remove or retrain or drift or evaluate):
        raise HistoError(
            "--shard extracts the features of --tiles only (no --remove/--retrain/--drift/--evaluate)"
        )
    if verify is not None and tiles is None:
        raise HistoError("--verify checks the stored features of a --tiles run (no --tiles given)")
    if source is None and not exists:
        raise HistoError(f"{out}: no index here (build one with --tiles STORE --model CKPT)")
    return exists


def _manifest(out: Path) -> dict[str, Any]:
    from search.manifest import read_manifest

    return read_manifest(out, "none")


def _index_record(manifest: dict[str, Any], opened: Any) -> dict[str, Any]:
    """The `index` object of the JSON report."""
    record = {
        "type": manifest["index"]["type"],
        "params": manifest["index"]["params"],
        "counts": manifest["counts"],
        "failed_slides": manifest["failed_slides"],
        "version": manifest["version"],
        "growth": manifest["growth"],
    }
    if opened is not None:
        record["device"] = opened.float_index.device_info()
    return record


def _change(update: Any) -> str:
    """`3 slides (300 tiles) -> version 4` for an update's report line."""
    if update.op in ("compact", "retrain"):
        return f"-> version {update.version}"
    merged = ", parts merged" if update.compacted else ""
    relabelled = f", {len(update.relabelled)} relabelled" if update.relabelled else ""
    if update.op == "relabel":
        return f"{len(update.relabelled)} slides relabelled -> version {update.version}"
    return f"{len(update.slide_ids)} slides ({update.tiles} tiles){relabelled} -> version {update.version}{merged}"
