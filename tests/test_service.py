"""The BentoML service against a real server: ``bentoml serve`` in a subprocess, HTTP with httpx.

One small VGG-A is exported with ``python -m export`` into a temporary BentoML home; the
server runs on a free loopback port for the whole module and is always stopped (its process
group) at the end. Every answer is compared with ONNX Runtime run directly on the exported
file, on the graph input made by export's own reference loader.
"""

from __future__ import annotations

import asyncio
import io
import json
import re
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image

from bench.launch import REPO_ROOT, bentoml_serve_command, free_port, running_server
from export.check import load_graph_inputs
from serving.engine import Engine, EngineError, resolve_model, warm_up_sizes
from tests.export_helpers import peaky_model, write_checkpoint
from tests.helpers import repo_env, run_module
from vgg.preprocessing import open_rgb, to_graph_input

pytestmark = pytest.mark.slow

CLASSES = [f"class_{index}" for index in range(10)]
MAX_BODY_BYTES = 1_000_000
MAX_PIXELS = 4_000_000
MAX_IMAGES = 8
MAX_BATCH = 16


# ---------------------------------------------------------------- fixtures


def base_env(bentoml_home: Path) -> dict[str, str]:
    return repo_env(BENTOML_HOME=str(bentoml_home))


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict:
    """A peaky 10-class VGG-A exported and registered in a fresh BentoML home."""
    root = tmp_path_factory.mktemp("service")
    checkpoint = write_checkpoint(root / "best.pt", peaky_model(num_classes=len(CLASSES)), classes=CLASSES)
    onnx_path = root / "model.onnx"
    home = root / "bentoml"
    result = run_module(
        "export", "--checkpoint", str(checkpoint), "--tta", "center", "--out", str(onnx_path), env=base_env(home)
    )
    assert result.returncode == 0, result.stderr[-2000:]
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    scale = session.get_inputs()[0].shape[1]
    return {"root": root, "home": home, "onnx": onnx_path, "session": session, "test_scale": scale}


@pytest.fixture(scope="module")
def server(exported) -> dict:
    env = base_env(exported["home"]) | {
        "VGG_MAX_BATCH_SIZE": str(MAX_BATCH),
        "VGG_MAX_BODY_BYTES": str(MAX_BODY_BYTES),
        "VGG_MAX_PIXELS": str(MAX_PIXELS),
        "VGG_MAX_IMAGES_PER_REQUEST": str(MAX_IMAGES),
    }
    port = free_port()
    log_path = exported["root"] / "server.log"
    with running_server(bentoml_serve_command(port), port=port, env=env, log_path=log_path) as (url, process):
        with httpx.Client(base_url=url, timeout=60.0) as client:
            yield {"url": url, "process": process, "client": client, "log": log_path}


# ---------------------------------------------------------------- helpers


def direct_probs(exported: dict, graph_input: np.ndarray) -> np.ndarray:
    """ONNX Runtime on the exported file, no HTTP: the answer the service must give."""
    return exported["session"].run(None, {"images": graph_input[None]})[0][0]


def served_probs(answer: dict) -> np.ndarray:
    probs = np.full(len(CLASSES), np.nan)
    for entry in answer["top"]:
        probs[entry["index"]] = entry["score"]
    return probs


def encode(image: Image.Image, fmt: str, **save_args) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **save_args)
    return buffer.getvalue()


def noise_image(size: tuple[int, int], *, seed: int, colour: tuple[int, int, int] = (128, 128, 128)) -> Image.Image:
    rng = np.random.default_rng(seed)
    pixels = np.array(colour) + rng.normal(0, 60, size=(size[1], size[0], 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def classify(server: dict, data: bytes, *, top_k: int | str = 10, name: str = "image.bin") -> httpx.Response:
    return server["client"].post("/classify", files={"image": (name, data)}, data={"top_k": str(top_k)})


def assert_answer_matches(answer: dict, expected: np.ndarray, *, top_k: int = 10) -> None:
    assert set(answer) == {"label", "index", "score", "top", "model"}
    assert len(answer["top"]) == top_k
    scores = [entry["score"] for entry in answer["top"]]
    assert scores == sorted(scores, reverse=True)
    assert answer["index"] == int(np.argmax(expected))
    assert answer["label"] == CLASSES[answer["index"]]
    np.testing.assert_allclose(
        served_probs(answer)[[e["index"] for e in answer["top"]]],
        expected[[e["index"] for e in answer["top"]]],
        rtol=0,
        atol=1e-5,
    )


def metric(server: dict, name: str) -> float:
    text = server["client"].get("/metrics").text
    match = re.search(rf"^{name} ([0-9.e+]+)$", text, flags=re.MULTILINE)
    assert match, f"{name} not in /metrics"
    return float(match.group(1))


# ---------------------------------------------------------------- health, docs


def test_health_and_docs(server) -> None:
    client = server["client"]
    assert client.get("/livez").status_code == 200
    assert client.get("/readyz").status_code == 200
    spec = client.get("/docs.json").json()
    assert {"/classify", "/classify_batch"} <= set(spec["paths"])
    assert client.get("/").status_code == 200
    assert "vgg_inference_calls_total" in client.get("/metrics").text


MODEL_FIELDS = {
    "tag",
    "cfg",
    "batch_norm",
    "num_classes",
    "labels",
    "test_scale",
    "crop",
    "tta",
    "precision",
    "provider",
    "val_top1",
    "workers",
}


def test_model_endpoint_says_what_is_served(server, exported) -> None:
    from export.onnx_io import read_metadata
    from serving.engine import _cuda_usable

    response = server["client"].get("/model")
    assert response.status_code == 200, response.text
    info = response.json()
    assert set(info) == MODEL_FIELDS
    exported_metadata = read_metadata(exported["onnx"])  # what export wrote, read by export's own reader
    for key in ("cfg", "batch_norm", "num_classes", "crop", "tta", "val_top1"):
        assert info[key] == exported_metadata[key], key
    assert info["labels"] == CLASSES and info["test_scale"] == exported["test_scale"] == exported_metadata["test_scale"]
    assert info["workers"] == 1
    answer = server["client"].post(
        "/classify", files={"image": ("a.png", encode(noise_image((30, 30), seed=6), "PNG"))}
    )
    assert info["tag"] == answer.json()["model"]
    # The store entry has only fp32: served as fp32, on the CPU unless a GPU is usable.
    assert info["precision"] == "fp32"
    expected_provider = "CUDAExecutionProvider" if _cuda_usable() else "CPUExecutionProvider"
    assert info["provider"] == expected_provider
    assert server["client"].post("/model").status_code == 405


# ---------------------------------------------------------------- answers equal direct ORT


def test_real_images_equal_direct_onnx_runtime(server, exported, imagenette_train) -> None:
    files = sorted(imagenette_train.rglob("*.JPEG"))[::997][:8]
    expected = exported["session"].run(None, {"images": load_graph_inputs(files, test_scale=exported["test_scale"])})[0]
    for path, probs in zip(files, expected, strict=True):
        response = classify(server, path.read_bytes(), name=path.name)
        assert response.status_code == 200, response.text
        assert_answer_matches(response.json(), probs)


def generated_cases() -> list[tuple[str, bytes]]:
    """Every supported format, in the modes it stores."""
    rgb = noise_image((53, 41), seed=1, colour=(180, 90, 60))
    rgba = rgb.copy()
    rgba.putalpha(Image.linear_gradient("L").resize(rgb.size))
    grey16 = Image.fromarray(np.asarray(rgb.convert("L"), dtype=np.uint16) * 257).convert("I;16")
    palette = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=32)
    transparent_palette = palette.copy()
    transparent_palette.info["transparency"] = 0
    return [
        ("jpeg-rgb", encode(rgb, "JPEG", quality=90)),
        ("jpeg-l", encode(rgb.convert("L"), "JPEG")),
        ("jpeg-cmyk", encode(rgb.convert("CMYK"), "JPEG")),
        ("png-rgb", encode(rgb, "PNG")),
        ("png-rgba", encode(rgba, "PNG")),
        ("png-la", encode(rgba.convert("LA"), "PNG")),
        ("png-p", encode(palette, "PNG")),
        ("png-p-transparency", encode(transparent_palette, "PNG", transparency=0)),
        ("png-1", encode(rgb.convert("1"), "PNG")),
        ("png-i16", encode(grey16, "PNG")),
        ("webp-rgb", encode(rgb, "WEBP", lossless=True)),
        ("webp-rgba", encode(rgba, "WEBP", quality=80)),
        ("bmp-rgb", encode(rgb, "BMP")),
        ("bmp-l", encode(rgb.convert("L"), "BMP")),
        ("bmp-p", encode(palette, "BMP")),
        ("gif-p", encode(palette, "GIF")),
        ("tiff-rgb", encode(rgb, "TIFF")),
        ("tiff-rgba", encode(rgba, "TIFF", compression="tiff_deflate")),
        ("tiff-cmyk", encode(rgb.convert("CMYK"), "TIFF")),
        ("tiff-i16", encode(grey16, "TIFF")),
        ("tiff-f", encode(rgb.convert("F"), "TIFF")),
    ]


@pytest.mark.parametrize(("case", "data"), generated_cases(), ids=[case for case, _ in generated_cases()])
def test_every_format_and_mode_equals_direct_onnx_runtime(server, exported, case, data) -> None:
    expected = direct_probs(exported, to_graph_input(open_rgb(data), exported["test_scale"]))
    response = classify(server, data, name=f"{case}.img")
    assert response.status_code == 200, response.text
    assert_answer_matches(response.json(), expected)


def test_exif_orientation_is_applied(server, exported) -> None:
    upright = noise_image((64, 40), seed=2, colour=(60, 160, 90))
    upright.paste((255, 255, 0), (0, 0, 20, 40))  # a yellow band on the left: rotation changes the crop
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # EXIF orientation 6 undoes this
    exif = Image.Exif()
    exif[0x0112] = 6
    expected = direct_probs(exported, to_graph_input(upright, exported["test_scale"]))
    unrotated = direct_probs(exported, to_graph_input(stored, exported["test_scale"]))
    assert not np.allclose(expected, unrotated, atol=1e-3)  # the test can tell the difference
    response = classify(server, encode(stored, "PNG", exif=exif), name="rotated.png")
    assert response.status_code == 200, response.text
    assert_answer_matches(response.json(), expected)


def test_gif_first_frame(server, exported) -> None:
    first = noise_image((48, 48), seed=3, colour=(220, 30, 30))
    second = noise_image((48, 48), seed=4, colour=(30, 30, 220))
    data = encode(first, "GIF", save_all=True, append_images=[second], duration=100, loop=0)
    with Image.open(io.BytesIO(data)) as gif:
        assert gif.n_frames == 2
        gif.seek(0)
        first_decoded = gif.convert("RGB")
        gif.seek(1)
        second_decoded = gif.convert("RGB")
    expected = direct_probs(exported, to_graph_input(first_decoded, exported["test_scale"]))
    other = direct_probs(exported, to_graph_input(second_decoded, exported["test_scale"]))
    assert not np.allclose(expected, other, atol=1e-3)
    response = classify(server, data, name="anim.gif")
    assert response.status_code == 200, response.text
    assert_answer_matches(response.json(), expected)


@pytest.mark.parametrize("top_k", [1, 3, 10])
def test_top_k(server, exported, top_k) -> None:
    image = noise_image((40, 40), seed=5)
    expected = direct_probs(exported, to_graph_input(image, exported["test_scale"]))
    response = classify(server, encode(image, "PNG"), top_k=top_k)
    assert response.status_code == 200, response.text
    answer = response.json()
    assert_answer_matches(answer, expected, top_k=top_k)
    assert [entry["index"] for entry in answer["top"]] == list(np.argsort(-expected, kind="stable")[:top_k])


def test_default_top_k_is_five_and_model_is_the_tag(server) -> None:
    response = server["client"].post(
        "/classify", files={"image": ("a.png", encode(noise_image((30, 30), seed=6), "PNG"))}
    )
    assert response.status_code == 200, response.text
    answer = response.json()
    assert len(answer["top"]) == 5
    assert re.fullmatch(r"vgg:[a-z0-9]+", answer["model"])


def test_classify_batch_keeps_order(server, exported) -> None:
    images = [noise_image((40 + 3 * i, 44), seed=10 + i, colour=(40 * i, 100, 200 - 40 * i)) for i in range(4)]
    files = [("images", (f"{i}.png", encode(image, "PNG"))) for i, image in enumerate(images)]
    response = server["client"].post("/classify_batch", files=files, data={"top_k": "10"})
    assert response.status_code == 200, response.text
    answers = response.json()
    assert len(answers) == len(images)
    for answer, image in zip(answers, images, strict=True):
        assert_answer_matches(answer, direct_probs(exported, to_graph_input(image, exported["test_scale"])))


def test_python_client(server, exported) -> None:
    import bentoml

    image = noise_image((45, 52), seed=13, colour=(90, 200, 120))
    path = exported["root"] / "client.png"
    image.save(path)
    expected = direct_probs(exported, to_graph_input(image, exported["test_scale"]))
    with bentoml.SyncHTTPClient(server["url"]) as client:
        answer = client.classify(image=path, top_k=10)
        answers = client.classify_batch(images=[path, path], top_k=3)
        with pytest.raises(bentoml.exceptions.BentoMLException, match="not a readable image"):
            client.classify(image=REPO_ROOT / "bentofile.yaml")
    assert_answer_matches(answer, expected)
    assert len(answers) == 2
    for one in answers:
        assert_answer_matches(one, expected, top_k=3)


# ---------------------------------------------------------------- concurrency and batching


def test_64_concurrent_requests_are_fused_into_fewer_onnx_runtime_calls(server, exported) -> None:
    images = [noise_image((36 + i % 7, 40 + i % 5), seed=100 + i, colour=(4 * i, 255 - 4 * i, 128)) for i in range(64)]
    payloads = [encode(image, "PNG") for image in images]
    calls_before = metric(server, "vgg_inference_calls_total")
    images_before = metric(server, "vgg_inference_images_total")

    async def send_all() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=64)
        async with httpx.AsyncClient(base_url=server["url"], timeout=60.0, limits=limits) as client:
            return await asyncio.gather(
                *(client.post("/classify", files={"image": ("x.png", data)}, data={"top_k": "10"}) for data in payloads)
            )

    responses = asyncio.run(send_all())
    for response, image in zip(responses, images, strict=True):
        assert response.status_code == 200, response.text
        assert_answer_matches(response.json(), direct_probs(exported, to_graph_input(image, exported["test_scale"])))
    calls = metric(server, "vgg_inference_calls_total") - calls_before
    assert metric(server, "vgg_inference_images_total") - images_before == 64
    # How many fuse depends on arrival vs inference speed (the deterministic fusing check is
    # tests/test_batching.py); none at all for 64 concurrent requests means batching is off.
    assert calls < 64, "64 concurrent requests took 64 ONNX Runtime calls: nothing was batched"


def test_the_images_of_one_batch_request_are_one_onnx_runtime_call(server, exported) -> None:
    images = [noise_image((40, 40 + i), seed=200 + i) for i in range(MAX_IMAGES)]
    files = [("images", (f"{i}.png", encode(image, "PNG"))) for i, image in enumerate(images)]
    calls_before = metric(server, "vgg_inference_calls_total")
    response = server["client"].post("/classify_batch", files=files, data={"top_k": "10"})
    assert response.status_code == 200, response.text
    assert metric(server, "vgg_inference_calls_total") - calls_before == 1
    for answer, image in zip(response.json(), images, strict=True):
        assert_answer_matches(answer, direct_probs(exported, to_graph_input(image, exported["test_scale"])))


@pytest.mark.parametrize("size", [(1, 3_900_000), (3_900_000, 1)], ids=["tall", "wide"])
def test_thin_image_is_answered_without_blowing_up_memory(server, exported, size) -> None:
    data = encode(Image.new("L", size, 90), "PNG")  # ~30 kB; resizing all of it would need terabytes
    assert len(data) < MAX_BODY_BYTES
    expected = direct_probs(exported, np.full((exported["test_scale"], exported["test_scale"], 3), 90, dtype=np.uint8))
    response = classify(server, data, name="thin.png")
    assert response.status_code == 200, response.text
    assert_answer_matches(response.json(), expected)


# ---------------------------------------------------------------- bad input: 4xx JSON, never 500


def png_header_claiming(width: int, height: int) -> bytes:
    """A PNG whose IHDR announces ``width x height`` but whose pixel data is one compressed
    row: decoding it would fail (truncated), so a 413 proves the size was refused from the header."""
    import struct
    import zlib

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    one_row = zlib.compress(bytes(1 + 3 * width))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", one_row) + chunk(b"IEND", b"")


def truncated_jpeg() -> bytes:
    data = encode(noise_image((200, 150), seed=7), "JPEG", quality=95)
    return data[: len(data) // 2]


BAD_UPLOADS = [
    ("text-file", b"hello, this is not an image\n", 400, "not a readable image"),
    ("empty-file", b"", 400, "empty"),
    ("truncated-jpeg", truncated_jpeg(), 400, "not a readable image"),
    (
        "random-bytes",
        np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes(),
        400,
        "not a readable image",
    ),
    ("bomb-from-header", png_header_claiming(3000, 3000), 413, "9000000 pixels"),
    ("ico-format", encode(noise_image((32, 32), seed=8), "ICO"), 415, "unsupported image format"),
    ("ppm-format", encode(noise_image((32, 32), seed=8), "PPM"), 415, "unsupported image format"),
]


@pytest.mark.parametrize(("case", "data", "status", "words"), BAD_UPLOADS, ids=[c[0] for c in BAD_UPLOADS])
def test_bad_uploads_get_4xx_json(server, case, data, status, words) -> None:
    response = classify(server, data, name=f"{case}.bin")
    assert response.status_code == status, response.text
    assert words in response.json()["error"]
    assert server["process"].poll() is None


def test_pixel_limit_applies_to_a_real_image(server) -> None:
    big = Image.new("L", (2100, 2000), 128)  # 4.2 MP > VGG_MAX_PIXELS, compresses to a few KB
    response = classify(server, encode(big, "PNG"), name="big.png")
    assert response.status_code == 413, response.text
    assert "4200000 pixels" in response.json()["error"]


@pytest.mark.parametrize("top_k", ["abc", "0", "11", "-1", "2.5", ""])
def test_bad_top_k_is_400(server, top_k) -> None:
    response = classify(server, encode(noise_image((30, 30), seed=9), "PNG"), top_k=top_k)
    assert response.status_code == 400, response.text
    assert "top_k" in json.dumps(response.json())


@pytest.mark.parametrize(
    ("content_type", "body"),
    [
        ("application/json", b'{"image": "http://example.com/cat.jpg"}'),
        ("text/plain", b"cat"),
        ("image/jpeg", truncated_jpeg()),
        (None, b""),
    ],
)
def test_unsupported_content_type_is_415(server, content_type, body) -> None:
    headers = {"content-type": content_type} if content_type else {}
    response = server["client"].post("/classify", content=body, headers=headers)
    assert response.status_code == 415, response.text
    assert "multipart/form-data" in response.json()["error"]


def test_body_over_limit_is_413(server) -> None:
    data = b"\xff\xd8" + bytes(MAX_BODY_BYTES + 10)
    response = classify(server, data, name="huge.jpg")
    assert response.status_code == 413, response.text
    assert "limit" in response.json()["error"]


def test_chunked_body_over_limit_is_413(server) -> None:
    boundary = "vggboundary"
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="a.jpg"\r\n'
        "Content-Type: image/jpeg\r\n\r\n"
    ).encode()

    def chunks():  # no Content-Length: the size is only known by reading
        yield head
        for _ in range(MAX_BODY_BYTES // 65536 + 2):
            yield bytes(65536)
        yield f"\r\n--{boundary}--\r\n".encode()

    response = server["client"].post(
        "/classify", content=chunks(), headers={"content-type": f"multipart/form-data; boundary={boundary}"}
    )
    assert response.status_code == 413, response.text


def multipart(parts: list[tuple[str, str | None, bytes]]) -> tuple[bytes, str]:
    """A multipart/form-data body: ``(field, filename or None for a text field, value)``."""
    boundary = "testboundary7MA4YWxk"
    body = b""
    for name, filename, value in parts:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        body += f"--{boundary}\r\nContent-Disposition: {disposition}\r\n\r\n".encode() + value + b"\r\n"
    return body + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


@pytest.mark.parametrize(
    ("parts", "words"),
    [
        ([("image", None, b"http://127.0.0.1:1/cat.jpg")], "must be a file upload"),
        ([("picture", "a.png", b"\x89PNG")], "unknown field"),
        ([("top_k", None, b"3")], "no 'image' field"),
        ([("image", "a.png", b"\x89PNG"), ("top_k", "k.bin", b"\xff\xfe")], "must be a plain value"),
    ],
    ids=["text-in-file-field", "unknown-field", "missing-image", "file-in-top_k"],
)
def test_malformed_forms_are_400(server, parts, words) -> None:
    body, content_type = multipart(parts)
    response = server["client"].post("/classify", content=body, headers={"content-type": content_type})
    assert response.status_code == 400, response.text
    assert words in response.json()["error"]


def test_garbled_multipart_is_400(server) -> None:
    response = server["client"].post(
        "/classify", content=b"garbage", headers={"content-type": "multipart/form-data; boundary=xyz"}
    )
    assert response.status_code == 400, response.text
    assert "multipart" in response.json()["error"]


def test_batch_limits(server) -> None:
    png = encode(noise_image((30, 30), seed=11), "PNG")
    too_many = [("images", (f"{i}.png", png)) for i in range(MAX_IMAGES + 1)]
    response = server["client"].post("/classify_batch", files=too_many)
    assert response.status_code == 413, response.text
    one_bad = [("images", ("good.png", png)), ("images", ("bad.txt", b"not an image"))]
    response = server["client"].post("/classify_batch", files=one_bad)
    assert response.status_code == 400, response.text
    assert response.json()["error"].startswith("images[1]: not a readable image")


def test_server_is_healthy_after_everything(server, exported) -> None:
    assert server["process"].poll() is None
    assert server["client"].get("/readyz").status_code == 200
    image = noise_image((50, 50), seed=12)
    response = classify(server, encode(image, "JPEG"))
    assert response.status_code == 200
    log = server["log"].read_text(errors="replace")
    assert "status=500" not in log, "a request was answered with a 500"
    assert "Traceback" not in log


# ---------------------------------------------------------------- the engine without HTTP


def test_engine_from_onnx_path_reads_metadata(exported) -> None:
    files = resolve_model(str(exported["onnx"]))
    assert files.labels == CLASSES
    assert files.test_scale == exported["test_scale"]
    engine = Engine(files, device="cpu", intra_op_threads=1)
    assert engine.provider == "CPUExecutionProvider"
    batch = np.random.default_rng(0).integers(0, 256, (3, files.test_scale, files.test_scale, 3), dtype=np.uint8)
    expected = exported["session"].run(None, {"images": batch})[0]
    np.testing.assert_allclose(engine.run(batch), expected, rtol=0, atol=1e-6)
    with pytest.raises(EngineError, match="expected uint8"):
        engine.run(batch[:, :-1])


def test_engine_refuses_missing_models(tmp_path) -> None:
    with pytest.raises(EngineError, match="no such ONNX file"):
        resolve_model(str(tmp_path / "absent.onnx"))
    (tmp_path / "junk.onnx").write_bytes(b"not onnx")
    with pytest.raises(EngineError, match="not a loadable ONNX model"):
        resolve_model(str(tmp_path / "junk.onnx"))


@pytest.mark.parametrize(("max_batch", "sizes"), [(2, [1, 2]), (16, [1, 2, 4, 8, 16]), (24, [1, 2, 4, 8, 16, 24])])
def test_warm_up_sizes(max_batch, sizes) -> None:
    assert warm_up_sizes(max_batch) == sizes


def test_engine_on_a_machine_without_gpu_refuses_cuda_and_uses_the_cpu(exported) -> None:
    from serving.engine import _cuda_usable

    if _cuda_usable():
        pytest.skip("this machine has a usable GPU")
    files = resolve_model(str(exported["onnx"]))
    with pytest.raises(EngineError, match="a GPU was required"):
        Engine(files, device="cuda")
    assert Engine(files).provider == "CPUExecutionProvider"
