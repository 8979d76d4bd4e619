"""`histo search`: query slides or image patches against a slide index."""

from __future__ import annotations

import sys
from pathlib import Path

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
@click.option(
    "--where",
    "where",
    multiple=True,
    metavar="KEY=V1,V2",
    help="Only slides whose KEY (label, site, project, patient) is one of the values; repeat to AND keys.",
)
@click.option(
    "--geojson",
    "geojson_dir",
    type=click.Path(file_okay=False),
    help="Write QuPath GeoJSON of the matched tiles: DIR/<query id>/query/ and DIR/<query id>/hits/.",
)
@click.option(
    "--weights", default=None, type=click.Path(), help="The index encoder's weight file, if it moved."
)
@click.option(
    "--mpp",
    type=float,
    default=None,
    help="µm/px of the query patches (over their metadata) and of query slides without a scale of their "
    "own (query.mpp).",
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
    where: tuple[str, ...],
    weights: str | None,
    mpp: float | None,
    device: str | None,
    config_path: str | None,
    geojson_dir: str | None,
    as_json: bool,
) -> None:
    """Search INDEX with QUERY slide files (tiled and featurised like the index) or image patches
    (PNG, JPEG, a plain TIFF: their nearest indexed tiles).

    With --where the results come only from the slides passing the filter (e.g. --where site=A,B --where
    label=LUAD), exact within it. A patch is checked against the index's tile before it is decoded (its
    declared pixels, its field of view: README "Query files"); `search.query` in --json records its scale
    and the rule applied. A query that fails is reported (and in --json carries an "error") and the others
    go on; the summary line and `counts` follow, and the exit status is then 1. With --geojson each query's
    folder is written
    (search/geojson.py) and named in the output (`geojson` in --json).
    """
    from histo.batch import BatchSummary, Outcome
    from histo.errors import HistoError
    from search.config import SearchConfig
    from search.filters import parse_where
    from search.slide_index import SlideIndex

    keys = {
        "k": "k",
        "mode": "mode",
        "exclude_same_patient": "exclude_same_patient",
        "exhaustive": "exhaustive",
        "mpp": "query.mpp",
    }
    cfg = stage_config(SearchConfig, config_path, {**keys, "device": "run.device", "weights": "run.weights"})
    filter_ = parse_where(where)
    idx = SlideIndex.open(index_dir, cfg)
    idx.catalog.allowed(None, filter_)  # a filter no slide passes is an error before any query
    if geojson_dir is not None:
        _check_geojson(idx, queries, Path(geojson_dir))
    out, outcomes = [], []
    for q in queries:
        try:
            result = idx.search(q, where=filter_)  # a query file's checks, then the rest from the config
            shown = result.to_dict()
            if geojson_dir is not None:
                from pathology.slide import slide_id_of
                from search.geojson import write_result_geojson

                shown["geojson"] = str(write_result_geojson(result, geojson_dir, slide_id_of(q)))
            out.append(shown)
            outcomes.append(Outcome.done(q, q))
            _print_result(shown, err=as_json)
        except HistoError as e:
            outcomes.append(Outcome.failed(q, q, str(e)))
            click.echo(f"error: {e}", err=True)
            out.append({"query": q, "prediction": None, "results": [], "error": str(e)})
    summary = BatchSummary(tuple(outcomes))
    click.echo(summary.summary_line(), err=as_json)
    if as_json:
        emit_json({"queries": out, "counts": summary.counts})
    if summary.exit_code():
        sys.exit(summary.exit_code())


def _check_geojson(idx, queries: tuple[str, ...], out: Path) -> None:
    """Before any query: every indexed slide's tile side is recorded, query IDs are distinct folder names,
    and the output folder can be made."""
    from histo.errors import HistoError
    from pathology.slide import slide_id_of
    from pathology.store import slide_id_problem
    from search.geojson import missing_tile_sides

    missing = missing_tile_sides(idx.catalog)
    if missing:
        raise HistoError(
            f"{idx.path}: tile sizes of {len(missing)} slide(s) are not recorded (first {missing[0]}); "
            "rebuild the index with histo index to write GeoJSON"
        )
    seen: dict[str, str] = {}
    for q in queries:
        qid = slide_id_of(q)
        problem = slide_id_problem(qid)
        if problem:
            raise HistoError(f"{q}: cannot name its GeoJSON folder: {problem}")
        if seen.setdefault(qid, q) != q:
            raise HistoError(f"{q}: same query ID {qid!r} as {seen[qid]}; their GeoJSON folders would clash")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise HistoError(f"{out}: cannot create the GeoJSON folder ({e.strerror})") from None


def _print_result(r: dict, err: bool) -> None:
    click.echo(f"{r['query']}: prediction {r['prediction']}", err=err)
    if "geojson" in r:
        click.echo(f"  geojson: {r['geojson']}", err=err)
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
