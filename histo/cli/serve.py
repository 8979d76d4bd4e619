"""`histo serve`: the search page and its JSON API over an index dir (Starlette under uvicorn)."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import click

from histo.cli.options import config_option, device_option, stage_config

TOKEN_ENV = "HISTO_SERVE_TOKEN"


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


@click.command("serve")
@click.option(
    "--index", "index_dir", required=True, type=click.Path(), help="Index directory (`histo index`)."
)
@click.option(
    "--slides-root",
    type=click.Path(file_okay=False),
    default=None,
    help="Folder of slide files that may be searched with (and where moved indexed slides are found).",
)
@click.option(
    "--host", default="127.0.0.1", show_default=True, help="Address to bind (localhost by default)."
)
@click.option("--port", type=int, default=8000, show_default=True)
@click.option(
    "--token",
    envvar=TOKEN_ENV,
    show_envvar=True,
    default=None,
    help="Require this token on every request (header `Authorization: Bearer`, or `?token=` once per browser).",
)
@click.option(
    "--cache-dir",
    type=click.Path(file_okay=False),
    default=None,
    help="Where thumbnails and crops are cached [default: INDEX/.serve-cache, not one of the index's files].",
)
@click.option("--max-upload-mb", type=float, default=16.0, show_default=True, help="Largest patch upload.")
@click.option(
    "--max-pixels", type=int, default=4096 * 4096, show_default=True, help="Largest patch (width x height)."
)
@click.option("--access-log", is_flag=True, help="Log every request (uvicorn's access log).")
@device_option
@config_option
def serve(
    index_dir: str,
    slides_root: str | None,
    host: str,
    port: int,
    token: str | None,
    cache_dir: str | None,
    max_upload_mb: float,
    max_pixels: int,
    access_log: bool,
    device: str | None,
    config_path: str | None,
) -> None:
    """Serve a search page for INDEX: the archive, queries by indexed slide, slide file or patch upload,
    results with matched tile pairs side by side, and a Deep Zoom viewer. The query settings come from the
    search config (`--config`, as for `histo search`). Ctrl-C stops it.
    """
    from histo.errors import HistoError
    from search.config import SearchConfig

    try:
        import uvicorn

        from search.web.app import create_app
        from search.web.service import ServeConfig
    except ImportError as e:
        raise HistoError(
            f"histo serve needs the serve extra ({e.name} is missing): pip install 'histo[serve]'"
        ) from None
    if max_upload_mb <= 0 or max_pixels <= 0:
        raise HistoError("--max-upload-mb and --max-pixels must be positive")
    if slides_root is not None and not Path(slides_root).is_dir():
        raise HistoError(f"{slides_root}: --slides-root is not a folder")
    config = ServeConfig(
        index_dir=Path(index_dir),
        slides_root=Path(slides_root) if slides_root else None,
        cache_dir=Path(cache_dir) if cache_dir else None,
        token=token or None,
        max_upload_bytes=int(max_upload_mb * 2**20),
        max_pixels=max_pixels,
        search=stage_config(SearchConfig, config_path, {"device": "run.device"}),
    )
    app = create_app(config)
    service = app.state.service
    shown = f"[{host}]" if ":" in host else host
    click.echo(f"histo serve: {len(service.archive)} slides from {index_dir}")
    click.echo(
        f"  open http://{shown}:{port}/" + (f"?token={token}  (the browser keeps it)" if token else "")
    )
    if not _is_loopback(host) and not token:
        click.echo(
            f"  warning: listening on {host} without a token; anyone who reaches it can search", err=True
        )
    click.echo("  Ctrl-C stops the server")
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=access_log)
