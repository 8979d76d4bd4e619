"""Request gates for a server on a hospital network: the access token, the body limit, safe headers.

All three are plain ASGI middleware, so they run before routing and hold for every request, the static
files and the Deep Zoom tiles included.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any
from urllib.parse import parse_qsl, urlencode

from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import RedirectResponse

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

COOKIE = "histo_token"  # + "_PORT": browsers share cookies across ports, servers do not share tokens
HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
    (b"cache-control", b"no-cache"),  # pictures set their own max-age
    (
        b"content-security-policy",
        b"default-src 'self'; img-src 'self' data: blob:; style-src 'self' 'unsafe-inline'; "
        b"script-src 'self'; frame-ancestors 'none'; form-action 'self'",
    ),
]


def _same(given: str | None, token: str) -> bool:
    return given is not None and hmac.compare_digest(given.encode(), token.encode())


class TokenGate:
    """With a token set, every request must carry it: `Authorization: Bearer TOKEN`, the cookie the page
    sets, or `?token=TOKEN` once (a GET then redirects to the same URL without it and sets the cookie)."""

    def __init__(self, app: ASGIApp, token: str | None, denied: Callable[[Request], Any]) -> None:
        self.app, self.token, self.denied = app, token, denied

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.token:
            return await self.app(scope, receive, send)
        request = Request(scope)
        cookie = f"{COOKIE}_{(scope.get('server') or ('', 0))[1]}"
        auth = request.headers.get("authorization", "")
        bearer = auth[7:] if auth.lower().startswith("bearer ") else None
        if _same(bearer, self.token) or _same(request.cookies.get(cookie), self.token):
            return await self.app(scope, receive, send)
        if _same(request.query_params.get("token"), self.token):
            if request.method != "GET":
                return await self.app(scope, receive, send)
            rest = [(k, v) for k, v in parse_qsl(scope.get("query_string", b"").decode()) if k != "token"]
            target = request.url.path + (f"?{urlencode(rest)}" if rest else "")
            response = RedirectResponse(target, status_code=303)
            response.set_cookie(cookie, self.token, httponly=True, samesite="strict")
            return await response(scope, receive, send)
        return await self.denied(request)(scope, receive, send)


class BodyLimit:
    """Refuse request bodies over `max_bytes` with 413, from Content-Length or while they arrive."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_large = HTTPException(413, f"request body over the {self.max_bytes:,} bytes allowed")
        length = Headers(scope=scope).get("content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            scope["histo.reject"] = too_large
        seen = 0

        async def limited() -> MutableMapping[str, Any]:
            nonlocal seen
            if "histo.reject" in scope:
                raise scope["histo.reject"]
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                raise too_large
            return message

        await self.app(scope, limited, send)


class SecurityHeaders:
    """Add no-sniff, no-referrer, no-framing and a same-origin content security policy to every answer."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def with_headers(message: MutableMapping[str, Any]) -> None:
            if message["type"] == "http.response.start":
                names = {k.lower() for k, _ in message.get("headers", [])}
                message["headers"] = list(message.get("headers", [])) + [
                    (k, v) for k, v in HEADERS if k not in names
                ]
            await send(message)

        await self.app(scope, receive, with_headers)
