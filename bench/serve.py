"""Serving benchmark: this service vs the raw engine (and a hand-written server), per precision.

For each precision the model has on this device (fp32 and int8 on a CPU; ``--precisions``), and
for concurrency 1, 8 and 32 (``--concurrency``), a bounded load generator (``--requests`` per
level, ``--time-limit`` seconds at most) measures throughput and p50/p99 latency of:

(a) ``service``: ``bentoml serve`` (service.py: adaptive batching into one ORT call), started
                 with ``VGG_PRECISION=<precision>`` on the store entry,
(b) ``engine``:  the same decode + preprocessing + :class:`serving.engine.Engine` in-process,
                 no HTTP, perfectly batched: batches of ``c`` images at concurrency ``c``,
(c) ``naive``:   (``--targets ... naive``) FastAPI + uvicorn, one ORT call per request
                 (bench/naive_server.py), on the same graph file.

The engine and service rows of a precision run back to back, and every ratio below comes
from this one run. Each row also gives the CPU time spent per image: ``cpu ms`` is the
engine's process (decoding included) or the server's processes, ``client`` the load
generator's own (this process, on the same machine: on a small CPU it competes with the
server). Targets: at c=32 the service reaches >= 0.90 of the engine's throughput for each
precision; at c=1 its p50 is at most 5 ms above the engine's; at c=32 the int8 service
serves >= 3x the fp32 service's images/s on a CPU with AVX512-VNNI or AVX-VNNI (>= 1.8x
without); with ``naive``, the service beats it at c=32. It also measures, in process and on
the same payloads, what reading a request costs with one multipart parse (the request
guard's form handed on to BentoML's reader) and with the two parses the service used to do,
and how often the served int8 answers agree with the fp32 graph's top-1.

    .venv/bin/python bench/serve.py --medium --requests 96     # a VGG-D at Q=64, about 10 minutes on 2 cores
    .venv/bin/python bench/serve.py --tiny --requests 64       # a small VGG-A, a few minutes
    .venv/bin/python bench/serve.py --model vgg:latest         # a registered model (fp32 + int8 graphs)
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import json
import os
import platform
import re
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from bench import agreement  # noqa: E402
from bench.launch import bentoml_serve_command, free_port, running_server  # noqa: E402
from serving.engine import Engine, EngineError, ModelFiles, resolve_model  # noqa: E402
from vgg.preprocessing import load_graph_input  # noqa: E402

IMAGENETTE = REPO_ROOT.parent / "shared" / "data" / "imagenette"
CPU_PRECISIONS = ("fp32", "int8")
TARGET_SERVICE_VS_ENGINE = 0.90  # c=max: service / engine throughput, each precision
TARGET_C1_OVERHEAD_MS = 5.0  # c=1: service p50 - engine p50
TARGET_INT8_SPEEDUP = {True: 3.0, False: 1.8}  # int8 / fp32 service throughput, with / without VNNI


@dataclass
class Result:
    target: str
    precision: str
    concurrency: int
    completed: int
    errors: int
    seconds: float
    latencies_ms: list[float]
    mean_batch: float | None = None  # the service's images per ONNX Runtime call
    cpu_ms: float | None = None  # CPU time per image: the server's processes, or the engine's process
    client_cpu_ms: float | None = None  # CPU time per request of the load generator (this process)

    @property
    def throughput(self) -> float:
        return self.completed / self.seconds if self.seconds > 0 else 0.0

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.latencies_ms, q)) if self.latencies_ms else float("nan")


# ---------------------------------------------------------------- inputs and models


def load_payloads(folder: Path | None, count: int) -> list[bytes]:
    """Image bytes: ``count`` images spread evenly over ``folder`` in name order (so over all its
    class folders; default: imagenette's training images when present), else generated noise photos."""
    folder = folder or (IMAGENETTE / "train" if IMAGENETTE.is_dir() else None)
    if folder is not None:
        files = agreement.image_files(folder, count)
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


# name -> (cfg, crop, Q, fc width, tta): a quick small model, and the reproduction's VGG-D geometry
SYNTHETIC = {"tiny": ("A", 64, 73, 256, "center"), "medium": ("D", 56, 64, 1024, "five")}


def synthetic_model(kind: str, workdir: Path) -> str:
    """A VGG with random (Kaiming) weights, exported with fp32 + int8 graphs into the store
    under ``$BENTOML_HOME`` (a temporary one): its tag. Speed does not depend on the weights;
    int8 is calibrated on imagenette when present, and its agreement with fp32 is measured but
    not required (random weights give near-uniform answers)."""
    import torch

    import vgg
    from export import export_checkpoint
    from vgg.checkpoint import CHECKPOINT_FORMAT, save_checkpoint

    cfg, crop, scale, fc_width, tta = SYNTHETIC[kind]
    torch.manual_seed(0)
    model = vgg.build(cfg, num_classes=10, fc_width=fc_width, init="kaiming")
    data = IMAGENETTE if IMAGENETTE.is_dir() else None
    checkpoint = {
        "format": CHECKPOINT_FORMAT,
        "arch": {"cfg": cfg, "batch_norm": False, "num_classes": 10, "dropout": 0.5, "fc_width": fc_width},
        "model": model.state_dict(),
        "classes": [f"class_{i}" for i in range(10)],
        "preprocess": {
            "mean": [124.0, 116.0, 104.0],
            "std": [58.0, 57.0, 57.5],
            "pca_eigval": [1.0, 0.5, 0.1],
            "pca_eigvec": np.eye(3).tolist(),
            "crop": crop,
            "test_scale": scale,
        },
        "metrics": {"epoch": 0, "val_top1": None, "val_top5": None},
        "config": {"data": str(data) if data else None, "cfg": cfg},
    }
    save_checkpoint(checkpoint, workdir / f"{kind}.pt")
    result = export_checkpoint(
        workdir / f"{kind}.pt",
        tta=tta,
        precision="int8",
        calibration_count=64,
        agreement_count=128,
        min_agreement=0.0,
        int8_optional=True,
    )
    return str(result.tag)


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
        # Open the connections: one request each, not counted, outside the level's time limit.
        limit, deadline = concurrency, time.perf_counter() + max(time_limit, 60.0)
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        latencies.clear()
        errors, issued, limit = 0, 0, requests
        started = time.perf_counter()
        deadline = started + time_limit
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        seconds = time.perf_counter() - started
    return Result("", "", concurrency, len(latencies), errors, seconds, latencies)


def inference_batches(url: str) -> tuple[float, float]:
    """(images, ONNX Runtime calls) so far, from the service's ``vgg_inference_batch_size`` histogram."""
    import httpx

    text = httpx.get(f"{url}/metrics", timeout=30).text
    totals = {}
    for suffix in ("sum", "count"):
        values = re.findall(rf"^vgg_inference_batch_size_{suffix}(?:{{[^}}]*}})? ([0-9.e+]+)$", text, re.M)
        totals[suffix] = sum(float(value) for value in values)
    return totals["sum"], totals["count"]


def process_tree_cpu_s(pid: int) -> float:
    """CPU seconds (user + system) used so far by process ``pid`` and its children."""
    import psutil

    root = psutil.Process(pid)
    total = 0.0
    for process in [root, *root.children(recursive=True)]:
        try:
            times = process.cpu_times()
            total += times.user + times.system
        except psutil.NoSuchProcess:
            pass
    return total


def bench_http(
    name: str, precision: str, url: str, server_pid: int, payloads: list[bytes], args: argparse.Namespace
) -> list[Result]:
    results = []
    for concurrency in args.concurrency:
        warm = min(len(payloads), 2 * concurrency)
        asyncio.run(http_load(url, payloads, concurrency=concurrency, requests=warm, time_limit=args.time_limit))
        before = inference_batches(url) if name == "service" else None
        server_cpu, client_cpu = process_tree_cpu_s(server_pid), time.process_time()
        result = asyncio.run(
            http_load(url, payloads, concurrency=concurrency, requests=args.requests, time_limit=args.time_limit)
        )
        done = max(result.completed + result.errors, 1)
        result.cpu_ms = (process_tree_cpu_s(server_pid) - server_cpu) / done * 1000
        result.client_cpu_ms = (time.process_time() - client_cpu) / done * 1000
        if before is not None:
            images, calls = (after - earlier for after, earlier in zip(inference_batches(url), before, strict=True))
            result.mean_batch = images / calls if calls else float("nan")
        result.target, result.precision = name, precision
        results.append(result)
        print_row(result)
    return results


# ---------------------------------------------------------------- the raw engine


def bench_engine(engine: Engine, payloads: list[bytes], args: argparse.Namespace) -> list[Result]:
    decode = lambda data: load_graph_input(data, engine.test_scale)  # noqa: E731
    results = []
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(args.concurrency)) as pool:
        for concurrency in args.concurrency:
            engine.warm_up([concurrency])
            latencies, done, index = [], 0, 0
            started, cpu = time.perf_counter(), time.process_time()
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
            result = Result("engine", engine.precision, concurrency, done, 0, time.perf_counter() - started, latencies)
            result.cpu_ms = (time.process_time() - cpu) / max(done, 1) * 1000
            results.append(result)
            print_row(result)
    return results


# ---------------------------------------------------------------- one parse vs two


def multipart(payload: bytes) -> tuple[bytes, bytes]:
    boundary = "benchboundary"
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="x.jpg"\r\n'
            "Content-Type: image/jpeg\r\n\r\n"
        ).encode()
        + payload
        + f"\r\n--{boundary}--\r\n".encode()
    )
    return body, f"multipart/form-data; boundary={boundary}".encode()


async def read_request(payload: bytes, *, parses: int) -> None:
    """What the server does to a /classify body before the image is decoded: the guard reads
    and parses it, then BentoML's multipart reader builds the API's input (``parses=1``: from
    the guard's form; ``parses=2``: parsing the body again, as the service used to)."""
    from _bentoml_impl.serde import ALL_SERDE
    from bentoml._internal.context import ServiceContext
    from starlette.requests import Request

    from service import VGGClassifier
    from serving.guard import PARSED_FORM, RequestGuard

    body, content_type = multipart(payload)
    scope = {
        "type": "http",
        "method": "POST",
        "path": "/classify",
        "query_string": b"",
        "headers": [(b"content-type", content_type), (b"content-length", str(len(body)).encode())],
    }
    spec = VGGClassifier.apis["classify"].input_spec

    async def endpoint(scope, receive, send) -> None:
        if parses == 2:
            scope = {key: value for key, value in scope.items() if key != PARSED_FORM}
            receive = replay(body)
        request = Request(scope, receive)
        with ServiceContext().in_request(request):
            await spec.from_http_request(request, ALL_SERDE["multipart/form-data"]())
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    async def send(message) -> None:
        pass

    await RequestGuard(endpoint, paths={"/classify": "image"})(scope, replay(body), send)


def replay(body: bytes):
    messages = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive():
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    return receive


def bench_parsing(payloads: list[bytes], *, rounds: int = 5) -> dict[int, float]:
    """Mean milliseconds to read one request with 1 and with 2 parses, interleaved rounds."""

    async def read_all(parses: int) -> float:
        started = time.perf_counter()
        for payload in payloads:
            await read_request(payload, parses=parses)
        return time.perf_counter() - started

    for parses in (1, 2):  # imports and first-call costs, untimed
        asyncio.run(read_all(parses))
    totals = {1: 0.0, 2: 0.0}
    for _ in range(rounds):
        for parses in (1, 2):
            totals[parses] += asyncio.run(read_all(parses))
    return {parses: 1000 * total / (rounds * len(payloads)) for parses, total in totals.items()}


# ---------------------------------------------------------------- report


def has_vnni() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_vnni" in flags or "avx_vnni" in flags


def print_row(result: Result) -> None:
    print(
        f"{result.target:8s} {result.precision:5s} {result.concurrency:4d} {result.completed:6d} {result.errors:6d} "
        f"{result.throughput:10.1f} {result.percentile(50):9.1f} {result.percentile(99):9.1f}"
        + (f" {result.cpu_ms:8.1f}" if result.cpu_ms is not None else "")
        + (f" {result.client_cpu_ms:8.1f}" if result.client_cpu_ms is not None else "")
        + (f"  (mean batch {result.mean_batch:.1f})" if result.mean_batch is not None else ""),
        flush=True,
    )


def verdict(met: bool) -> str:
    return "met" if met else "MISSED"


def print_targets(results: list[Result], *, high: int, low: int) -> None:
    by = {(r.target, r.precision, r.concurrency): r for r in results}
    precisions = sorted({r.precision for r in results}, key=CPU_PRECISIONS.index)
    print("\ntargets")
    for precision in precisions:
        service, engine = by.get(("service", precision, high)), by.get(("engine", precision, high))
        if service and engine:
            ratio = service.throughput / engine.throughput
            print(
                f"  {precision} c={high}: service/engine throughput {ratio:.2f} "
                f"(target >= {TARGET_SERVICE_VS_ENGINE:.2f}): {verdict(ratio >= TARGET_SERVICE_VS_ENGINE)}"
            )
        service, engine = by.get(("service", precision, low)), by.get(("engine", precision, low))
        if service and engine:
            gap = service.percentile(50) - engine.percentile(50)
            print(
                f"  {precision} c={low}: service p50 - engine p50 = {gap:.1f} ms "
                f"(target <= {TARGET_C1_OVERHEAD_MS:.0f} ms): {verdict(gap <= TARGET_C1_OVERHEAD_MS)}"
            )
        naive, service = by.get(("naive", precision, high)), by.get(("service", precision, high))
        if naive and service:
            ratio = service.throughput / naive.throughput
            print(f"  {precision} c={high}: service/naive throughput {ratio:.2f} (target > 1): {verdict(ratio > 1)}")
    fp32, int8 = by.get(("service", "fp32", high)), by.get(("service", "int8", high))
    if fp32 and int8:
        vnni = has_vnni()
        target = TARGET_INT8_SPEEDUP[vnni]
        speedup = int8.throughput / fp32.throughput
        engine32, engine8 = by.get(("engine", "fp32", high)), by.get(("engine", "int8", high))
        engine_speedup = f"; raw engine {engine8.throughput / engine32.throughput:.2f}x" if engine32 and engine8 else ""
        print(
            f"  c={high}: int8 service / fp32 service throughput {speedup:.2f}x (target >= {target:g}x, "
            f"{'with' if vnni else 'without'} VNNI): {verdict(speedup >= target)}{engine_speedup}"
        )


def int8_agreement(files: ModelFiles, payloads: list[bytes]) -> float | None:
    """Top-1 agreement of the int8 graph with the fp32 graph on ``payloads`` (as served: same decode)."""
    if not {"fp32", "int8"} <= set(files.graphs):
        return None
    images = np.stack([load_graph_input(data, files.test_scale) for data in payloads])
    fp32, int8 = (agreement.probabilities(files, precision, images) for precision in ("fp32", "int8"))
    return agreement.compare(fp32, int8)["agreement"]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    model = parser.add_mutually_exclusive_group()
    model.add_argument("--model", default=None, help="store tag (default: $VGG_MODEL or vgg:latest)")
    model.add_argument(
        "--tiny", action="store_true", help="a small VGG-A (random weights), fp32 + int8, in a temp store"
    )
    model.add_argument(
        "--medium",
        action="store_true",
        help="a VGG-D at Q=64, 56x56 crops, FiveCrop, fc 1024 (random weights), fp32 + int8, in a temp store",
    )
    parser.add_argument(
        "--precisions",
        nargs="+",
        choices=("fp32", "fp16", "int8"),
        default=None,
        help="graphs to serve (default: fp32 and int8, those the model has)",
    )
    parser.add_argument("--images", type=Path, default=None, help="folder of test images (default: imagenette)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--requests", type=int, default=128, help="requests per concurrency level")
    parser.add_argument("--time-limit", type=float, default=60.0, help="seconds per level at most")
    parser.add_argument("--targets", nargs="+", choices=("service", "naive", "engine"), default=["service", "engine"])
    parser.add_argument("--json", type=Path, default=None, help="also write every row to this JSON file")
    parser.add_argument("--log-dir", type=Path, default=None, help="keep the servers' logs here (default: discarded)")
    return parser.parse_args(argv)


def run_servers(
    tag: str, files: ModelFiles, precision: str, payloads: list[bytes], args, workdir: Path
) -> list[Result]:
    """The service (``VGG_PRECISION=precision``) and, if asked, the naive server on that graph."""
    path = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    base = {**os.environ, "PYTHONPATH": path, "VGG_PRECISION": precision, "VGG_WORKERS": "1"}
    servers = {
        "service": (bentoml_serve_command, {**base, "VGG_MODEL": tag}),
        "naive": (
            lambda port: [
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
            {**base, "VGG_MODEL": str(files.graphs[precision])},
        ),
    }
    results = []
    for name, (command, env) in servers.items():
        if name not in args.targets:
            continue
        port = free_port()
        log = (args.log_dir or workdir) / f"{name}-{precision}.log"
        with running_server(command(port), port=port, env=env, log_path=log, timeout_s=600) as (url, process):
            results += bench_http(name, precision, url, process.pid, payloads, args)
    return results


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("BENTOML_DO_NOT_TRACK", "True")
    with tempfile.TemporaryDirectory(prefix="vgg-bench-") as workdir:
        if args.tiny or args.medium:
            os.environ["BENTOML_HOME"] = str(Path(workdir) / "bentoml")
        try:
            tag = (
                synthetic_model("tiny" if args.tiny else "medium", Path(workdir))
                if args.tiny or args.medium
                else args.model or os.environ.get("VGG_MODEL") or "vgg:latest"
            )
            files = resolve_model(tag)
            precisions = args.precisions or [p for p in CPU_PRECISIONS if p in files.graphs]
            missing = [p for p in precisions if p not in files.graphs]
            if missing:
                raise EngineError(
                    f"{files.tag} has no {'/'.join(missing)} graph: export it with --precision {missing[0]}"
                )
        except EngineError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
        payloads = load_payloads(args.images, 64)
        print(
            f"model {files.tag} ({files.metadata.get('cfg')}, {files.test_scale}x{files.test_scale}, tta "
            f"{files.metadata.get('tta')}, graphs {'+'.join(files.graphs)}), {len(payloads)} images; "
            f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, VNNI {'yes' if has_vnni() else 'no'}"
        )
        agreement = int8_agreement(files, payloads)
        if agreement is not None:
            print(f"int8 top-1 agreement with fp32 on these {len(payloads)} images: {agreement:.2%}")
        parsing = bench_parsing(payloads)
        print(
            f"reading one /classify request (in process): one parse {parsing[1]:.2f} ms, two parses "
            f"{parsing[2]:.2f} ms: {parsing[2] - parsing[1]:.2f} ms saved per request"
        )
        columns = ("done", "errors", "images/s", "p50 ms", "p99 ms", "cpu ms", "client")
        widths = (6, 6, 10, 9, 9, 8, 8)
        print(
            f"{'target':8s} {'prec':5s} {'c':>4s} "
            + " ".join(f"{n:>{w}s}" for n, w in zip(columns, widths, strict=True))
        )
        results: list[Result] = []
        for precision in precisions:
            if "engine" in args.targets:
                engine = Engine(files, precision=precision)
                print(f"# engine: {engine.precision} graph on {engine.provider}", flush=True)
                results += bench_engine(engine, payloads, args)
                del engine
            results += run_servers(tag, files, precision, payloads, args, Path(workdir))
        print_targets(results, high=max(args.concurrency), low=min(args.concurrency))
    if args.json:
        rows = [row_dict(result) for result in results]
        summary = {"model": files.tag, "graphs": sorted(files.graphs), "test_scale": files.test_scale}
        args.json.write_text(json.dumps({**summary, "images": len(payloads), "rows": rows}, indent=2) + "\n")
    return 0


def row_dict(result: Result) -> dict:
    return {
        "target": result.target,
        "precision": result.precision,
        "concurrency": result.concurrency,
        "completed": result.completed,
        "errors": result.errors,
        "images_per_s": round(result.throughput, 2),
        "p50_ms": round(result.percentile(50), 2),
        "p99_ms": round(result.percentile(99), 2),
        "mean_batch": None if result.mean_batch is None else round(result.mean_batch, 2),
        "cpu_ms_per_image": None if result.cpu_ms is None else round(result.cpu_ms, 2),
        "client_cpu_ms_per_request": None if result.client_cpu_ms is None else round(result.client_cpu_ms, 2),
    }


if __name__ == "__main__":
    raise SystemExit(main())
