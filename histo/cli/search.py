"""`histo search`: query slides or image patches against a slide index."""

from __future__ import annotations

import sys

import click

from histo.cli.options import choices, config_option, device_option, emit_json, json_option, stage_config
from search.config import Mode


@click.command("search")
@click.option(
    "--index", "index_dir", required=True, type=click.Path(), help="Index directory (`histo index`)."
)
@click.argument("queries", nargs=-1, required=True, type=click.Path())
@click.option("--k", type=int, default=None, help="Result slides per query slide.")
@click.option("--mode", default=None, help=f"Distance for slide queries: {choices(Mode)}.")
@click.option("--exclude-same-patient", is_flag=True, default=None, help="Drop the query's own patient.")
@click.option(
    "--exhaustive", is_flag=True, default=None, help="Compare every indexed slide (exact; no first stage)."
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
    device: str | None,
    config_path: str | None,
    as_json: bool,
) -> None:
    """Search INDEX with QUERY slide files (tiled and featurised like the index) or image patches
    (PNG, JPEG, a plain TIFF: their nearest indexed tiles).

    A query that fails is reported (and in --json carries an "error") and the others go on; the exit
    status is then 1.
    """
    from histo.errors import HistoError
    from search.config import SearchConfig
    from search.slide_index import SlideIndex

    keys = {
        "k": "k",
        "mode": "mode",
        "exclude_same_patient": "exclude_same_patient",
        "exhaustive": "exhaustive",
    }
    cfg = stage_config(SearchConfig, config_path, {**keys, "device": "run.device"})
    idx = SlideIndex.open(index_dir, cfg)
    out, failed = [], 0
    for q in queries:
        try:
            result = idx.search(q)  # a slide or an image patch; every setting from the config
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
