"""The worker's ONNX Runtime thread: one long-lived daemon thread, calls in order, results and
exceptions handed back to the awaiting task, cancelled calls skipped."""

from __future__ import annotations

import asyncio
import threading

import pytest

from serving.ort_thread import OrtThread


def test_calls_run_on_one_daemon_thread_in_order_and_return_their_results():
    seen: list[tuple[int, threading.Thread]] = []

    def work(index: int) -> int:
        seen.append((index, threading.current_thread()))
        return index * index

    async def main() -> list[int]:
        ort = OrtThread()
        return await asyncio.gather(*(ort.run(work, index) for index in range(6)))

    assert asyncio.run(main()) == [0, 1, 4, 9, 16, 25]
    assert [index for index, _ in seen] == list(range(6))
    threads = {thread for _, thread in seen}
    assert len(threads) == 1
    (thread,) = threads
    assert thread is not threading.main_thread() and thread.daemon and thread.name == "vgg-ort"


def test_an_exception_reaches_the_caller_and_the_thread_goes_on():
    def fail() -> None:
        raise ValueError("bad batch")

    async def main() -> int:
        ort = OrtThread()
        with pytest.raises(ValueError, match="bad batch"):
            await ort.run(fail)
        return await ort.run(lambda: 7)

    assert asyncio.run(main()) == 7


def test_a_cancelled_call_that_has_not_started_is_skipped():
    release = threading.Event()
    ran: list[str] = []

    def blocking() -> None:
        release.wait(5)
        ran.append("first")

    async def main() -> None:
        ort = OrtThread()
        first = asyncio.ensure_future(ort.run(blocking))
        await asyncio.sleep(0.05)  # the thread is inside the first call
        second = asyncio.ensure_future(ort.run(ran.append, "second"))
        await asyncio.sleep(0)
        second.cancel()
        release.set()
        await first
        assert await ort.run(ran.append, "third") is None

    asyncio.run(main())
    assert ran == ["first", "third"]
