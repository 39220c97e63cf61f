"""Reliability of ``bentoml serve`` against hostile or broken input: start-up never loops, every
cap holds, every edge answer is ours. Each case runs against a real server (a subprocess on
a loopback port) with a tiny exported VGG-A, and each attack comes with variants (another
format, another size, another setting).
"""

from __future__ import annotations

import io
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import time
import uuid
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from bench.abuse import gif_declaring
from bench.launch import REPO_ROOT, bentoml_serve_command, free_port, running_server
from tests.export_helpers import peaky_model, write_checkpoint
from tests.helpers import repo_env, run_module

pytestmark = pytest.mark.slow

CLASSES = [f"class_{index}" for index in range(4)]
LIMITS = {
    "VGG_MAX_BATCH_SIZE": "4",
    "VGG_MAX_LATENCY_MS": "100",  # far below a cold first call: warm-up must not fail on it
    "VGG_MAX_BODY_BYTES": "1000000",
    "VGG_MAX_BUFFERED_BYTES": "3000000",  # 2.625 MB for large bodies, the last 1/8 for small ones
    "VGG_BODY_TIMEOUT_S": "2",
    "VGG_MAX_PIXELS": "4000000",
    "VGG_MAX_REQUEST_PIXELS": "8000000",
    "VGG_MAX_DECODE_PIXELS": "16000000",
    "VGG_MAX_IMAGES_PER_REQUEST": "8",
    "VGG_MAX_QUEUED_IMAGES": "16",
}


# ---------------------------------------------------------------- files


def png_of(width: int, height: int) -> bytes:
    """A real, tiny (all zero, deflated) PNG of ``width x height``."""
    buffer = io.BytesIO()
    Image.new("L", (width, height)).save(buffer, "PNG")
    return buffer.getvalue()


def png_header_declaring(width: int, height: int) -> bytes:
    """A PNG whose IHDR declares ``width x height`` and whose pixel data is empty."""
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def small_jpeg(seed: int = 0) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(40, 50, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG")
    return buffer.getvalue()


# ---------------------------------------------------------------- fixtures


def base_env(home: Path, **variables: str) -> dict[str, str]:
    return repo_env(BENTOML_HOME=str(home), **variables)


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("reliability")
    checkpoint = write_checkpoint(root / "best.pt", peaky_model(num_classes=len(CLASSES)), classes=CLASSES)
    home = root / "bentoml"
    result = run_module("export", "--checkpoint", str(checkpoint), "--tta", "center", env=base_env(home))
    assert result.returncode == 0, result.stderr[-2000:]
    return {"root": root, "home": home}


@pytest.fixture(scope="module")
def server(exported) -> dict:
    # A home of its own: every `bentoml serve` empties its home's Prometheus directory at start.
    home = exported["root"] / "server-home"
    shutil.copytree(exported["home"], home, symlinks=True)
    port = free_port()
    log_path = exported["root"] / "server.log"
    with running_server(bentoml_serve_command(port), port=port, env=base_env(home, **LIMITS), log_path=log_path) as (
        url,
        process,
    ):
        with httpx.Client(base_url=url, timeout=30.0) as client:
            yield {"url": url, "port": port, "process": process, "client": client, "log": log_path}


def classify(server: dict, data: bytes, *, name: str = "photo.jpg", **fields: str) -> httpx.Response:
    return server["client"].post("/classify", files={"image": (name, data)}, data=fields)


def classify_batch(server: dict, images: list[bytes], *, name: str = "image.gif") -> httpx.Response:
    return server["client"].post("/classify_batch", files=[("images", (name, data)) for data in images])


def assert_our_error(response: httpx.Response, status: int, *words: str) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and isinstance(body["error"], str) and "\n" not in body["error"], body
    for word in words:
        assert word in body["error"], body
    return body


def assert_no_traceback(server: dict) -> None:
    log = server["log"].read_text(errors="replace")
    assert "Traceback" not in log, log[-3000:]


def raw_request(port: int, head: str, body: bytes = b"", *, timeout: float = 10.0) -> bytes:
    """Send ``head`` (and ``body``) on a fresh connection; return everything the server sends
    until it closes or ``timeout``."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as connection:
        connection.sendall(head.encode() + body)
        received = b""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                chunk = connection.recv(65536)
            except TimeoutError:
                break
            if not chunk:
                break
            received += chunk
            if b"\r\n\r\n" in received and received.startswith(b"HTTP/1.1 4") or received.startswith(b"HTTP/1.1 5"):
                time.sleep(0.2)  # the body follows the head at once
                with_rest = connection.recv(65536) if connection else b""
                return received + with_rest
    return received


def multipart_head(port: int, *, length: int, boundary: str = "b0undary", extra: str = "") -> str:
    return (
        f"POST /classify HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Content-Type: multipart/form-data; boundary={boundary}\r\nContent-Length: {length}\r\n{extra}\r\n"
    )


# ---------------------------------------------------------------- start-up


def test_warm_up_cannot_fail_on_a_low_latency_budget(server) -> None:
    """The module's server runs with VGG_MAX_LATENCY_MS=100: it is ready, answers, and its
    worker never restarted."""
    response = classify(server, small_jpeg())
    assert response.status_code == 200, response.text
    log = server["log"].read_text(errors="replace")
    assert len(re.findall(r"warmed up on batch sizes", log)) == 1, log[-3000:]
    assert_no_traceback(server)


@pytest.mark.parametrize(
    "variables",
    [
        {"VGG_MAX_LATENCY_MS": "1", "VGG_MAX_BATCH_SIZE": "16"},
        {"VGG_MAX_LATENCY_MS": "5", "VGG_WORKERS": "2"},
    ],
    ids=["1ms", "5ms-two-workers"],
)
def test_tiny_latency_budgets_still_start(exported, tmp_path, variables) -> None:
    port = free_port()
    with running_server(
        bentoml_serve_command(port),
        port=port,
        env=base_env(exported["home"], **variables),
        log_path=tmp_path / "server.log",
        timeout_s=180,
    ) as (url, _):
        assert httpx.get(f"{url}/readyz", timeout=10).status_code == 200
    log = (tmp_path / "server.log").read_text(errors="replace")
    assert "Traceback" not in log, log[-3000:]


def start_failure(home: Path, **variables: str) -> tuple[subprocess.CompletedProcess, float]:
    started = time.monotonic()
    result = subprocess.run(
        bentoml_serve_command(free_port()),
        cwd=REPO_ROOT,
        env=base_env(home, **variables),
        capture_output=True,
        text=True,
        timeout=180,
    )
    return result, time.monotonic() - started


def assert_stops_once_with_one_line(result: subprocess.CompletedProcess, *words: str) -> None:
    assert result.returncode != 0
    lines = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    assert len(lines) == 1, lines[-20:]
    assert "Traceback" not in lines[0]
    for word in words:
        assert word in lines[0], lines[0]


@pytest.mark.parametrize(
    ("variables", "words"),
    [
        ({"VGG_MAX_BATCH_SIZE": "100000"}, ("VGG_MAX_BATCH_SIZE=100000 must be between 2 and 256",)),
        ({"VGG_MAX_IMAGES_PER_REQUEST": "0"}, ("VGG_MAX_IMAGES_PER_REQUEST=0 must be between",)),
        ({"VGG_MAX_PIXELS": "300000000"}, ("VGG_MAX_PIXELS=300000000 must be between",)),
        ({"VGG_BODY_TIMEOUT_S": "nan"}, ("VGG_BODY_TIMEOUT_S",)),
        ({"VGG_WORKERS": "1000"}, ("VGG_WORKERS=1000",)),
        ({"VGG_PRECISION": "fp8"}, ("VGG_PRECISION",)),
        ({"VGG_REQUIRE_GPU": "maybe"}, ("VGG_REQUIRE_GPU",)),
        (
            {"VGG_MAX_REQUEST_PIXELS": "900000000"},
            ("VGG_MAX_REQUEST_PIXELS=900000000 is larger than VGG_MAX_DECODE_PIXELS",),
        ),
        ({"VGG_MAX_BODY_BYTES": "200000000", "VGG_MAX_BUFFERED_BYTES": "100000000"}, ("VGG_MAX_BODY_BYTES",)),
    ],
    ids=["batch", "images", "pixels", "timeout", "workers", "precision", "gpu-flag", "nesting-pixels", "nesting-bytes"],
)
def test_bad_setting_stops_the_server_once_in_one_line(exported, variables, words) -> None:
    result, _ = start_failure(exported["home"], **variables)
    assert_stops_once_with_one_line(result, "vgg service cannot start", *words)


def corrupt_copy(exported: dict, tmp_path: Path, corrupt) -> Path:
    home = tmp_path / "bentoml"
    shutil.copytree(exported["home"], home, symlinks=True)
    (entry,) = [path for path in (home / "models" / "vgg").iterdir() if path.is_dir()]
    corrupt(entry)
    return home


CORRUPTIONS = {
    "onnx-junk": (lambda entry: (entry / "model.onnx").write_bytes(b"\x08\x07junk" * 100), "model.onnx"),
    "onnx-truncated": (
        lambda entry: (entry / "model.onnx").write_bytes((entry / "model.onnx").read_bytes()[:5000]),
        "model.onnx",
    ),
    "classes-not-json": (lambda entry: (entry / "classes.json").write_text("{oops"), "classes.json is not valid JSON"),
    "classes-not-names": (lambda entry: (entry / "classes.json").write_text("[1, 2, 3, 4]"), "classes.json"),
    "classes-too-few": (lambda entry: (entry / "classes.json").write_text('["a", "b"]'), "2 labels for 4 classes"),
    "model-yaml-garbage": (lambda entry: (entry / "model.yaml").write_text("name: [unclosed\n  - :"), "unreadable"),
    "model-yaml-empty": (lambda entry: (entry / "model.yaml").write_text(""), "vgg"),
}


@pytest.mark.parametrize("case", sorted(CORRUPTIONS))
def test_corrupt_store_entry_stops_the_server_once_in_one_line(exported, tmp_path, case) -> None:
    corrupt, words = CORRUPTIONS[case]
    home = corrupt_copy(exported, tmp_path, corrupt)
    result, seconds = start_failure(home)
    assert_stops_once_with_one_line(result, "vgg service cannot start", words)
    assert seconds < 120


def test_livez_answers_during_a_long_warm_up_and_sigterm_ends_it(exported, tmp_path) -> None:
    """The largest batch allowed on a model at Q = 256: warm-up takes minutes on a CPU. The
    server accepts connections meanwhile (/livez 200, /readyz and the APIs 503 with
    Retry-After), and SIGTERM stops it promptly."""
    root = tmp_path / "big"
    checkpoint = write_checkpoint(root / "best.pt", peaky_model(num_classes=len(CLASSES)), classes=CLASSES)
    home = root / "bentoml"
    export = run_module(
        "export", "--checkpoint", str(checkpoint), "--tta", "center", "--scale", "256", env=base_env(home), timeout=600
    )
    assert export.returncode == 0, export.stderr[-2000:]
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(tmp_path / "server.log", "wb")
    process = subprocess.Popen(
        bentoml_serve_command(port),
        cwd=REPO_ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
        env=base_env(home, VGG_MAX_BATCH_SIZE="256"),
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 120
        live = None
        while time.monotonic() < deadline and process.poll() is None:
            try:
                live = httpx.get(f"{url}/livez", timeout=5)
                break
            except httpx.HTTPError:
                time.sleep(0.25)
        assert live is not None and live.status_code == 200, (tmp_path / "server.log").read_text()[-3000:]
        assert httpx.get(f"{url}/readyz", timeout=5).status_code == 503
        answer = httpx.post(f"{url}/classify", files={"image": ("a.jpg", small_jpeg())}, timeout=10)
        assert_our_error(answer, 503, "warming up")
        assert int(answer.headers["retry-after"]) >= 1
        assert_our_error(httpx.get(f"{url}/model", timeout=5), 503)
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=30)  # not SIGKILLed: it ended on its own
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        log.close()
    assert process.returncode is not None and process.returncode != -signal.SIGKILL


# ---------------------------------------------------------------- bounded /metrics


def test_unknown_paths_do_not_create_metric_series(server) -> None:
    client = server["client"]
    before = client.get("/metrics").text
    tokens = [uuid.uuid4().hex for _ in range(30)]
    for index, token in enumerate(tokens):
        path = [f"/{token}", f"/static_content/{token}.js", f"/classify/{token}", f"/{token}/a/b?x=1"][index % 4]
        (client.get if index % 2 else client.post)(path)
    after = client.get("/metrics").text
    assert not any(token in after for token in tokens)
    assert 'endpoint="other"' in after
    series = {line.split(" ")[0] for line in after.splitlines() if line and not line.startswith("#")}
    endpoints = set(re.findall(r'endpoint="([^"]*)"', after)) - set(re.findall(r'endpoint="([^"]*)"', before))
    assert endpoints <= {"other", "/static_content/{path}", "/classify"}, endpoints  # route templates only
    for token in (uuid.uuid4().hex for _ in range(30)):
        client.get(f"/{token}")
    again = {
        line.split(" ")[0] for line in client.get("/metrics").text.splitlines() if line and not line.startswith("#")
    }
    assert again == series


def test_known_routes_keep_their_own_label(server) -> None:
    assert classify(server, small_jpeg()).status_code == 200
    text = server["client"].get("/metrics").text
    assert 'endpoint="/classify"' in text


# ---------------------------------------------------------------- declared pixels


def test_batch_of_tiny_files_declaring_huge_images_is_refused_before_decoding(server) -> None:
    started = time.monotonic()
    response = classify_batch(server, [gif_declaring(1900, 1900)] * 8)  # 8 x 3.6 Mpx > 8 Mpx per request
    assert_our_error(response, 413, "VGG_MAX_REQUEST_PIXELS", "28880000")
    assert time.monotonic() - started < 5


@pytest.mark.parametrize(
    ("maker", "name"),
    [
        (lambda: gif_declaring(3000, 3000), "bomb.gif"),
        (lambda: png_header_declaring(3000, 3000), "bomb.png"),
        (lambda: png_of(2100, 2000), "big.png"),
    ],
    ids=["gif-screen", "png-header", "png-real"],
)
def test_one_image_over_the_pixel_cap_is_refused_by_its_header(server, maker, name) -> None:
    assert_our_error(classify(server, maker(), name=name), 413, "limit is 4000000 (VGG_MAX_PIXELS)")
    response = classify_batch(server, [small_jpeg(), maker()], name=name)
    assert_our_error(response, 413, "images[1]", "VGG_MAX_PIXELS")


@pytest.mark.parametrize("size", [(20000, 20000), (60000, 40000)])
def test_bomb_messages_quote_our_limit_not_pillows(server, size) -> None:
    body = assert_our_error(classify(server, png_header_declaring(*size), name="bomb.png"), 413, "VGG_MAX_PIXELS")
    assert str(size[0] * size[1]) in body["error"] and "4000000" in body["error"]
    assert "178956970" not in body["error"] and "decompression bomb DOS" not in body["error"]


def test_images_within_the_caps_are_served(server) -> None:
    response = classify_batch(server, [png_of(1500, 1500), gif_declaring(1500, 1500), small_jpeg()])
    assert response.status_code == 200, response.text
    assert len(response.json()) == 3


def test_large_jpeg_is_decoded_at_reduced_size_and_counts_so(server) -> None:
    """A 3000 x 2000 JPEG (6 Mpx declared) is over VGG_MAX_PIXELS; a 1990 x 1990 one (3.96 Mpx)
    is decoded at 1/8 (the draft keeps 2 Q = 74 px): two of them fit the 8 Mpx request cap only
    because the decoded size counts."""
    buffer = io.BytesIO()
    Image.new("RGB", (1990, 1990), (120, 30, 200)).save(buffer, "JPEG")
    jpeg = buffer.getvalue()
    response = classify_batch(server, [jpeg, jpeg, jpeg], name="big.jpg")  # 11.9 Mpx declared, 0.19 decoded
    assert response.status_code == 200, response.text
    buffer = io.BytesIO()
    Image.new("RGB", (3000, 2000)).save(buffer, "JPEG")
    assert_our_error(classify(server, buffer.getvalue()), 413, "VGG_MAX_PIXELS")


# ---------------------------------------------------------------- bodies: size, Expect, stalls


@pytest.mark.parametrize("length", [50_000_000, 1_000_001])
def test_expect_100_continue_with_an_oversized_body_gets_413_without_continue(server, length) -> None:
    head = multipart_head(server["port"], length=length, extra="Expect: 100-continue\r\n")
    answer = raw_request(server["port"], head, timeout=5)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:300]
    assert b"100 Continue" not in answer
    assert b"VGG_MAX_BODY_BYTES" in answer


def test_expect_100_continue_with_a_wrong_media_type_gets_415_without_continue(server) -> None:
    head = (
        "POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 10\r\n"
        "Expect: 100-continue\r\n\r\n"
    )
    answer = raw_request(server["port"], head, timeout=5)
    assert answer.startswith(b"HTTP/1.1 415") and b"100 Continue" not in answer, answer[:300]


def stalled_upload(port: int, *, length: int) -> socket.socket:
    """A connection that declares ``length`` bytes, sends 1 KB of them and stalls."""
    connection = socket.create_connection(("127.0.0.1", port), timeout=15)
    connection.sendall(multipart_head(port, length=length).encode() + b"--b0undary\r\n" + b"x" * 1000)
    return connection


def read_answer(connection: socket.socket) -> bytes:
    received = b""
    try:
        while chunk := connection.recv(65536):
            received += chunk
    except (TimeoutError, ConnectionResetError):
        pass
    return received


def test_stalled_body_is_dropped_after_the_timeout_and_others_are_served(server) -> None:
    connection = stalled_upload(server["port"], length=500_000)
    started = time.monotonic()
    try:
        assert classify(server, small_jpeg()).status_code == 200  # served meanwhile
        answer = read_answer(connection)
    finally:
        connection.close()
    waited = time.monotonic() - started
    assert answer.startswith(b"HTTP/1.1 408"), answer[:300]
    assert b"VGG_BODY_TIMEOUT_S" in answer
    assert 1.5 < waited < 10


def test_buffered_bytes_cap_refuses_at_once_and_keeps_room_for_small_requests(server) -> None:
    """Two stalled 0.9 MB uploads hold 1.8 of the 2.625 MB large bodies may use; a third is
    refused at once (503, Retry-After), while an ordinary small upload is still served."""
    stalled = [stalled_upload(server["port"], length=900_000) for _ in range(2)]
    try:
        time.sleep(0.5)
        started = time.monotonic()
        answer = raw_request(server["port"], multipart_head(server["port"], length=900_000), timeout=5)
        assert answer.startswith(b"HTTP/1.1 503"), answer[:300]
        assert time.monotonic() - started < 3
        assert re.search(rb"(?i)retry-after: \d+", answer) and b"VGG_MAX_BUFFERED_BYTES" in answer
        assert classify(server, small_jpeg()).status_code == 200
    finally:
        for connection in stalled:
            connection.close()
    time.sleep(3)  # the stalled bodies time out and give their bytes back
    assert classify(server, small_jpeg()).status_code == 200


# ---------------------------------------------------------------- HTTP edge answers


@pytest.mark.parametrize("top_k", ["\u0663", "\uff13", "\u00b9", "3\u0663", "0x3", "3.0", "", "1e3"])
def test_top_k_must_be_ascii_digits(server, top_k) -> None:
    assert_our_error(classify(server, small_jpeg(), top_k=top_k), 400, "top_k must be an integer")
    assert_no_traceback(server)


def raw_multipart(filename: bytes, data: bytes, boundary: bytes = b"rawb0undary") -> tuple[bytes, str]:
    """A multipart body with the file name's bytes as they are (httpx would percent-encode them)."""
    body = (
        b"--"
        + boundary
        + b'\r\nContent-Disposition: form-data; name="image"; filename="'
        + filename
        + b'"\r\nContent-Type: application/octet-stream\r\n\r\n'
        + data
        + b"\r\n--"
        + boundary
        + b"--\r\n"
    )
    return body, f"multipart/form-data; boundary={boundary.decode()}"


@pytest.mark.parametrize("name", [b"a\x00b.jpg", b"\x00", b"photo\x1b[31m.jpg", b"a\x7f.jpg", b"tab\there.jpg"])
def test_control_characters_in_file_names_are_refused(server, name) -> None:
    body, content_type = raw_multipart(name, small_jpeg())
    response = server["client"].post("/classify", content=body, headers={"content-type": content_type})
    assert_our_error(response, 400, "control character")
    assert_no_traceback(server)


def test_percent_encoded_and_unicode_file_names_are_fine(server) -> None:
    for name in ("a%00b.jpg", "写真.jpg"):
        assert classify(server, small_jpeg(), name=name).status_code == 200


@pytest.mark.parametrize("media_type", ["Multipart/Form-Data", "MULTIPART/FORM-DATA", "multipart/FORM-data"])
def test_media_type_is_matched_case_insensitively(server, media_type) -> None:
    request = server["client"].build_request("POST", "/classify", files={"image": ("a.jpg", small_jpeg())})
    kind, _, parameters = request.headers["content-type"].partition(";")
    body = request.read()
    response = server["client"].post("/classify", content=body, headers={"content-type": f"{media_type};{parameters}"})
    assert response.status_code == 200, response.text
    assert response.json()["label"] in CLASSES
    assert_no_traceback(server)


def test_no_traceback_after_all_edge_cases(server) -> None:
    assert_no_traceback(server)
