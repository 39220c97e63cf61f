"""The worker's caps in-process: budgets keep room for small requests; the request guard
refuses at once (503 + Retry-After) when the decode budget is held, and gives it back."""

from __future__ import annotations

import asyncio
import io
import struct

import pytest
from PIL import Image

from bench.abuse import gif_declaring
from serving.admission import Budget
from serving.guard import RequestGuard
from serving.images import ApiError
from serving.settings import Settings, SettingsError
from vgg.preprocessing import ImageTooLarge, header_pixels, open_rgb


def test_budget_keeps_a_share_for_small_requests():
    budget = Budget(800, setting="X", unit="units")
    assert budget.reserve == 100 and budget.largest_request() == 700
    assert budget.try_reserve(400) and budget.try_reserve(300)
    assert not budget.try_reserve(101)  # large: only up to 700
    assert budget.try_reserve(100)  # small: may use the kept share
    assert not budget.try_reserve(1)
    budget.release(400)
    assert not budget.try_reserve(400) and budget.try_reserve(300) and budget.in_use == 700


def test_budget_hold_refuses_with_retry_after_and_releases():
    budget = Budget(10, setting="VGG_MAX_X", unit="pixels", small_share=None)
    with budget.hold(10):
        with pytest.raises(ApiError) as error:
            with budget.hold(1):
                pass
    assert error.value.status == 503 and error.value.retry_after >= 1 and "VGG_MAX_X" in error.value.message
    assert budget.in_use == 0


@pytest.mark.parametrize(
    ("size", "reduce_for", "decoded"),
    [
        ((4000, 3000), 256, 1000 * 750),
        ((4000, 3000), 1024, 4000 * 3000),
        ((4000, 3000), None, 4000 * 3000),
        ((300, 200), 256, 300 * 200),
    ],
)
def test_header_pixels_of_jpeg_follow_the_draft(size, reduce_for, decoded):
    buffer = io.BytesIO()
    Image.new("RGB", size).save(buffer, "JPEG")
    assert header_pixels(buffer.getvalue(), reduce_for=reduce_for) == (size[0] * size[1], decoded)
    image = open_rgb(buffer.getvalue(), reduce_for=reduce_for)
    assert image.size[0] * image.size[1] == decoded


def test_header_pixels_count_declared_not_sent():
    data = gif_declaring(7000, 7000)
    assert len(data) < 100 and header_pixels(data) == (49_000_000, 49_000_000)
    assert header_pixels(b"not an image") == (0, 0)


def test_bomb_beyond_pillows_limit_quotes_our_limit():
    import zlib

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    png = (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", 30000, 30000, 8, 0, 0, 0, 0))
        + chunk(b"IEND", b"")
    )
    with pytest.raises(ImageTooLarge) as error:
        open_rgb(png, max_pixels=1234)
    assert str(error.value) == "image is 900000000 pixels, limit is 1234"


def multipart(images: list[bytes]) -> tuple[bytes, bytes]:
    boundary = b"t3stb0undary"
    parts = b"".join(
        b"--" + boundary + b'\r\nContent-Disposition: form-data; name="images"; filename="a.gif"\r\n'
        b"Content-Type: image/gif\r\n\r\n" + data + b"\r\n"
        for data in images
    )
    return parts + b"--" + boundary + b"--\r\n", b"multipart/form-data; boundary=" + boundary


def run_guarded(guard: RequestGuard, body: bytes, content_type: bytes) -> dict:
    scope = {
        "type": "http",
        "method": "POST",
        "path": "/classify_batch",
        "headers": [(b"content-type", content_type), (b"content-length", str(len(body)).encode())],
    }
    sent, delivered = {}, False

    async def receive():
        nonlocal delivered
        if delivered:
            await asyncio.sleep(3600)
        delivered = True
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message):
        if message["type"] == "http.response.start":
            sent["status"], sent["headers"] = message["status"], dict(message["headers"])
        else:
            sent["body"] = message.get("body", b"")

    async def call():
        await guard(scope, receive, send)

    return sent, call


def test_guard_refuses_at_once_while_the_decode_budget_is_held(monkeypatch):
    monkeypatch.setenv("VGG_MAX_PIXELS", "4000000")
    monkeypatch.setenv("VGG_MAX_REQUEST_PIXELS", "8000000")
    monkeypatch.setenv("VGG_MAX_DECODE_PIXELS", "10000000")
    inside, release = asyncio.Event(), asyncio.Event()

    async def app(scope, receive, send):
        inside.set()
        await release.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    async def scenario():
        guard = RequestGuard(app, paths={"/classify_batch": "images"}, batch_paths=("/classify_batch",))
        large_body, content_type = multipart([gif_declaring(2000, 2000)] * 2)  # 8 Mpx: "large" (> 1.25 Mpx)
        first, run_first = run_guarded(guard, large_body, content_type)
        task = asyncio.create_task(run_first())
        await inside.wait()
        second, run_second = run_guarded(guard, large_body, content_type)
        await asyncio.wait_for(run_second(), 5)
        small_body, _ = multipart([gif_declaring(1000, 1000)])  # 1 Mpx: within the share kept for small ones
        third, run_third = run_guarded(guard, small_body, content_type)
        inside.clear()
        third_task = asyncio.create_task(run_third())
        await asyncio.wait_for(inside.wait(), 5)
        release.set()
        await asyncio.gather(task, third_task)
        return first, second, third, guard

    first, second, third, guard = asyncio.run(scenario())
    assert second["status"] == 503 and b"VGG_MAX_DECODE_PIXELS" in second["body"]
    assert second["headers"][b"retry-after"] == b"1"
    assert first["status"] == 200 and third["status"] == 200
    assert guard.decoding.in_use == 0 and guard.buffered.in_use == 0


def test_settings_nest_and_stay_in_bounds(monkeypatch):
    assert Settings.from_env().max_request_pixels <= Settings.from_env().max_decode_pixels
    monkeypatch.setenv("VGG_MAX_IMAGES_PER_REQUEST", "100")
    monkeypatch.setenv("VGG_MAX_QUEUED_IMAGES", "50")
    with pytest.raises(SettingsError, match="VGG_MAX_IMAGES_PER_REQUEST=100 is larger than VGG_MAX_QUEUED_IMAGES=50"):
        Settings.from_env()


@pytest.mark.parametrize("declared", [True, False], ids=["content-length", "chunked"])
def test_a_stalled_body_gives_its_buffered_bytes_back(monkeypatch, declared):
    monkeypatch.setenv("VGG_BODY_TIMEOUT_S", "1")
    monkeypatch.setenv("VGG_MAX_BUFFERED_BYTES", "30000000")
    sent, chunks = {}, iter([b"--x\r\n" + b"a" * 50_000, b"b" * 50_000])

    async def receive():
        chunk = next(chunks, None)
        if chunk is None:
            await asyncio.sleep(3600)  # stalls
        return {"type": "http.request", "body": chunk, "more_body": True}

    async def send(message):
        if message["type"] == "http.response.start":
            sent["status"] = message["status"]

    async def app(scope, receive, send):  # never reached
        raise AssertionError("a stalled body reached the app")

    headers = [(b"content-type", b"multipart/form-data; boundary=x")]
    if declared:
        headers.append((b"content-length", b"900000"))
    guard = RequestGuard(app, paths={"/classify": "image"})
    scope = {"type": "http", "method": "POST", "path": "/classify", "headers": headers}
    asyncio.run(asyncio.wait_for(guard(scope, receive, send), 10))
    assert sent["status"] == 408
    assert guard.buffered.in_use == 0 and guard.buffered.peak >= 100_000
