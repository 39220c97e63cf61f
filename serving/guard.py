"""ASGI middleware in front of the upload endpoints: content type, body size, form shape, and
the worker's caps on buffered bytes and decoded pixels.

Checked before the request reaches BentoML, so bad requests get a 4xx JSON answer instead of
reaching code that would fail with a 500 or a validation error of BentoML's own:

- a body that is not ``multipart/form-data`` (media types compared case-insensitively, RFC
  9110; the header is handed on in lower case): 415;
- a body over ``VGG_MAX_BODY_BYTES`` (declared or actually sent): 413; with
  ``Expect: 100-continue`` the 413 is sent without ``100 Continue``, before any byte is read;
- bodies buffered at once over ``VGG_MAX_BUFFERED_BYTES``: 503 with ``Retry-After``;
- a body not received in full within ``VGG_BODY_TIMEOUT_S``: 408 and the connection is closed;
- a malformed multipart body, a text value in the file field, a file or a value other than
  ASCII digits in ``top_k``, a control character in a file name, a missing file field or an
  unknown field: 400;
- an image declaring more than ``VGG_MAX_PIXELS`` pixels, or a request whose images decode to
  more than ``VGG_MAX_REQUEST_PIXELS`` (declared sizes, read from the headers: a 40-byte GIF that
  declares 7000x7000 counts as 49 Mpixels; a JPEG as the reduced size it will be decoded at):
  413; more than ``VGG_MAX_DECODE_PIXELS`` being decoded by the worker at once: 503 with
  ``Retry-After``.

Each body is parsed once: the guard parses the form and hands it on in the ASGI scope
(:data:`PARSED_FORM`); :func:`hand_on_parsed_forms` makes BentoML's multipart reader take that
form instead of parsing the body again.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.datastructures import FormData, Headers, UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException
from starlette.requests import Request

from serving.admission import Budget
from serving.images import ApiError
from serving.memory import trim
from serving.settings import Settings
from vgg.preprocessing import header_pixels

__all__ = ["RequestGuard", "PARSED_FORM", "hand_on_parsed_forms"]

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

TEXT_FIELDS = ("top_k",)
MEDIA_TYPE = "multipart/form-data"
TRIM_AFTER_PIXELS = 16_000_000  # after a request decoding this many pixels, return freed memory
CONTROL_CHARACTERS = re.compile(r"[\x00-\x1f\x7f]")
PARSED_FORM = "vgg.parsed_form"  # scope key: the form the guard parsed, for BentoML to use as it is
DRAIN_LIMIT = 256 * 1024 * 1024  # past this, answer 413 without reading the rest


class BodyTooLarge(Exception):
    """The body is over the limit: ``args = (size,)``."""


async def send_json(
    send: Send, status: int, payload: dict[str, Any], *, retry_after: int | None = None, close: bool = False
) -> None:
    body = json.dumps(payload).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if retry_after is not None:
        headers.append((b"retry-after", str(retry_after).encode()))
    if close:  # the rest of the body is not read: the connection cannot be reused
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def send_error(send: Send, error: ApiError, *, close: bool = False) -> None:
    await send_json(send, error.status, {"error": error.message}, retry_after=error.retry_after, close=close)


class Reservation:
    """Bytes of one body reserved from the buffered-bytes budget so far."""

    def __init__(self, budget: Budget | None, amount: int = 0) -> None:
        self.budget, self.amount = budget, amount

    def grow_to(self, size: int) -> None:
        """Reserve up to ``size`` bytes, or raise the budget's 503 :class:`ApiError`."""
        if self.budget is None or size <= self.amount:
            return
        if not self.budget.try_reserve(size - self.amount):
            raise self.budget.refusal(size)
        self.amount = size

    def release(self) -> None:
        if self.budget is not None:
            self.budget.release(self.amount)
        self.amount = 0


async def read_body(receive: Receive, *, limit: int, reservation: Reservation | None = None) -> bytes:
    """The whole body. Past ``limit``, keep draining (so the client can read our answer) and
    raise :class:`BodyTooLarge`. ``reservation`` grows with the bytes kept (a body without
    Content-Length); the caller releases it."""
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        chunk = message.get("body", b"")
        size += len(chunk)
        if size <= limit:
            if reservation is not None:
                reservation.grow_to(size)
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
        if CONTROL_CHARACTERS.search(value.filename or ""):
            return f"field {key!r}: the file name contains a control character; rename the file"
    elif key in TEXT_FIELDS:
        if isinstance(value, UploadFile):
            return f"field {key!r} must be a plain value, not a file"
        if not re.fullmatch(r"[ \t]*[+-]?[0-9]{1,9}[ \t]*", value):
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
    """Pure ASGI middleware guarding POSTs to ``paths`` (route -> name of its file field).

    ``batch_paths``: routes taking several files, whose errors name the image's position;
    ``test_scale``: returns the served model's test scale Q once it is loaded (None before), for the
    JPEG draft sizes the decode cap counts."""

    def __init__(
        self,
        app: Callable[..., Awaitable[None]],
        *,
        paths: dict[str, str],
        batch_paths: tuple[str, ...] = (),
        test_scale: Callable[[], int | None] = lambda: None,
    ) -> None:
        self.app = app
        self.paths = dict(paths)
        self.batch_paths = frozenset(batch_paths)  # errors name the image's position: images[3]
        self.test_scale = test_scale
        self.settings = Settings.from_env()
        self.max_body_bytes = self.settings.max_body_bytes
        self.buffered = Budget(self.settings.max_buffered_bytes, setting="VGG_MAX_BUFFERED_BYTES", unit="bytes")
        self.decoding = Budget(self.settings.max_decode_pixels, setting="VGG_MAX_DECODE_PIXELS", unit="pixels")
        hand_on_parsed_forms()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] not in self.paths:
            await self.app(scope, receive, send)
            return
        scope = with_lower_case_media_type(scope)
        headers = Headers(scope=scope)
        problem = self.header_problem(headers)
        if problem is not None:
            status, message = problem
            expects_continue = headers.get("expect", "").strip().lower() == "100-continue"
            if not expects_continue:  # never ask for a body we refuse
                await self.drain(receive)
            await send_json(send, status, {"error": message}, close=expects_continue)
            return
        try:
            form = await self.receive_form(scope, receive, headers)
        except ApiError as error:
            await send_error(send, error, close=error.status in (408, 503))
            return
        try:
            message = form_problem(form, file_field=self.paths[scope["path"]])
            if message is not None:
                await send_json(send, 400, {"error": message})
                return
            await self.pass_on(scope, form, send)
        finally:
            await form.close()

    async def receive_form(self, scope: Scope, receive: Receive, headers: Headers) -> FormData:
        """Read (within the body timeout, holding buffered-bytes budget) and parse the body."""
        reservation = Reservation(self.buffered)
        try:
            reservation.grow_to(int(headers["content-length"]) if "content-length" in headers else 0)
            async with asyncio.timeout(self.settings.body_timeout_s):
                body = await read_body(receive, limit=self.max_body_bytes, reservation=reservation)
            return await parse_form(scope, body)
        except TimeoutError:
            raise ApiError(
                408, f"request body not received within {self.settings.body_timeout_s:g} s (VGG_BODY_TIMEOUT_S)"
            ) from None
        except BodyTooLarge as error:
            raise ApiError(413, self.too_large(error.args[0])) from None
        except FormProblem as error:
            raise ApiError(400, str(error)) from None
        finally:
            reservation.release()  # the form's uploads are in spooled files now

    async def pass_on(self, scope: Scope, form: FormData, send: Send) -> None:
        """Check the declared pixels of the uploads, hold them in the decode budget while
        BentoML and the service handle the request."""
        uploads = [value for value in form.getlist(self.paths[scope["path"]]) if isinstance(value, UploadFile)]
        try:
            pixels = await asyncio.to_thread(declared_pixels, uploads, test_scale=self.test_scale())
            total = self.check_pixels(
                pixels, field=self.paths[scope["path"]] if scope["path"] in self.batch_paths else None
            )
            with self.decoding.hold(total):
                await self.app({**scope, PARSED_FORM: form}, replay(b""), send)
        except ApiError as error:
            await send_error(send, error)
            return
        if total >= TRIM_AFTER_PIXELS and self.decoding.in_use == 0:
            await asyncio.to_thread(trim)  # the burst of large images is over: give the memory back

    def check_pixels(self, pixels: list[tuple[int, int]], *, field: str | None) -> int:
        """The request's decoded pixels; a 413 :class:`ApiError` past the per-image (declared
        size) or the per-request (decoded size) cap."""
        limit = self.settings.max_pixels
        for position, (declared, _) in enumerate(pixels):
            if declared > limit:
                where = f"{field}[{position}]: " if field else ""
                raise ApiError(
                    413, f"{where}image too large: image is {declared} pixels, limit is {limit} (VGG_MAX_PIXELS)"
                )
        total = sum(decoded for _, decoded in pixels)
        if total > self.settings.max_request_pixels:
            raise ApiError(
                413,
                f"the images of this request decode to {total} pixels, limit is "
                f"{self.settings.max_request_pixels} (VGG_MAX_REQUEST_PIXELS): send fewer per request",
            )
        return total

    def header_problem(self, headers: Headers) -> tuple[int, str] | None:
        content_type = media_type(headers)
        if content_type != MEDIA_TYPE:
            shown = content_type or "none"
            return 415, f"unsupported content type {shown}: send the image as multipart/form-data"
        length = headers.get("content-length")
        if length is not None:
            if not re.fullmatch(r"[0-9]{1,18}", length.strip()):
                return 400, f"invalid Content-Length {length[:40]!r}"
            if int(length) > self.max_body_bytes:
                return 413, self.too_large(int(length))
        return None

    def too_large(self, size: int) -> str:
        return f"request body is {size} bytes, limit is {self.max_body_bytes} (VGG_MAX_BODY_BYTES)"

    async def drain(self, receive: Receive) -> None:
        """Read and drop the body (bounded in time), so the client can read the answer."""
        with contextlib.suppress(BodyTooLarge, TimeoutError):
            async with asyncio.timeout(self.settings.body_timeout_s):
                await read_body(receive, limit=0)


def media_type(headers: Headers) -> str:
    return headers.get("content-type", "").split(";")[0].strip().lower()


def with_lower_case_media_type(scope: Scope) -> Scope:
    """``scope`` whose Content-Type has its media type in lower case (parameters such as the
    boundary unchanged): media types are case-insensitive (RFC 9110), BentoML's reader is not."""
    headers = []
    for name, value in scope["headers"]:
        if name.lower() == b"content-type":
            kind, separator, parameters = value.partition(b";")
            value = kind.strip().lower() + separator + parameters
        headers.append((name, value))
    return {**scope, "headers": headers}


def declared_pixels(uploads: list[UploadFile], *, test_scale: int | None) -> list[tuple[int, int]]:
    """``(declared, decoded)`` pixels of each upload, from its header (see
    :func:`vgg.preprocessing.header_pixels`)."""
    counts = []
    for upload in uploads:
        upload.file.seek(0)
        counts.append(header_pixels(upload.file, reduce_for=test_scale))
        upload.file.seek(0)
    return counts
