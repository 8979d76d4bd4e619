"""The Starlette app of `histo serve`: pages, pictures, Deep Zoom tiles and the JSON API.

Pages: `/` the archive, `/query` the query form, `/jobs/{id}` a query's progress and then its results,
`/slides/{id}` the Deep Zoom viewer. API: `GET /api/slides`, `POST /api/search`, `GET /api/jobs/{id}`.
Every slide is addressed by its index ID, every --slides-root file by its listed key, every query by its
job ID; each is looked up in a table, never joined into a path.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import quote

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from histo.errors import HistoError
from search.web import render
from search.web.archive import NotFound, SlideEntry
from search.web.jobs import Job
from search.web.security import BodyLimit, SecurityHeaders, TokenGate
from search.web.service import ServeConfig, Service

log = logging.getLogger("histo.serve")

API_WAIT_S = 600  # POST /api/search waits this long for its query, then answers 202 with the job
SORT_KEYS = ("slide_id", "label", "site", "patient", "project", "n_tiles")
FACETS = ("label", "site", "project")
IMAGE_CACHE = "private, max-age=86400"
FORM_OVERHEAD = 64 * 1024  # bytes of form fields and multipart framing allowed beside the upload


def svc(request: Request) -> Service:
    return request.app.state.service


def _image(data: bytes, media_type: str) -> Response:
    return Response(data, media_type=media_type, headers={"cache-control": IMAGE_CACHE})


def _facets(entries: list[SlideEntry]) -> dict[str, list[str]]:
    return {f: sorted({getattr(e, f) for e in entries if getattr(e, f)}) for f in FACETS}


def _matches(entry: SlideEntry | None, chosen: dict[str, str]) -> bool:
    return all(entry is not None and getattr(entry, f) == v for f, v in chosen.items())


def _chosen(request: Request) -> dict[str, str]:
    return {f: request.query_params[f] for f in FACETS if request.query_params.get(f)}


# ---- pages ------------------------------------------------------------------------------------------
def archive_page(request: Request) -> Response:
    """The indexed slides with thumbnails and metadata; filter by text and facets, sort by any column."""
    service, params = svc(request), request.query_params
    entries = list(service.archive.slides.values())
    text = params.get("q", "").strip().lower()
    chosen = _chosen(request)
    sort = params.get("sort") if params.get("sort") in SORT_KEYS else "slide_id"
    descending = params.get("order") == "desc"
    shown = [
        e
        for e in entries
        if _matches(e, chosen)
        and (
            not text
            or text in " ".join(str(v) for v in (e.slide_id, e.label, e.patient, e.site, e.project)).lower()
        )
    ]
    shown.sort(
        key=lambda e: (getattr(e, sort) is None, getattr(e, sort) or 0, e.slide_id), reverse=descending
    )
    context = {
        "slides": shown,
        "total": len(entries),
        "facets": _facets(entries),
        "chosen": chosen,
        "text": params.get("q", ""),
        "sort": sort,
        "descending": descending,
        "info": index_info(service),
    }
    return render.page(request, "archive.html", context)


def query_page(request: Request) -> Response:
    """The query form: an indexed slide, a --slides-root file, or an uploaded patch."""
    service = svc(request)
    cfg = service.search_cfg
    context = {
        "slides": list(service.archive.slides.values()),
        "files": sorted(service.archive.refresh_files()),
        "has_root": service.archive.slides_root is not None,
        "chosen_slide": request.query_params.get("slide_id", ""),
        "defaults": {
            k: getattr(cfg, k) for k in ("k", "patch_k", "mode", "patch_mode", "exclude_same_patient")
        },
        "geometry": service.archive.geometry,
        "max_upload_mb": service.config.max_upload_bytes / 2**20,
        "max_pixels": service.config.max_pixels,
        "info": index_info(service),
    }
    return render.page(request, "query.html", context)


async def submit_query(request: Request) -> Response:
    """Check the form, queue the query, and send the browser to its job page."""
    job = await _job_from(request)
    svc(request).jobs.submit(job)
    return RedirectResponse(f"/jobs/{job.id}", status_code=303)


def job_page(request: Request) -> Response:
    """Progress while the query runs (the page reloads itself), then its results."""
    service = svc(request)
    job = service.job(request.path_params["job_id"])
    if job.state != "done":
        context = {"job": job, "ahead": service.jobs.ahead_of(job), "info": index_info(service)}
        return render.page(request, "job.html", context)
    return render.page(request, "results.html", results_context(request, service, job))


def results_context(request: Request, service: Service, job: Job) -> dict[str, Any]:
    """The ranked hits with their slide records, the facet filters, and the query panel."""
    chosen = _chosen(request)
    rows = [
        {"rank": rank, "hit": hit, "entry": service.archive.slides.get(hit["slide_id"])}
        for rank, hit in enumerate(job.result["results"], 1)
    ]
    query_entry = service.archive.slides.get(job.source.name) if job.source.kind == "slide" else None
    return {
        "job": job,
        "result": job.result,
        "rows": [r for r in rows if _matches(r["entry"], chosen)],
        "n_rows": len(rows),
        "facets": _facets([r["entry"] for r in rows if r["entry"] is not None]),
        "chosen": chosen,
        "query_entry": query_entry,
        "info": index_info(service),
    }


def viewer_page(request: Request) -> Response:
    """Deep Zoom view of an indexed slide with its mosaic, its indexed tiles and a hit's matched tiles."""
    service = svc(request)
    entry = service.archive.slide(request.path_params["slide_id"])
    side = service.images.tile_side(entry)
    mosaic = service.archive.mosaic_coords(entry)
    data: dict[str, Any] = {
        "dzi": f"/dz/{quote(entry.slide_id, safe='')}.dzi",
        "offset": list(service.images.dzi(entry)[1]),
        "tile": side,
        "mosaic": [] if mosaic is None else mosaic.tolist(),
        "cellular": service.archive.indexed_coords(entry).tolist(),
        "matches": [],
    }
    job, hit = _viewer_matches(request, service, entry, data)
    context = {"entry": entry, "data": data, "job": job, "hit": hit, "info": index_info(service)}
    return render.page(request, "viewer.html", context)


def _viewer_matches(
    request: Request, service: Service, entry: SlideEntry, data: dict[str, Any]
) -> tuple[Job | None, dict[str, Any] | None]:
    """Add `?job=ID&hit=RANK` (and `&side=query` on the query slide) matched tiles to the viewer data."""
    params = request.query_params
    if not params.get("job"):
        return None, None
    job = service.job(params["job"])
    hits = job.result["results"] if job.result else []
    try:
        rank = int(params.get("hit", "1"))
    except ValueError:
        raise NotFound("hit must be a rank number") from None
    if not 1 <= rank <= len(hits):
        raise NotFound(f"query {job.id} has no hit {rank}")
    hit = hits[rank - 1]
    on_query = params.get("side") == "query"
    if on_query and not (job.source.kind == "slide" and job.source.name == entry.slide_id and job.tiles):
        raise NotFound(f"slide {entry.slide_id!r} is not the query of {job.id}")
    if not on_query and hit["slide_id"] != entry.slide_id:
        raise NotFound(f"hit {rank} of query {job.id} is not slide {entry.slide_id!r}")
    key = "query_xy" if on_query else "xy"
    data["matches"] = [
        {"xy": m[key], "n": i + 1, "distance": m["distance"]} for i, m in enumerate(hit["matches"])
    ]
    if on_query:
        data["tile"] = job.tiles.side
    return job, {"rank": rank, "side": "query" if on_query else "hit", **hit}


def index_info(service: Service) -> dict[str, Any]:
    """What the header and `GET /api/slides` say about the index."""
    m, g = service.manifest, service.archive.geometry
    return {
        "slides": m["counts"]["slides"],
        "tiles": m["counts"]["tiles"],
        "index_type": m["index"]["type"],
        "model": m["model"]["hash"][:12],
        "tile_px": g.px,
        "tile_um": g.um,
        "tile_mpp": g.mpp,
        "created": m.get("created"),
    }


# ---- pictures ---------------------------------------------------------------------------------------
def slide_thumbnail(request: Request) -> Response:
    service = svc(request)
    entry = service.archive.slide(request.path_params["slide_id"])
    return _image(service.images.thumbnail(service.archive.slide_file(entry), entry.mpp), "image/jpeg")


def slide_tile(request: Request) -> Response:
    service = svc(request)
    entry = service.archive.slide(request.path_params["slide_id"])
    return _image(service.images.tile_crop(entry, request.path_params["tile"]), "image/png")


def slide_dzi(request: Request) -> Response:
    service = svc(request)
    xml, _ = service.images.dzi(service.archive.slide(request.path_params["slide_id"]))
    return Response(xml, media_type="application/xml")


def slide_dz_tile(request: Request) -> Response:
    service, p = svc(request), request.path_params
    data = service.images.dz_tile(service.archive.slide(p["slide_id"]), p["level"], p["col"], p["row"])
    return _image(data, "image/jpeg")


def job_patch(request: Request) -> Response:
    job = svc(request).job(request.path_params["job_id"])
    if job.source.png is None:
        raise NotFound(f"query {job.id} is not a patch")
    return _image(job.source.png, "image/png")


def job_tile(request: Request) -> Response:
    service = svc(request)
    job = service.job(request.path_params["job_id"])
    return _image(service.query_crop(job, request.path_params["tile"]), "image/png")


def job_thumbnail(request: Request) -> Response:
    service = svc(request)
    job = service.job(request.path_params["job_id"])
    if job.source.path is None:
        raise NotFound(f"query {job.id} is not a slide")
    return _image(service.images.thumbnail(job.source.path, job.source.mpp), "image/jpeg")


# ---- JSON API ---------------------------------------------------------------------------------------
def api_slides(request: Request) -> Response:
    """The catalog: every indexed slide's ID, label, patient, site, project and tile counts."""
    service = svc(request)
    slides = [e.as_json() for e in service.archive.slides.values()]
    return JSONResponse({"index": index_info(service), "slides": slides})


async def api_search(request: Request) -> Response:
    """One query (JSON or multipart) answered with one query object of the `histo search --json` shape."""
    service = svc(request)
    job = service.jobs.submit(await _job_from(request))
    if not await run_in_threadpool(job.done.wait, API_WAIT_S):
        return JSONResponse(job.status(), status_code=202, headers={"location": f"/api/jobs/{job.id}"})
    if job.state == "failed":
        return JSONResponse({"error": job.error, "status": job.error_status, "job": job.id}, job.error_status)
    return JSONResponse(job.result, headers={"x-histo-job": job.id})


def api_job(request: Request) -> Response:
    """A query's state, and its result once done."""
    job = svc(request).job(request.path_params["job_id"])
    return JSONResponse({**job.status(), "result": job.result})


async def _job_from(request: Request) -> Job:
    """A checked Job from a JSON body or a (multipart or urlencoded) form."""
    service = svc(request)
    if request.headers.get("content-type", "").startswith("application/json"):
        try:
            fields = await request.json()
        except ValueError:
            raise HistoError("request body is not valid JSON") from None
        if not isinstance(fields, dict):
            raise HistoError("request body must be a JSON object")
        return service.new_job(fields, None)
    async with request.form(max_files=1, max_fields=20) as form:
        upload = form.get("image")
        image = None
        if isinstance(upload, UploadFile) and upload.filename:
            image = (await upload.read(), upload.filename, upload.content_type)
        fields = {k: v for k, v in form.items() if isinstance(v, str)}
        return service.new_job(fields, image)


# ---- errors -----------------------------------------------------------------------------------------
def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    return render.error(request, exc.status_code, str(exc.detail))


def _histo_error(request: Request, exc: Exception) -> Response:
    return render.error(request, getattr(exc, "status", 400), svc(request).public(str(exc)))


def _internal_error(request: Request, exc: Exception) -> Response:
    log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
    return render.error(request, 500, "internal error (the server log has the details)")


def _denied(request: Request) -> Response:
    if render.wants_json(request):
        return render.error(request, 401, "a token is required (Authorization: Bearer TOKEN)")
    return render.page(request, "token.html", {"status": 401, "path": request.url.path}, 401)


def create_app(config: ServeConfig, service: Service | None = None) -> Starlette:
    """The app for `config` (opening the index unless a `service` over it is given)."""
    from search.web.render import HERE

    service = service or Service(config)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        service.close()

    routes = [
        Route("/", archive_page),
        Route("/query", query_page, methods=["GET"]),
        Route("/query", submit_query, methods=["POST"]),
        Route("/jobs/{job_id}", job_page),
        Route("/jobs/{job_id}/query.png", job_patch),
        Route("/jobs/{job_id}/thumbnail.jpg", job_thumbnail),
        Route("/jobs/{job_id}/tiles/{tile:int}.png", job_tile),
        Route("/slides/{slide_id}", viewer_page),
        Route("/slides/{slide_id}/thumbnail.jpg", slide_thumbnail),
        Route("/slides/{slide_id}/tiles/{tile:int}.png", slide_tile),
        Route("/dz/{slide_id}.dzi", slide_dzi),
        Route("/dz/{slide_id}_files/{level:int}/{col:int}_{row:int}.jpeg", slide_dz_tile),
        Route("/api/slides", api_slides),
        Route("/api/search", api_search, methods=["POST"]),
        Route("/api/jobs/{job_id}", api_job),
        Mount("/static", StaticFiles(directory=str(HERE / "static")), name="static"),
    ]
    app = Starlette(
        routes=routes,
        middleware=[
            Middleware(SecurityHeaders),
            Middleware(TokenGate, token=config.token, denied=_denied),
            Middleware(BodyLimit, max_bytes=config.max_upload_bytes + FORM_OVERHEAD),
        ],
        exception_handlers={HTTPException: _http_error, HistoError: _histo_error, Exception: _internal_error},
        lifespan=lifespan,
    )
    app.state.service = service
    return app
