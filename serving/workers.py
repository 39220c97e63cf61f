"""Server worker processes: how many, which GPU and how many CPU threads each, and whether all are warm.

``VGG_WORKERS`` (default: one per visible GPU, 1 on a CPU) sets the number of BentoML worker
processes. Worker ``i`` (BentoML's ``server_context.worker_index``, 1-based) pins GPU
``(i - 1) mod GPUs``; on the CPU the physical cores are divided among the workers. Each worker
has its own engine, batching and warm-up, and marks itself warm in a directory shared by the
server's workers (:class:`WarmBoard`), so any worker's ``/readyz`` can answer for all of them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from pathlib import Path

from serving.settings import Settings, SettingsError

__all__ = [
    "visible_gpus",
    "default_workers",
    "configured_workers",
    "worker_index",
    "gpu_for_worker",
    "cpu_threads",
    "WarmBoard",
]

logger = logging.getLogger(__name__)


def visible_gpus() -> int:
    """GPUs ONNX Runtime could run on: 0 without its CUDA provider or a visible GPU."""
    import onnxruntime as ort

    from serving.engine import _cuda_device_count

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return 0
    return _cuda_device_count()


def default_workers() -> int:
    """One worker per visible GPU, 1 on a CPU."""
    return max(1, visible_gpus())


def configured_workers() -> int:
    """``VGG_WORKERS``, else :func:`default_workers`. A bad value counts as 1 here: the
    service's start-up check then stops the server with a one-line error."""
    try:
        workers = Settings.from_env().workers
    except SettingsError:
        return 1
    return workers or default_workers()


def worker_index() -> int:
    """This process's worker number, 1-based (1 outside a BentoML worker)."""
    import bentoml

    return bentoml.server_context.worker_index or 1


def gpu_for_worker(index: int, gpus: int) -> int:
    """The CUDA device of worker ``index`` (1-based): round robin over ``gpus`` devices."""
    return (index - 1) % max(1, gpus)


def cpu_threads(workers: int) -> int:
    """Intra-op threads of one worker: the physical cores divided among ``workers``, at least 1."""
    from serving.engine import physical_cores

    return max(1, physical_cores() // workers)


class WarmBoard:
    """One file per warm worker, ``worker-<index>`` holding its pid, in a directory the
    server's workers share (BentoML's per-server Prometheus directory, which it empties at
    every start, else the temp directory; named after the parent process, the server).

    A worker that died and is being restarted has a stale file (dead pid): not warm."""

    def __init__(self, workers: int, *, root: Path | None = None) -> None:
        base = root or Path(os.environ.get("PROMETHEUS_MULTIPROC_DIR") or tempfile.gettempdir())
        self.directory = base / f"vgg-warm-{os.getuid()}-{os.getppid()}"
        self.workers = workers

    def _flag(self, index: int) -> Path:
        return self.directory / f"worker-{index}"

    def mark_cold(self, index: int) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._flag(index).unlink()

    def mark_warm(self, index: int) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        partial = self._flag(index).with_suffix(".partial")
        partial.write_text(str(os.getpid()))
        os.replace(partial, self._flag(index))

    def all_warm(self) -> bool:
        return all(self._is_warm(index) for index in range(1, self.workers + 1))

    def _is_warm(self, index: int) -> bool:
        import psutil

        try:
            pid = int(self._flag(index).read_text())
        except (OSError, ValueError):
            return False
        return psutil.pid_exists(pid)
