"""serving.batching and the service's inference path, in-process with BentoML's real dispatcher.

Deterministic: a batch is held in flight (an asyncio.Event) while more requests queue, so
the fusing the service relies on is observed without timing assumptions. These tests also
fail loudly if a BentoML upgrade changes the CorkDispatcher internals serving/batching.py uses.
"""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from service import infer_all, resolve_top_k
from serving import batching
from serving.batching import BatchDispatcher
from serving.images import ApiError

MAX_BATCH = 16


class HeldInference:
    """``infer_batch`` that records batch sizes and holds each call until ``release``."""

    def __init__(self) -> None:
        self.sizes: list[int] = []
        self.started = asyncio.Event()
        self.release = asyncio.Event()

    async def __call__(self, items):
        self.sizes.append(len(items))
        self.started.set()
        await self.release.wait()
        return [item * 10 for item in items]


async def fused_sizes(queued: int) -> tuple[list[int], list[int], BatchDispatcher]:
    inference = HeldInference()
    dispatcher = BatchDispatcher(inference, max_batch_size=MAX_BATCH, max_latency_ms=60_000)
    first = asyncio.ensure_future(dispatcher.submit(1))
    await inference.started.wait()  # one batch in flight: everything else must queue
    rest = [asyncio.ensure_future(dispatcher.submit(2 + index)) for index in range(queued)]
    await asyncio.sleep(0.05)
    inference.release.set()
    results = await asyncio.gather(first, *rest)
    return inference.sizes, results, dispatcher


def test_requests_queued_behind_a_running_batch_are_fused():
    sizes, results, _ = asyncio.run(fused_sizes(40))
    assert results == [10 * (1 + index) for index in range(41)]  # answers stay with their requests
    assert sizes == [1, 16, 16, 8]


def test_forget_queueing_works_on_this_bentoml_version():
    async def scenario():
        _, _, dispatcher = await fused_sizes(40)
        optimizer = dispatcher._cork.optimizer
        logged = list(optimizer.o_stat)  # BentoML skips its first N_SKIPPED_SAMPLE batches
        assert logged and all(len(entry) == 3 for entry in logged), f"o_stat entries changed: {logged}"
        optimizer.log_outbound(n=8, wait=0.5, duration=0.01)  # a batch that waited for company
        optimizer.wait = 0.5
        dispatcher.forget_queueing()
        return optimizer, [entry[:2] for entry in logged] + [(8, 0.01)]

    optimizer, kept = asyncio.run(scenario())
    assert optimizer.wait == 0.0
    assert [entry[:2] for entry in optimizer.o_stat] == kept  # the batch cost is kept
    assert all(entry[2] == 0.0 for entry in optimizer.o_stat)


def test_changed_dispatcher_internals_fail_loudly(monkeypatch):
    class ChangedCork:
        def __init__(self, **kwargs):
            self.optimizer = SimpleNamespace(stats=[])

    monkeypatch.setattr(batching, "CorkDispatcher", ChangedCork)
    with pytest.raises(RuntimeError, match="CorkDispatcher internals changed"):
        BatchDispatcher(HeldInference(), max_batch_size=MAX_BATCH, max_latency_ms=1000)


def test_inference_failure_is_a_503_for_every_request_of_the_batch():
    async def failing(items):
        raise RuntimeError("[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : CUDA failure 700\nmore detail")

    async def scenario():
        dispatcher = BatchDispatcher(failing, max_batch_size=MAX_BATCH, max_latency_ms=60_000)
        with pytest.raises(ApiError) as error:
            await infer_all(dispatcher.submit, [1, 2, 3])
        return error.value

    error = asyncio.run(scenario())
    assert error.status == 503 and error.message.startswith("inference failed: [ONNXRuntimeError]")
    assert "\n" not in error.message


def test_a_cancelled_request_stays_cancelled():
    """A client that disconnects cancels its handler: that must not turn into a 503 answer."""

    async def scenario():
        inference = HeldInference()
        dispatcher = BatchDispatcher(inference, max_batch_size=MAX_BATCH, max_latency_ms=60_000)
        first = asyncio.ensure_future(dispatcher.submit(1))
        await inference.started.wait()
        waiting = asyncio.ensure_future(dispatcher.submit(2))
        await asyncio.sleep(0.01)
        waiting.cancel()
        outcome = (await asyncio.gather(waiting, return_exceptions=True))[0]
        inference.release.set()
        await first
        return outcome

    assert isinstance(asyncio.run(scenario()), asyncio.CancelledError)


@pytest.mark.parametrize(
    ("top_k", "num_classes", "expected"), [(None, 10, 5), (None, 3, 3), (None, 5, 5), (7, 10, 7), (3, 3, 3)]
)
def test_top_k_defaults_to_five_or_every_class(top_k, num_classes, expected):
    assert resolve_top_k(top_k, num_classes=num_classes) == expected


@pytest.mark.parametrize(("top_k", "num_classes"), [(0, 10), (11, 10), (-1, 3), (5, 3)])
def test_top_k_out_of_range_is_400(top_k, num_classes):
    with pytest.raises(ApiError, match=f"top_k must be between 1 and {num_classes}") as error:
        resolve_top_k(top_k, num_classes=num_classes)
    assert error.value.status == 400
