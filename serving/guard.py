"""ASGI middleware in front of the upload endpoints: content type, body size, form shape.

Checked before the request reaches BentoML, so bad requests get a 4xx JSON answer instead of
reaching code that would fail with a 500 (a text field where a file belongs makes BentoML
try to download it as a URL):

- a body that is not ``multipart/form-data``: 415;
- a body over ``VGG_MAX_BODY_BYTES`` (declared or actually sent): 413;
- a malformed multipart body, a text value in the file field, a file or a non-integer in
  ``top_k``, a missing file field or an unknown field: 400 (BentoML would answer some of these with a 500).

Each body is parsed once: the guard parses the form and hands it on in the ASGI scope
(:data:`PARSED_FORM`); :func:`hand_on_parsed_forms` makes BentoML's multipart reader take that
form instead of parsing the body again.
"""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.datastructures import FormData, Headers, UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException
from starlette.requests import Request

from serving.settings import Settings

__all__ = ["RequestGuard", "PARSED_FORM", "hand_on_parsed_forms"]

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

TEXT_FIELDS = ("top_k",)
PARSED_FORM = "vgg.parsed_form"  # scope key: the form the guard parsed, for BentoML to use as it is
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


class FormProblem(Exception):
    """The body is not a well-formed multipart form (one-line message)."""


async def parse_form(scope: Scope, body: bytes) -> FormData:
    """The multipart form of ``body``; raises :class:`FormProblem`."""
    request = Request(scope, replay(body))
    try:
        return await request.form()
    except MultiPartException as error:
        raise FormProblem(f"malformed multipart body: {error.message}") from None
    except HTTPException as error:  # starlette's wrapping of MultiPartException
        raise FormProblem(f"malformed multipart body: {error.detail}") from None
    except Exception as error:  # python-multipart's own parse errors
        raise FormProblem(f"malformed multipart body: {type(error).__name__}") from None


def form_problem(form: FormData, *, file_field: str) -> str | None:
    """Why the parsed form cannot be served, or None."""
    for key, value in form.multi_items():
        problem = field_problem(key, value, file_field=file_field)
        if problem is not None:
            return problem
    if file_field not in form:
        return f"no {file_field!r} field: send the image as a file (curl -F {file_field}=@photo.jpg)"
    return None


def hand_on_parsed_forms() -> None:
    """Make BentoML read a multipart request's form from :data:`PARSED_FORM` when the guard
    has put it there, instead of parsing the body a second time (idempotent; call it in the
    server worker). BentoML picks its request reader by content type, per request, from
    ``_bentoml_impl.serde.ALL_SERDE`` (bentoml is pinned; the service tests check this hook)."""
    from _bentoml_impl import serde

    class ParsedFormSerde(serde.MultipartSerde):
        async def parse_request(self, request: Request, cls: Any) -> Any:
            form = request.scope.get(PARSED_FORM)
            if form is not None:
                request._form = form  # what Request.form() returns instead of parsing the stream
            return await super().parse_request(request, cls)

    readers = serde.ALL_SERDE
    if getattr(readers.get(ParsedFormSerde.media_type), "hands_on_parsed_form", False):
        return
    ParsedFormSerde.hands_on_parsed_form = True  # type: ignore[attr-defined]
    readers[ParsedFormSerde.media_type] = ParsedFormSerde  # type: ignore[index]


class RequestGuard:
    """Pure ASGI middleware guarding POSTs to ``paths`` (route -> name of its file field)."""

    def __init__(self, app: Callable[..., Awaitable[None]], *, paths: dict[str, str]) -> None:
        self.app = app
        self.paths = dict(paths)
        self.max_body_bytes = Settings.from_env().max_body_bytes
        hand_on_parsed_forms()

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
        try:
            form = await parse_form(scope, body)
        except FormProblem as error:
            await send_json(send, 400, {"error": str(error)})
            return
        del body  # the form holds the data now (uploads in spooled files)
        try:
            message = form_problem(form, file_field=self.paths[scope["path"]])
            if message is not None:
                await send_json(send, 400, {"error": message})
                return
            await self.app({**scope, PARSED_FORM: form}, replay(b""), send)
        finally:
            await form.close()

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
