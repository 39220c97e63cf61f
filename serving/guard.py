"""ASGI middleware in front of the upload endpoints: content type, body size, form shape.

Checked before BentoML parses the request, so bad requests get a 4xx JSON answer instead of
reaching code that would fail with a 500 (a text field where a file belongs makes BentoML
try to download it as a URL):

- a body that is not ``multipart/form-data``: 415;
- a body over ``VGG_MAX_BODY_BYTES`` (declared or actually sent): 413;
- a malformed multipart body, a text value in the file field, a file or a non-integer in
  ``top_k``, a missing file field or an unknown field: 400 (BentoML would answer some of these with a 500).
"""

from __future__ import annotations

import json
import re
from typing import Any, Awaitable, Callable

from starlette.datastructures import Headers, UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException
from starlette.requests import Request

from serving.settings import Settings

__all__ = ["RequestGuard"]

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

TEXT_FIELDS = ("top_k",)
DRAIN_LIMIT = 256 * 1024 * 1024  # past this, answer 413 without reading the rest


class BodyTooLarge(Exception):
    pass


async def send_json(send: Send, status: int, payload: dict[str, Any]) -> None:
    body = json.dumps(payload).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def read_body(receive: Receive, *, limit: int) -> bytes:
    """The whole body; past ``limit`` keep draining (so the client can read our answer) and
    raise :class:`BodyTooLarge`."""
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        chunk = message.get("body", b"")
        size += len(chunk)
        if size <= limit:
            chunks.append(chunk)
        if not message.get("more_body", False) or size > DRAIN_LIMIT:
            break
    if size > limit:
        raise BodyTooLarge(size)
    return b"".join(chunks)


def replay(body: bytes) -> Receive:
    sent = False

    async def receive() -> Message:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return receive


def field_problem(key: str, value: str | UploadFile, *, file_field: str) -> str | None:
    if key == file_field:
        if not isinstance(value, UploadFile):
            return f"field {key!r} must be a file upload (curl -F {key}=@photo.jpg), not text"
    elif key in TEXT_FIELDS:
        if isinstance(value, UploadFile):
            return f"field {key!r} must be a plain value, not a file"
        if not re.fullmatch(r"\s*[+-]?\d{1,9}\s*", value):
            return f"{key} must be an integer, got {value[:40]!r}"
    else:
        return f"unknown field {key!r}: send {file_field!r} and optionally {', '.join(TEXT_FIELDS)}"
    return None


async def form_problem(scope: Scope, body: bytes, *, file_field: str) -> str | None:
    """Why the multipart body cannot be served, or None."""
    request = Request(scope, replay(body))
    try:
        form = await request.form()
    except MultiPartException as error:
        return f"malformed multipart body: {error.message}"
    except HTTPException as error:  # starlette's wrapping of MultiPartException
        return f"malformed multipart body: {error.detail}"
    except Exception as error:  # python-multipart's own parse errors
        return f"malformed multipart body: {type(error).__name__}"
    try:
        for key, value in form.multi_items():
            problem = field_problem(key, value, file_field=file_field)
            if problem is not None:
                return problem
        if file_field not in form:
            return f"no {file_field!r} field: send the image as a file (curl -F {file_field}=@photo.jpg)"
    finally:
        await form.close()
    return None


class RequestGuard:
    """Pure ASGI middleware guarding POSTs to ``paths`` (route -> name of its file field)."""

    def __init__(self, app: Callable[..., Awaitable[None]], *, paths: dict[str, str]) -> None:
        self.app = app
        self.paths = dict(paths)
        self.max_body_bytes = Settings.from_env().max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] not in self.paths:
            await self.app(scope, receive, send)
            return
        problem = self.header_problem(Headers(scope=scope))
        if problem is not None:
            status, message = problem
            await self.drain(receive)
            await send_json(send, status, {"error": message})
            return
        try:
            body = await read_body(receive, limit=self.max_body_bytes)
        except BodyTooLarge as error:
            await send_json(send, 413, {"error": self.too_large(int(str(error)))})
            return
        message = await form_problem(scope, body, file_field=self.paths[scope["path"]])
        if message is not None:
            await send_json(send, 400, {"error": message})
            return
        await self.app(scope, replay(body), send)

    def header_problem(self, headers: Headers) -> tuple[int, str] | None:
        content_type = headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type != "multipart/form-data":
            shown = content_type or "none"
            return 415, f"unsupported content type {shown}: send the image as multipart/form-data"
        length = headers.get("content-length")
        if length is not None:
            if not length.strip().isdigit():
                return 400, f"invalid Content-Length {length!r}"
            if int(length) > self.max_body_bytes:
                return 413, self.too_large(int(length))
        return None

    def too_large(self, size: int) -> str:
        return f"request body is {size} bytes, limit is {self.max_body_bytes} (VGG_MAX_BODY_BYTES)"

    async def drain(self, receive: Receive) -> None:
        try:
            await read_body(receive, limit=0)
        except BodyTooLarge:
            pass
