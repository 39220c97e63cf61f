"""Adaptive batching: BentoML's dispatcher (the one behind ``@bentoml.api(batchable=True)``),
driven in-process.

A batchable ``@bentoml.api`` called from another endpoint of the same service goes through
BentoML's self-proxy, which re-serialises its arguments as JSON over an in-process HTTP call
(about 1 MB of text for one 256x256x3 image). Both endpoints instead submit the decoded
uint8 array directly to the same dispatcher class, with the same adaptive algorithm: it
learns the batch cost ``a * n + b`` online and waits for more requests only while that
keeps latency low; requests that cannot finish within ``max_latency_ms`` get a 503.
"""

from __future__ import annotations

from typing import Awaitable, Callable, Sequence, TypeVar

from bentoml._internal.marshal.dispatcher import CorkDispatcher  # pinned: bentoml==1.4.40

from serving.images import ApiError

__all__ = ["make_dispatcher"]

In = TypeVar("In")
Out = TypeVar("Out")


def _overloaded() -> None:
    raise ApiError(503, "overloaded: the request could not be served within the latency limit, retry later")


def make_dispatcher(
    infer_batch: Callable[[Sequence[In]], Awaitable[Sequence[Out]]], *, max_batch_size: int, max_latency_ms: int
) -> Callable[[In], Awaitable[Out]]:
    """``submit(item)`` that queues ``item``; ``infer_batch`` receives the batches formed."""
    dispatcher = CorkDispatcher(
        max_latency_in_ms=max_latency_ms,
        max_batch_size=max_batch_size,
        fallback=_overloaded,
        get_batch_size=lambda item: 1,
    )
    return dispatcher(infer_batch)
