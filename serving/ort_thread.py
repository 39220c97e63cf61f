"""The one thread of a worker that runs its ONNX Runtime calls (loading, warm-up, inference).

A daemon thread: an ONNX Runtime call cannot be interrupted, and a daemon thread does not hold
the worker's exit (SIGTERM during a long warm-up) until the call ends. A long-lived one: the
calling thread is one of ONNX Runtime's compute threads, and its per-thread scratch buffers
stay allocated from one call to the next, where a new thread per call allocated them afresh
every time (BENCHMARKS.md, "Serving"). Calls run one at a time, in the order submitted; the
batch dispatcher keeps at most one batch in flight anyway.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

__all__ = ["OrtThread"]

T = TypeVar("T")


def _settle(future: asyncio.Future, result: Any, error: BaseException | None) -> None:
    if future.done():  # the awaiting task was cancelled meanwhile
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


class OrtThread:
    """``await ort_thread.run(function, *args)``: ``function(*args)`` on the thread, started on
    first use; its result or exception comes back to the awaiting task."""

    def __init__(self, name: str = "vgg-ort") -> None:
        self.name = name
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None  # started on first use, from the event loop's thread

    async def run(self, function: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        future: asyncio.Future = loop.create_future()
        self._start()
        self._jobs.put((loop, future, function, args))
        return await future

    def _start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._serve, name=self.name, daemon=True)
            self._thread.start()

    def _serve(self) -> None:
        while True:
            loop, future, function, args = self._jobs.get()
            if future.cancelled():  # nobody waits for it any more
                continue
            try:
                outcome, failure = function(*args), None
            except BaseException as error:  # noqa: BLE001 - handed to the awaiting task
                outcome, failure = None, error
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
                loop.call_soon_threadsafe(_settle, future, outcome, failure)
