"""How should the page at ``/ui`` send several images: one ``/classify_batch`` or one ``/classify`` each?

Against a real ``bentoml serve``, for the same ``--images`` photos (default: the 6 real photos of
``../shared/data/photos``, the first ``--count``), rounds alternate between

(a) ``batch``:     one ``POST /classify_batch`` carrying every image;
(b) ``per-image``: one ``POST /classify`` per image, all in flight at once (as the page sends them,
                   over at most 6 connections: Chromium's limit per server over HTTP/1.1).

Each round records the time until the first answer and until the last (for ``batch`` they are
the same: one answer). The medians over ``--rounds`` and their ratio are printed.

    .venv/bin/python bench/page_requests.py --tiny                 # small VGG-A, ~1 minute
    .venv/bin/python bench/page_requests.py --model vgg:latest     # the registered model
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from bench.launch import bentoml_serve_command, free_port, running_server  # noqa: E402
from bench.serve import tiny_model  # noqa: E402
from serving.engine import EngineError, resolve_model  # noqa: E402

PHOTOS = REPO_ROOT.parent / "shared" / "data" / "photos"
BROWSER_CONNECTIONS = 6


async def batch_round(client: httpx.AsyncClient, payloads: list[tuple[str, bytes]]) -> tuple[float, float]:
    start = time.perf_counter()
    response = await client.post("/classify_batch", files=[("images", item) for item in payloads])
    response.raise_for_status()
    elapsed = time.perf_counter() - start
    return elapsed, elapsed


async def per_image_round(client: httpx.AsyncClient, payloads: list[tuple[str, bytes]]) -> tuple[float, float]:
    start = time.perf_counter()
    finished: list[float] = []

    async def one(item: tuple[str, bytes]) -> None:
        response = await client.post("/classify", files={"image": item})
        response.raise_for_status()
        finished.append(time.perf_counter() - start)

    await asyncio.gather(*(one(item) for item in payloads))
    return min(finished), max(finished)


async def measure(url: str, payloads: list[tuple[str, bytes]], rounds: int) -> dict[str, list[tuple[float, float]]]:
    ways = {"batch": batch_round, "per-image": per_image_round}
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in ways}
    limits = httpx.Limits(max_connections=BROWSER_CONNECTIONS)
    async with httpx.AsyncClient(base_url=url, timeout=300.0, limits=limits) as client:
        for way in ways.values():  # warm-up: connections, caches
            for _ in range(2):
                await way(client, payloads)
        for index in range(rounds):  # alternate which goes first: drift hits both alike
            order = list(ways) if index % 2 == 0 else list(reversed(ways))
            for name in order:
                results[name].append(await ways[name](client, payloads))
    return results


def report(results: dict[str, list[tuple[float, float]]], count: int) -> None:
    medians = {
        name: (statistics.median(r[0] for r in rows) * 1e3, statistics.median(r[1] for r in rows) * 1e3)
        for name, rows in results.items()
    }
    print(
        f"{'way':10s} {'first answer ms':>16s} {'all answers ms':>15s}   (medians of {len(results['batch'])} rounds,"
        f" {count} images)"
    )
    for name, (first, last) in medians.items():
        print(f"{name:10s} {first:16.1f} {last:15.1f}")
    ratio = medians["per-image"][1] / medians["batch"][1]
    print(
        f"per-image / batch, time to all answers: {ratio:.2f}; "
        f"time to the first answer: {medians['per-image'][0] / medians['batch'][0]:.2f}"
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    model = parser.add_mutually_exclusive_group()
    model.add_argument("--model", default=None, help="store tag or .onnx path (default: $VGG_MODEL or vgg:latest)")
    model.add_argument("--tiny", action="store_true", help="export a small VGG-A to a temp dir and use it")
    parser.add_argument("--images", type=Path, default=PHOTOS, help="folder of photos (default: shared/data/photos)")
    parser.add_argument("--count", type=int, default=5, help="images per round (default 5)")
    parser.add_argument("--rounds", type=int, default=20)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("BENTOML_DO_NOT_TRACK", "True")
    files = sorted(p for p in args.images.glob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))[: args.count]
    if len(files) < args.count:
        print(f"error: {args.count} images wanted, {len(files)} found in {args.images}", file=sys.stderr)
        return 2
    payloads = [(path.name, path.read_bytes()) for path in files]
    with tempfile.TemporaryDirectory(prefix="vgg-page-bench-") as workdir:
        try:
            model = resolve_model(str(tiny_model(Path(workdir))) if args.tiny else args.model)
        except EngineError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
        env = {**os.environ, "VGG_MODEL": str(model.onnx_path), "PYTHONPATH": str(REPO_ROOT)}
        print(
            f"model {model.tag} ({model.test_scale}x{model.test_scale}); {platform.processor() or platform.machine()}, "
            f"{os.cpu_count()} CPUs"
        )
        port = free_port()
        log = Path(workdir) / "server.log"
        with running_server(bentoml_serve_command(port), port=port, env=env, log_path=log, timeout_s=600) as (url, _):
            report(asyncio.run(measure(url, payloads, args.rounds)), len(payloads))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
