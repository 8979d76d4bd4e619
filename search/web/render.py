"""Server-rendered pages (Jinja2, autoescaped) and the one shape of an error: a page or a JSON object.

Each label of the archive gets its own colour (hues spread by the golden angle over the sorted labels),
so a pathologist sees at a glance which hits agree with the query and with each other.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import quote

from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.templating import Jinja2Templates

HERE = Path(__file__).resolve().parent
TEMPLATES = Jinja2Templates(directory=str(HERE / "templates"))
TEMPLATES.env.filters["q"] = lambda s: quote(str(s), safe="")
TEMPLATES.env.filters["dist"] = lambda d: "–" if d is None else f"{d:.4g}"


GOLDEN_ANGLE = 137.508


def label_hues(labels: list[str | None]) -> dict[str, int]:
    """{label: hue}: distinct, stable for a given archive."""
    return {
        label: round(210 + i * GOLDEN_ANGLE) % 360 for i, label in enumerate(sorted({x for x in labels if x}))
    }


def page(request: Request, name: str, context: dict[str, Any], status: int = 200) -> HTMLResponse:
    """A template rendered with the request, the archive's label colours and `context`."""
    service = getattr(request.app.state, "service", None)
    hues = service.hues if service is not None else {}
    return TEMPLATES.TemplateResponse(request, name, {"hues": hues, **context}, status_code=status)


def wants_json(request: Request) -> bool:
    """API paths and clients that ask for JSON get JSON errors; browsers get a page."""
    accept = request.headers.get("accept", "")
    return request.url.path.startswith("/api/") or (
        "application/json" in accept and "text/html" not in accept
    )


def error(request: Request, status: int, message: str) -> Response:
    """An error as `{"error": message}` or as the error page; never a traceback."""
    if wants_json(request):
        return JSONResponse({"error": message, "status": status}, status_code=status)
    return page(request, "error.html", {"status": status, "message": message}, status)
