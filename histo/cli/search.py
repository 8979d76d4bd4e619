"""`histo search`: query slides or image patches against a slide index."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from histo.cli.options import config_option, device_option, emit_json, json_option

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"}


def is_patch_file(path: Path) -> bool:
    """An image file (PNG/JPEG/...), or a TIFF that is neither pyramidal nor Aperio, is a patch query."""
    suffix = path.suffix.lower()
    if suffix in IMAGE_SUFFIXES:
        return True
    if suffix not in (".tif", ".tiff"):
        return False
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            return not (tif.is_svs or len(tif.series[0].levels) > 1 or len(tif.pages) > 1)
    except (OSError, tifffile.TiffFileError):
        return False  # let the slide reader give the reason


def read_patch(path: Path):
    """An RGB patch as uint8 (H, W, 3); InputFileError if unreadable or not RGB(A)/grey."""
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    from histo.errors import InputFileError

    try:
        with Image.open(path) as im:
            return np.array(im.convert("RGB"))  # a writable copy
    except (OSError, UnidentifiedImageError) as e:
        raise InputFileError(path, f"not a readable image ({type(e).__name__})") from None


@click.command("search")
@click.option(
    "--index", "index_dir", required=True, type=click.Path(), help="Index directory (`histo index`)."
)
@click.argument("queries", nargs=-1, required=True, type=click.Path())
@click.option("--k", type=int, default=None, help="Result slides per query slide.")
@click.option(
    "--mode", type=click.Choice(["barcode", "float"]), default=None, help="Distance for slide queries."
)
@click.option("--exclude-same-patient", is_flag=True, default=None, help="Drop the query's own patient.")
@click.option(
    "--exhaustive", is_flag=True, default=None, help="Compare every indexed slide (exact; no first stage)."
)
@click.option(
    "--weights", default=None, type=click.Path(), help="The index encoder's weight file, if it moved."
)
@device_option
@config_option
@json_option
def search(
    index_dir: str,
    queries: tuple[str, ...],
    k: int | None,
    mode: str | None,
    exclude_same_patient: bool | None,
    exhaustive: bool | None,
    weights: str | None,
    device: str | None,
    config_path: str | None,
    as_json: bool,
) -> None:
    """Search INDEX with QUERY slide files (tiled and featurised like the index) or image patches.

    A query that fails is reported (and in --json carries an "error") and the others go on; the exit
    status is then 1.
    """
    from histo.config import load_config
    from histo.errors import HistoError
    from search.slide_index import SlideIndex

    cfg = load_config(
        "search",
        config_path,
        {
            "k": k,
            "mode": mode,
            "exclude_same_patient": exclude_same_patient or None,
            "exhaustive": exhaustive or None,
            "device": device,
            "weights": weights,
        },
    )
    idx = SlideIndex.open(index_dir, device=cfg["device"], verify=cfg["verify"], weights=cfg["weights"])
    if cfg["tile_k"] is not None:
        idx.engine.tile_k = int(cfg["tile_k"])
    if cfg["stage1_tiles"] is not None:
        idx.engine.stage1_tiles = int(cfg["stage1_tiles"])
    out, failed = [], 0
    for q in queries:
        path = Path(q)
        try:
            if is_patch_file(path):
                result = idx.search_patch(read_patch(path), k=cfg["patch_k"], mode=cfg["patch_mode"])
                result.query = q
            else:
                result = idx.search_slide(
                    q,
                    k=cfg["k"],
                    mode=cfg["mode"],
                    exclude_patient=cfg["exclude_same_patient"] or None,
                    exhaustive=cfg["exhaustive"],
                )
            out.append(result.to_dict())
            _print_result(result.to_dict(), err=as_json)
        except HistoError as e:
            failed += 1
            click.echo(f"error: {e}", err=True)
            out.append({"query": q, "prediction": None, "results": [], "error": str(e)})
    if as_json:
        emit_json({"queries": out})
    if failed:
        sys.exit(1)


def _print_result(r: dict, err: bool) -> None:
    click.echo(f"{r['query']}: prediction {r['prediction']}", err=err)
    click.echo(
        f"  {'rank':>4} {'slide':<28} {'label':<16} {'distance':>9}  best match (query x,y -> x,y)", err=err
    )
    for rank, hit in enumerate(r["results"], 1):
        m = hit["matches"][0] if hit["matches"] else None
        where = (
            ""
            if m is None
            else f"tile at {m['xy']}"
            if m["query_xy"] is None
            else f"{m['query_xy']} -> {m['xy']}"
        )
        click.echo(
            f"  {rank:>4} {hit['slide_id']:<28} {hit['label']!s:<16} {hit['distance']:>9.3f}  {where}",
            err=err,
        )
