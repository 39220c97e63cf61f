"""Serving benchmark: this service vs a hand-written server vs the raw engine, on loopback.

For concurrency 1, 8 and 32 (``--concurrency``), a bounded load generator (``--requests`` per
level, ``--time-limit`` seconds at most) measures throughput and p50/p99 latency of:

(a) ``service``: ``bentoml serve`` (service.py: adaptive batching into one ORT call),
(b) ``naive``:   FastAPI + uvicorn, one ORT call per request (bench/naive_server.py),
(c) ``engine``:  the same decode + preprocessing + :class:`serving.engine.Engine` in-process,
                 no HTTP, perfectly batched: batches of ``c`` images at concurrency ``c``.

All three use the same ONNX file. Targets: at c=32 the service reaches >= 90% of the
engine's throughput and beats the naive server; at c=1 its p50 is within 15 ms of the engine's.

    .venv/bin/python bench/serve.py --tiny --requests 64            # a small model, ~2 minutes
    .venv/bin/python bench/serve.py --model vgg:latest --requests 256  # the registered model
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from bench.launch import bentoml_serve_command, free_port, running_server  # noqa: E402
from serving.engine import Engine, EngineError, ModelFiles, resolve_model  # noqa: E402
from vgg.preprocessing import open_rgb, to_graph_input  # noqa: E402

IMAGENETTE = REPO_ROOT.parent / "shared" / "data" / "imagenette" / "train"


@dataclass
class Result:
    target: str
    concurrency: int
    completed: int
    errors: int
    seconds: float
    latencies_ms: list[float]
    mean_batch: float | None = None  # the service's images per ONNX Runtime call

    @property
    def throughput(self) -> float:
        return self.completed / self.seconds if self.seconds > 0 else 0.0

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.latencies_ms, q)) if self.latencies_ms else float("nan")


# ---------------------------------------------------------------- inputs


def load_payloads(folder: Path | None, count: int) -> list[bytes]:
    """JPEG bytes: the first ``count`` images of ``folder`` (default: imagenette when present),
    else generated noise photos."""
    folder = folder or (IMAGENETTE if IMAGENETTE.is_dir() else None)
    if folder is not None:
        files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in (".jpeg", ".jpg", ".png"))[:count]
        if files:
            return [p.read_bytes() for p in files]
    import io

    from PIL import Image

    rng = np.random.default_rng(0)
    payloads = []
    for _ in range(count):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (240, 320, 3), dtype=np.uint8)).save(buffer, format="JPEG", quality=90)
        payloads.append(buffer.getvalue())
    return payloads


def tiny_model(workdir: Path) -> Path:
    """A small VGG-A (64x64 crops, light head) exported to ``workdir/model.onnx`` without
    touching the BentoML store: for a quick run of this benchmark."""
    import torch

    import vgg
    from vgg.checkpoint import CHECKPOINT_FORMAT, save_checkpoint

    torch.manual_seed(0)
    model = vgg.build("A", num_classes=10, fc_width=256)
    checkpoint = {
        "format": CHECKPOINT_FORMAT,
        "arch": {"cfg": "A", "batch_norm": False, "num_classes": 10, "dropout": 0.5, "fc_width": 256},
        "model": model.state_dict(),
        "classes": [f"class_{i}" for i in range(10)],
        "preprocess": {
            "mean": [124.0, 116.0, 104.0],
            "std": [58.0, 57.0, 57.5],
            "pca_eigval": [1.0, 0.5, 0.1],
            "pca_eigvec": np.eye(3).tolist(),
            "crop": 64,
            "test_scale": 73,
        },
        "metrics": {"epoch": 0, "val_top1": 0.0, "val_top5": 0.0},
        "config": {"data": None, "cfg": "A"},
    }
    save_checkpoint(checkpoint, workdir / "tiny.pt")
    out = workdir / "model.onnx"
    command = [
        sys.executable,
        "-m",
        "export",
        "--checkpoint",
        str(workdir / "tiny.pt"),
        "--tta",
        "center",
        "--out",
        str(out),
        "--no-register",
    ]
    subprocess.run(command, cwd=REPO_ROOT, check=True)
    return out


# ---------------------------------------------------------------- HTTP load generator


async def http_load(url: str, payloads: list[bytes], *, concurrency: int, requests: int, time_limit: float) -> Result:
    import httpx

    latencies: list[float] = []
    errors = 0
    issued = 0
    limit = requests
    deadline = 0.0

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal issued, errors
        while issued < limit and time.perf_counter() < deadline:
            index = issued
            issued += 1
            started = time.perf_counter()
            try:
                response = await client.post("/classify", files={"image": ("x.jpg", payloads[index % len(payloads)])})
                ok = response.status_code == 200
            except httpx.HTTPError:
                ok = False
            if ok:
                latencies.append((time.perf_counter() - started) * 1000)
            else:
                errors += 1

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=max(time_limit, 60.0), limits=limits) as client:
        # Open the connections: one request each, not counted, outside the time limit.
        limit, deadline = concurrency, time.perf_counter() + max(time_limit, 60.0)
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        latencies.clear()
        errors, issued, limit = 0, 0, requests
        started = time.perf_counter()
        deadline = started + time_limit
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        seconds = time.perf_counter() - started
    return Result("", concurrency, len(latencies), errors, seconds, latencies)


def inference_batches(url: str) -> tuple[float, float]:
    """(images, ONNX Runtime calls) so far, from the service's ``vgg_inference_batch_size`` histogram."""
    import httpx

    text = httpx.get(f"{url}/metrics", timeout=30).text
    totals = {}
    for suffix in ("sum", "count"):
        values = re.findall(rf"^vgg_inference_batch_size_{suffix}(?:{{[^}}]*}})? ([0-9.e+]+)$", text, re.M)
        totals[suffix] = sum(float(value) for value in values)
    return totals["sum"], totals["count"]


def bench_http(name: str, url: str, payloads: list[bytes], args: argparse.Namespace) -> list[Result]:
    results = []
    for concurrency in args.concurrency:
        warm = min(len(payloads), 2 * concurrency)
        asyncio.run(http_load(url, payloads, concurrency=concurrency, requests=warm, time_limit=args.time_limit))
        before = inference_batches(url) if name == "service" else None
        result = asyncio.run(
            http_load(url, payloads, concurrency=concurrency, requests=args.requests, time_limit=args.time_limit)
        )
        if before is not None:
            images, calls = (after - earlier for after, earlier in zip(inference_batches(url), before, strict=True))
            result.mean_batch = images / calls if calls else float("nan")
        result.target = name
        results.append(result)
        print_row(result)
    return results


# ---------------------------------------------------------------- the raw engine


def bench_engine(files: ModelFiles, payloads: list[bytes], args: argparse.Namespace) -> list[Result]:
    engine = Engine(files)
    print(f"# engine on {engine.provider}", flush=True)
    decode = lambda data: to_graph_input(open_rgb(data), files.test_scale)  # noqa: E731
    results = []
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(args.concurrency)) as pool:
        for concurrency in args.concurrency:
            engine.warm_up([concurrency])
            latencies, done, index = [], 0, 0
            started = time.perf_counter()
            deadline = started + args.time_limit
            while done < args.requests and time.perf_counter() < deadline:
                size = min(concurrency, args.requests - done)
                chunk = [payloads[(index + i) % len(payloads)] for i in range(size)]
                batch_started = time.perf_counter()
                batch = np.stack(list(pool.map(decode, chunk)))
                engine.run(batch)
                latencies += [(time.perf_counter() - batch_started) * 1000] * size
                done += size
                index += size
            result = Result("engine", concurrency, done, 0, time.perf_counter() - started, latencies)
            results.append(result)
            print_row(result)
    return results


# ---------------------------------------------------------------- report


def print_row(result: Result) -> None:
    print(
        f"{result.target:8s} {result.concurrency:4d} {result.completed:6d} {result.errors:6d} "
        f"{result.throughput:10.1f} {result.percentile(50):9.1f} {result.percentile(99):9.1f}"
        + (f"  (mean batch {result.mean_batch:.1f})" if result.mean_batch is not None else ""),
        flush=True,
    )


def print_targets(results: list[Result], *, high: int, low: int) -> None:
    by = {(r.target, r.concurrency): r for r in results}
    print("\ntargets")
    if all((t, high) in by for t in ("service", "engine", "naive")):
        ratio = by["service", high].throughput / by["engine", high].throughput
        print(
            f"  c={high}: service/engine throughput {ratio:.2f} (target >= 0.90): {'met' if ratio >= 0.9 else 'MISSED'}"
        )
        naive = by["service", high].throughput / by["naive", high].throughput
        print(f"  c={high}: service/naive throughput {naive:.2f} (target > 1): {'met' if naive > 1 else 'MISSED'}")
    if all((t, low) in by for t in ("service", "engine")):
        gap = by["service", low].percentile(50) - by["engine", low].percentile(50)
        print(
            f"  c={low}: service p50 - engine p50 = {gap:.1f} ms (target <= 15 ms): {'met' if gap <= 15 else 'MISSED'}"
        )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    model = parser.add_mutually_exclusive_group()
    model.add_argument("--model", default=None, help="store tag or .onnx path (default: $VGG_MODEL or vgg:latest)")
    model.add_argument("--tiny", action="store_true", help="export a small VGG-A to a temp dir and use it")
    parser.add_argument("--fp16", action="store_true", help="use the model's fp16 graph (GPU) for all three")
    parser.add_argument("--images", type=Path, default=None, help="folder of test images (default: imagenette)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--requests", type=int, default=128, help="requests per concurrency level")
    parser.add_argument("--time-limit", type=float, default=60.0, help="seconds per level at most")
    parser.add_argument("--json", type=Path, default=None, help="also write every row to this JSON file")
    parser.add_argument("--log-dir", type=Path, default=None, help="keep the servers' logs here (default: discarded)")
    parser.add_argument(
        "--targets", nargs="+", choices=("service", "naive", "engine"), default=["service", "naive", "engine"]
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("BENTOML_DO_NOT_TRACK", "True")
    with tempfile.TemporaryDirectory(prefix="vgg-bench-") as workdir:
        try:
            files = resolve_model(str(tiny_model(Path(workdir))) if args.tiny else args.model)
            if args.fp16 and "fp16" not in files.graphs:
                raise EngineError(f"{files.tag} has no fp16 graph: export it with --precision fp16")
            # All three targets load this one file (the service through VGG_MODEL).
            files = resolve_model(str(files.graphs["fp16"] if args.fp16 else files.onnx_path))
        except EngineError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
        payloads = load_payloads(args.images, 64)
        env = {
            **os.environ,
            "VGG_MODEL": str(files.onnx_path),
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
        }
        print(
            f"model {files.tag} ({files.onnx_path.name}, {files.test_scale}x{files.test_scale}), "
            f"{len(payloads)} images; "
            f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs"
        )
        print(f"{'target':8s} {'c':>4s} {'done':>6s} {'errors':>6s} {'images/s':>10s} {'p50 ms':>9s} {'p99 ms':>9s}")
        results: list[Result] = []
        if "engine" in args.targets:
            results += bench_engine(files, payloads, args)
        servers = {
            "service": bentoml_serve_command,
            "naive": lambda port: [
                sys.executable,
                "-m",
                "uvicorn",
                "bench.naive_server:app",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--log-level",
                "warning",
            ],
        }
        for name in ("service", "naive"):
            if name not in args.targets:
                continue
            port = free_port()
            log = (args.log_dir or Path(workdir)) / f"{name}.log"
            with running_server(servers[name](port), port=port, env=env, log_path=log, timeout_s=600) as (url, _):
                results += bench_http(name, url, payloads, args)
        print_targets(results, high=max(args.concurrency), low=min(args.concurrency))
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "model": files.tag,
                    "graph": files.onnx_path.name,
                    "test_scale": files.test_scale,
                    "images": len(payloads),
                    "rows": [row_dict(r) for r in results],
                },
                indent=2,
            )
            + "\n"
        )
    return 0


def row_dict(result: Result) -> dict:
    return {
        "target": result.target,
        "concurrency": result.concurrency,
        "completed": result.completed,
        "errors": result.errors,
        "images_per_s": round(result.throughput, 2),
        "p50_ms": round(result.percentile(50), 2),
        "p99_ms": round(result.percentile(99), 2),
        "mean_batch": None if result.mean_batch is None else round(result.mean_batch, 2),
    }


if __name__ == "__main__":
    raise SystemExit(main())
