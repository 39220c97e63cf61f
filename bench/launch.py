"""Start a server as a subprocess on a free loopback port, and always stop it (tests, bench)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import httpx

__all__ = ["REPO_ROOT", "free_port", "ServerFailed", "running_server", "bentoml_serve_command"]

REPO_ROOT = Path(__file__).resolve().parents[1]


class ServerFailed(RuntimeError):
    """The server exited or did not become ready in time (the message ends with its log tail)."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def bentoml_serve_command(port: int) -> list[str]:
    """``python -m bentoml serve``: works wherever bentoml is importable (a venv, or a
    ``pip install --target`` folder on PYTHONPATH, which puts no ``bentoml`` script next to
    the interpreter)."""
    return [
        sys.executable,
        "-m",
        "bentoml",
        "serve",
        "service:VGGClassifier",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]


def _log_tail(log_path: Path, lines: int = 40) -> str:
    text = log_path.read_text(errors="replace") if log_path.exists() else ""
    return "\n".join(text.splitlines()[-lines:])


def _wait_ready(process: subprocess.Popen, url: str, *, timeout_s: float, log_path: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise ServerFailed(f"server exited with code {process.returncode}:\n{_log_tail(log_path)}")
        try:
            if httpx.get(f"{url}/readyz", timeout=2.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    raise ServerFailed(f"server not ready after {timeout_s:.0f} s:\n{_log_tail(log_path)}")


def stop(process: subprocess.Popen, *, grace_s: float = 10.0) -> None:
    """SIGTERM the server's whole process group, SIGKILL it if it lingers."""
    if process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=grace_s)


@contextlib.contextmanager
def running_server(
    command: Sequence[str], *, port: int, env: Mapping[str, str], log_path: Path, timeout_s: float = 120.0
) -> Iterator[tuple[str, subprocess.Popen]]:
    """Run ``command`` (in its own process group, cwd = the repository) until ``/readyz`` is
    200; yield ``(base_url, process)``; stop the group on exit, whatever happened."""
    url = f"http://127.0.0.1:{port}"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            list(command), cwd=REPO_ROOT, env=dict(env), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        _wait_ready(process, url, timeout_s=timeout_s, log_path=log_path)
        yield url, process
    finally:
        stop(process)
