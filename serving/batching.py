"""Adaptive batching: BentoML's dispatcher (the one behind ``@bentoml.api(batchable=True)``),
driven in-process.

A batchable ``@bentoml.api`` called from another endpoint of the same service goes through
BentoML's self-proxy, which re-serialises its arguments as JSON over an in-process HTTP call
(about 1 MB of text for one 256x256x3 image). Both endpoints instead submit the decoded
uint8 array directly to the same dispatcher class, with the same adaptive algorithm: it
learns the batch cost ``a * n + b`` online, waits for more requests only while the recent
queueing delay says that pays off, keeps at most one batch in flight, and answers requests
that cannot finish within ``max_latency_ms`` with a 503.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import Generic, TypeVar

from bentoml._internal.marshal.dispatcher import CorkDispatcher  # pinned: bentoml==1.4.40

from serving.admission import RETRY_AFTER_S
from serving.images import ApiError

__all__ = ["BatchDispatcher"]

WARM_UP_LATENCY_S = 24 * 3600.0  # the latency budget while warming up: none in practice

In = TypeVar("In")
Out = TypeVar("Out")


def _overloaded() -> None:
    """CorkDispatcher's answer when it drops a request, or when the awaiting task was cancelled."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():  # a disconnected client: stay cancelled, not a 503
        raise asyncio.CancelledError()
    raise ApiError(
        503,
        "overloaded: the request could not be served within the latency limit (VGG_MAX_LATENCY_MS), retry later",
        retry_after=RETRY_AFTER_S,
    )


def _check_internals(cork: CorkDispatcher) -> None:
    """Fail loudly, at start-up, if a BentoML upgrade changed the internals used here."""
    optimizer = getattr(cork, "optimizer", None)
    stats = getattr(optimizer, "o_stat", None)
    if (
        not isinstance(stats, collections.deque)
        or not hasattr(optimizer, "wait")
        or stats.maxlen is None
        or not isinstance(getattr(cork, "max_latency", None), float)
    ):
        raise RuntimeError(
            "bentoml's CorkDispatcher internals changed (optimizer.o_stat deque / optimizer.wait / max_latency): "
            "update serving/batching.py for this BentoML version"
        )


class BatchDispatcher(Generic[In, Out]):
    """``await dispatcher.submit(item)`` queues ``item``; ``infer_batch`` receives the batches."""

    def __init__(
        self,
        infer_batch: Callable[[Sequence[In]], Awaitable[Sequence[Out]]],
        *,
        max_batch_size: int,
        max_latency_ms: int,
    ) -> None:
        self._cork = CorkDispatcher(
            max_latency_in_ms=max_latency_ms,
            max_batch_size=max_batch_size,
            fallback=_overloaded,
            get_batch_size=lambda item: 1,
        )
        _check_internals(self._cork)
        self.submit: Callable[[In], Awaitable[Out]] = self._cork(infer_batch)

    @contextlib.contextmanager
    def without_latency_limit(self) -> Iterator[None]:
        """No request is dropped for the latency budget inside the block (warm-up: its first
        calls are slow by nature and must not fail, whatever ``max_latency_ms`` is)."""
        budget = self._cork.max_latency
        self._cork.max_latency = WARM_UP_LATENCY_S
        try:
            yield
        finally:
            self._cork.max_latency = budget

    def forget_queueing(self) -> None:
        """Keep the learnt batch cost, drop the queueing delays seen so far (after warm-up,
        whose bursts would otherwise make the first real requests wait for company)."""
        optimizer = self._cork.optimizer
        optimizer.o_stat = collections.deque(
            ((n, duration, 0.0) for n, duration, _ in optimizer.o_stat), maxlen=optimizer.o_stat.maxlen
        )
        optimizer.wait = 0.0
