"""The request guard in process: each multipart body is parsed once, and BentoML's own reader
takes the guard's form (the service's real input models, BentoML's real multipart reader).

The answers of a running server to good and bad forms are in tests/test_service.py.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from starlette import formparsers
from starlette.requests import Request

from serving.guard import PARSED_FORM, RequestGuard

BOUNDARY = "guardboundary42"
PAYLOAD = bytes(range(256)) * 40  # 10 kB of file content, every byte value


def multipart_body(parts: list[tuple[str, str | None, bytes]]) -> bytes:
    body = b""
    for name, filename, value in parts:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        body += f"--{BOUNDARY}\r\nContent-Disposition: {disposition}\r\n\r\n".encode() + value + b"\r\n"
    return body + f"--{BOUNDARY}--\r\n".encode()


def http_scope(path: str, body: bytes) -> dict[str, Any]:
    headers = [
        (b"content-type", f"multipart/form-data; boundary={BOUNDARY}".encode()),
        (b"content-length", str(len(body)).encode()),
    ]
    return {"type": "http", "method": "POST", "path": path, "headers": headers, "query_string": b""}


class BentoEndpoint:
    """What BentoML's API endpoint does with a request: pick the reader for its content type
    from ``ALL_SERDE`` and parse the API's input model with it."""

    def __init__(self, api: str) -> None:
        from service import VGGClassifier

        self.input_spec = VGGClassifier.apis[api].input_spec
        self.parsed: Any = None
        self.uploads: list[bytes] = []
        self.saw_parsed_form = False

    async def __call__(self, scope, receive, send) -> None:
        from _bentoml_impl.serde import ALL_SERDE
        from bentoml._internal.context import ServiceContext

        self.saw_parsed_form = PARSED_FORM in scope
        reader = ALL_SERDE["multipart/form-data"]()
        request = Request(scope, receive)
        with ServiceContext().in_request(request):  # BentoML's per-request temp directory for uploads
            self.parsed = await self.input_spec.from_http_request(request, reader)
            uploads = getattr(self.parsed, "images", None) or [self.parsed.image]
            self.uploads = [Path(path).read_bytes() for path in uploads]  # before BentoML removes them
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})


async def call(app, scope: dict[str, Any], body: bytes) -> tuple[int, bytes]:
    messages = [
        {"type": "http.request", "body": body[:4000], "more_body": True},
        {"type": "http.request", "body": body[4000:], "more_body": False},
    ]

    async def receive():
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    sent: list[dict] = []

    async def send(message):
        sent.append(message)

    await app(scope, receive, send)
    return sent[0]["status"], b"".join(m.get("body", b"") for m in sent[1:])


@pytest.fixture
def parses(monkeypatch) -> list[int]:
    """Counts multipart parses (starlette's MultiPartParser, which BentoML and the guard use)."""
    calls: list[int] = []
    original = formparsers.MultiPartParser.parse

    async def counted(self):
        calls.append(1)
        return await original(self)

    monkeypatch.setattr(formparsers.MultiPartParser, "parse", counted)
    return calls


def endpoint(api: str, tmp_path: Path) -> BentoEndpoint:
    return BentoEndpoint(api)


def test_a_classify_body_is_parsed_once_and_bentoml_gets_the_guards_form(parses, tmp_path) -> None:
    app = endpoint("classify", tmp_path)
    guard = RequestGuard(app, paths={"/classify": "image", "/classify_batch": "images"})
    body = multipart_body([("image", "cat.jpg", PAYLOAD), ("top_k", None, b"3")])
    status, _ = asyncio.run(call(guard, http_scope("/classify", body), body))
    assert status == 200 and app.saw_parsed_form
    assert len(parses) == 1, f"the body was parsed {len(parses)} times"
    assert app.uploads == [PAYLOAD] and app.parsed.top_k == 3


def test_a_batch_body_is_parsed_once_and_keeps_every_file_in_order(parses, tmp_path) -> None:
    app = endpoint("classify_batch", tmp_path)
    guard = RequestGuard(app, paths={"/classify": "image", "/classify_batch": "images"})
    files = [PAYLOAD[index:] for index in range(3)]
    body = multipart_body([("images", f"{index}.png", data) for index, data in enumerate(files)])
    status, _ = asyncio.run(call(guard, http_scope("/classify_batch", body), body))
    assert status == 200 and len(parses) == 1
    assert app.uploads == files and app.parsed.top_k is None


def test_without_the_guard_bentoml_parses_the_body_itself(parses, tmp_path) -> None:
    app = endpoint("classify", tmp_path)
    RequestGuard(app, paths={"/classify": "image"})  # installs the reader, as in the server
    body = multipart_body([("image", "cat.jpg", PAYLOAD)])
    status, _ = asyncio.run(call(app, http_scope("/classify", body), body))
    assert status == 200 and not app.saw_parsed_form and len(parses) == 1
    assert app.uploads == [PAYLOAD]


def test_a_bad_form_is_answered_by_the_guard_after_one_parse(parses, tmp_path) -> None:
    app = endpoint("classify", tmp_path)
    guard = RequestGuard(app, paths={"/classify": "image"})
    body = multipart_body([("image", None, b"http://127.0.0.1:1/cat.jpg")])
    status, answer = asyncio.run(call(guard, http_scope("/classify", body), body))
    assert status == 400 and "must be a file upload" in json.loads(answer)["error"]
    assert len(parses) == 1 and app.parsed is None
