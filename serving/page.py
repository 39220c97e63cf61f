"""The browser page at ``GET /ui``: try the served model on your own images.

Three static files shipped in the package (``serving/static/``: HTML, CSS, JavaScript), served
by a small ASGI middleware in front of the service. The page is ``/ui`` itself (a 200, not a
redirect); its files are ``/ui/<name>``, which the page refers to relatively (``ui/page.js``),
and it calls the API relatively too (``model``, ``classify``), so it keeps working behind a
proxy that adds a path prefix. A Content-Security-Policy lets the browser load or send nothing
outside the server the page came from.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from importlib import resources
from typing import Any

from starlette.responses import Response

__all__ = ["PAGE_PATH", "PageMiddleware", "page_url"]

logger = logging.getLogger(__name__)

PAGE_PATH = "/ui"
PAGE_FILE = "index.html"
MEDIA_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
}
# Everything from this server only; images shown from the user's own files (blob:).
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
SECURITY_HEADERS = {
    "content-security-policy": CONTENT_SECURITY_POLICY,
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "cache-control": "no-cache",
}

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


def static_files() -> dict[str, bytes]:
    """``name -> content`` of every file the page is made of, read from the package."""
    folder = resources.files("serving") / "static"
    return {
        entry.name: entry.read_bytes()
        for entry in folder.iterdir()
        if entry.is_file() and "." + entry.name.rsplit(".", 1)[-1] in MEDIA_TYPES
    }


def json_error(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    body = json.dumps({"error": message})
    return Response(body, status_code=status, media_type="application/json", headers=headers)


class PageMiddleware:
    """Answers ``GET``/``HEAD`` under :data:`PAGE_PATH`; passes every other request on."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.files = static_files()
        if PAGE_FILE not in self.files:
            raise RuntimeError(f"serving/static/{PAGE_FILE} is missing from the package")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "") if scope["type"] == "http" else ""
        if path == PAGE_PATH or path.startswith(PAGE_PATH + "/"):
            await self.respond(scope)(scope, receive, send)
        else:
            await self.app(scope, receive, send)

    def respond(self, scope: Scope) -> Response:
        path = scope["path"]
        if scope["method"] not in ("GET", "HEAD"):
            return json_error(
                405, f"{scope['method']} not allowed on {path}: the page only answers GET", {"allow": "GET, HEAD"}
            )
        if path == PAGE_PATH + "/":  # relative links resolve against /ui, not /ui/
            return Response(status_code=308, headers={"location": scope.get("root_path", "") + PAGE_PATH})
        name = PAGE_FILE if path == PAGE_PATH else path[len(PAGE_PATH) + 1 :]
        content = self.files.get(name)
        if content is None:
            return json_error(404, f"no such file: {path}")
        media_type = MEDIA_TYPES["." + name.rsplit(".", 1)[-1]]
        response = Response(content, media_type=media_type, headers=SECURITY_HEADERS)
        if scope["method"] == "HEAD":
            response.body = b""  # the headers (content-length included) as for GET
        return response


def page_url(service_name: str) -> str:
    """The page's address as ``bentoml serve`` announces its own (``http://localhost:3000/ui``),
    or the bare path where the server address is not known (a service run in-process)."""
    try:
        from bentoml._internal.configuration.containers import BentoMLContainer

        base = BentoMLContainer.remote_runner_mapping.get().get(service_name)
    except Exception:  # an internal BentoML detail: never worth failing a start for
        base = None
    return f"{base.rstrip('/')}{PAGE_PATH}" if base else PAGE_PATH
