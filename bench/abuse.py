"""Abuse benchmark: is an ordinary client still served while others attack, and does the
worker's memory come back? Loopback only, every loop bounded in time.

Against one ``bentoml serve`` (default settings; ``bench/serve.py``'s tiny VGG-A, served as int8
on a CPU by default, or ``--model``), one ordinary client sends a photo to ``POST /classify`` one request at a
time, in four phases:

1. ``alone``: nobody else;
2. ``bombs``: 4 clients send ``/classify_batch`` requests of 64 tiny GIFs that each declare a
   7000 x 7000 screen (~49 Mpixels decoded, 43 bytes sent), back to back;
3. ``admitted bombs``: the same 4 clients send 4 such GIFs per request (196 Mpixels: under the
   per-request cap, so they are decoded: real CPU and memory load);
4. ``stalled uploads``: 40 connections declare a 19 MiB body, send 1 MiB and stall.

Per phase: the ordinary client's p50 / p99 latency and status counts, the attackers' status
counts, and the worker's peak resident memory; then the worker's resident memory once the
attack is over, against its idle size (target: within 20%; ordinary p99 within 2 s).

    .venv/bin/python bench/abuse.py                      # ~4 minutes on 2 cores
    .venv/bin/python bench/abuse.py --seconds 20 --json out.json
"""

from __future__ import annotations

import argparse
import collections
import io
import json
import os
import platform
import socket
import struct
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import numpy as np
import psutil
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from bench.launch import bentoml_serve_command, free_port, running_server  # noqa: E402
from bench.serve import synthetic_model  # noqa: E402

PHOTOS = REPO_ROOT.parent / "shared" / "data" / "photos"
ABUSERS = 4
STALLERS = 40
SETTLE_S = 5.0  # after an attack, before memory is measured again


def gif_declaring(width: int, height: int) -> bytes:
    """A valid 1x1 GIF whose logical screen is ``width x height`` (decoded as a whole)."""
    buffer = io.BytesIO()
    Image.new("P", (1, 1)).save(buffer, "GIF")
    data = bytearray(buffer.getvalue())
    data[6:10] = struct.pack("<HH", width, height)
    return bytes(data)


def ordinary_photo() -> bytes:
    """A real photo (``../shared/data/photos``) or a generated 500 x 375 JPEG."""
    photos = sorted(PHOTOS.glob("*.jpg")) if PHOTOS.is_dir() else []
    if photos:
        return photos[0].read_bytes()
    pixels = np.random.default_rng(0).integers(0, 256, size=(375, 500, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def worker_rss_mb(server: psutil.Process) -> float:
    """Resident memory of the largest process under the server (the worker), in MB."""
    processes = [server, *server.children(recursive=True)]
    sizes = []
    for process in processes:
        try:
            sizes.append(process.memory_info().rss)
        except psutil.Error:
            pass
    return max(sizes) / 1e6


class Sampler(threading.Thread):
    """Samples the worker's resident memory every 0.2 s; keeps the peak."""

    def __init__(self, server: psutil.Process) -> None:
        super().__init__(daemon=True)
        self.server, self.peak, self.stop_event = server, 0.0, threading.Event()

    def run(self) -> None:
        while not self.stop_event.wait(0.2):
            self.peak = max(self.peak, worker_rss_mb(self.server))


def ordinary_client(
    url: str, photo: bytes, stop: threading.Event, deadline: float
) -> tuple[list[float], collections.Counter]:
    latencies, statuses = [], collections.Counter()
    with httpx.Client(base_url=url, timeout=60.0) as client:
        while not stop.is_set() and time.monotonic() < deadline:
            started = time.perf_counter()
            try:
                status = client.post("/classify", files={"image": ("photo.jpg", photo)}).status_code
            except httpx.HTTPError as error:
                status = type(error).__name__
            latencies.append(time.perf_counter() - started)
            statuses[status] += 1
            time.sleep(0.05)
    return latencies, statuses


def batch_abuser(url: str, images: list[bytes], deadline: float, statuses: collections.Counter) -> None:
    files = [("images", (f"{index}.gif", data)) for index, data in enumerate(images)]
    with httpx.Client(base_url=url, timeout=60.0) as client:
        while time.monotonic() < deadline:
            try:
                statuses[client.post("/classify_batch", files=files).status_code] += 1
            except httpx.HTTPError as error:
                statuses[type(error).__name__] += 1


def staller(port: int, hold_s: float, statuses: collections.Counter) -> None:
    """Declare 19 MiB, send 1 MiB, stall; record the server's answer (if any) within ``hold_s``."""
    head = (
        f"POST /classify HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; boundary=x\r\n"
        f"Content-Length: {19 * 1024 * 1024}\r\n\r\n"
    ).encode()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=hold_s) as connection:
            connection.sendall(head + b"--x\r\n" + b"\0" * (1024 * 1024 - 5))
            answer = connection.recv(64)
            statuses[answer.split(b" ")[1].decode() if answer.startswith(b"HTTP/1.1") else "closed"] += 1
    except OSError as error:
        statuses[type(error).__name__] += 1


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def run_phase(
    name: str,
    url: str,
    server: psutil.Process,
    photo: bytes,
    seconds: float,
    attack: Callable[[float, collections.Counter], list[threading.Thread]] | None,
) -> dict:
    deadline = time.monotonic() + seconds
    attackers: collections.Counter = collections.Counter()
    threads = attack(deadline, attackers) if attack else []
    sampler = Sampler(server)
    sampler.start()
    for thread in threads:
        thread.start()
    latencies, statuses = ordinary_client(url, photo, threading.Event(), deadline)
    for thread in threads:
        thread.join(timeout=120)
    sampler.stop_event.set()
    time.sleep(SETTLE_S)
    result = {
        "phase": name,
        "ordinary_requests": len(latencies),
        "ordinary_status": dict(statuses),
        "ordinary_p50_s": percentile(latencies, 50),
        "ordinary_p99_s": percentile(latencies, 99),
        "ordinary_max_s": max(latencies, default=float("nan")),
        "attacker_status": dict(attackers),
        "peak_rss_mb": sampler.peak,
        "rss_after_mb": worker_rss_mb(server),
    }
    print(json.dumps(result), flush=True)
    return result


def bombs(url: str, count: int) -> Callable[[float, collections.Counter], list[threading.Thread]]:
    images = [gif_declaring(7000, 7000)] * count

    def attack(deadline: float, statuses: collections.Counter) -> list[threading.Thread]:
        return [
            threading.Thread(target=batch_abuser, args=(url, images, deadline, statuses), daemon=True)
            for _ in range(ABUSERS)
        ]

    return attack


def stalls(port: int, hold_s: float) -> Callable[[float, collections.Counter], list[threading.Thread]]:
    def attack(deadline: float, statuses: collections.Counter) -> list[threading.Thread]:
        return [threading.Thread(target=staller, args=(port, hold_s, statuses), daemon=True) for _ in range(STALLERS)]

    return attack


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="store tag or .onnx path (default: a tiny VGG-A exported now)")
    parser.add_argument("--seconds", type=float, default=30.0, help="length of each phase")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()
    photo = ordinary_photo()
    with tempfile.TemporaryDirectory(prefix="vgg-abuse-") as scratch:
        os.environ.setdefault("BENTOML_DO_NOT_TRACK", "True")
        if args.model is None:  # a small VGG-A (fp32 + int8) in a temporary store
            os.environ["BENTOML_HOME"] = str(Path(scratch) / "bentoml")
        model = args.model or synthetic_model("tiny", Path(scratch))
        env = {**os.environ, "VGG_MODEL": model}
        port = free_port()
        with running_server(
            bentoml_serve_command(port), port=port, env=env, log_path=Path(scratch) / "server.log", timeout_s=300
        ) as (url, process):
            server = psutil.Process(process.pid)
            for _ in range(20):  # a few ordinary requests first: the idle size includes them
                httpx.post(f"{url}/classify", files={"image": ("photo.jpg", photo)}, timeout=60)
            time.sleep(SETTLE_S)
            idle = worker_rss_mb(server)
            served = httpx.get(f"{url}/model", timeout=30).json()
            print(
                f"# {served['tag']} ({served['cfg']}, Q {served['test_scale']}, {served['precision']} on "
                f"{served['provider']}); idle worker RSS {idle:.0f} MB; {platform.machine()}, {os.cpu_count()} CPUs",
                flush=True,
            )
            results = [
                run_phase("alone", url, server, photo, args.seconds, None),
                run_phase("bombs: 4 clients x 64 GIFs of 49 Mpx", url, server, photo, args.seconds, bombs(url, 64)),
                run_phase(
                    "admitted bombs: 4 clients x 4 GIFs of 49 Mpx", url, server, photo, args.seconds, bombs(url, 4)
                ),
                run_phase(
                    "stalled uploads: 40 x 19 MiB declared, 1 MiB sent",
                    url,
                    server,
                    photo,
                    args.seconds,
                    stalls(port, hold_s=45.0),
                ),
            ]
            log_tail = (Path(scratch) / "server.log").read_text(errors="replace")
    print_table(results, idle)
    print(f"server log: {log_tail.count('Traceback')} tracebacks")
    if args.json:
        args.json.write_text(json.dumps({"idle_rss_mb": idle, "phases": results}, indent=2))
    return 0


def print_table(results: list[dict], idle: float) -> None:
    header = (
        "| phase | ordinary p50 | ordinary p99 | ordinary answers | attackers' answers | peak RSS | RSS after / idle |"
    )
    print("\n" + header)
    print("|---|---|---|---|---|---|---|")
    for row in results:
        ordinary = ", ".join(f"{count} x {status}" for status, count in sorted(row["ordinary_status"].items(), key=str))
        attackers = ", ".join(
            f"{count} x {status}" for status, count in sorted(row["attacker_status"].items(), key=str)
        )
        print(
            f"| {row['phase']} | {row['ordinary_p50_s']:.3f} s | {row['ordinary_p99_s']:.3f} s | {ordinary} | "
            f"{attackers or '-'} | {row['peak_rss_mb']:.0f} MB | {row['rss_after_mb'] / idle:.2f} |"
        )


if __name__ == "__main__":
    sys.exit(main())
