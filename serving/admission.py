"""Caps on what one server worker holds at once: request bytes buffered, pixels being decoded,
images waiting for inference. Past a cap a request is refused at once (503 with ``Retry-After``),
never queued without bound.

A :class:`Budget` keeps a share of its capacity (``small_share``) for small requests: a request
larger than that share is admitted only while the rest is free, so a few large requests (a
batch of images that each declare tens of megapixels, a big upload that stalls) cannot lock
out ordinary ones. All reservations happen on the server's event loop, so no lock is needed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from serving.images import ApiError
from serving.settings import SMALL_SHARE

__all__ = ["RETRY_AFTER_S", "SMALL_SHARE", "Budget"]

RETRY_AFTER_S = 1  # Retry-After of a 503 refused by a cap: the caps free up as requests finish


class Budget:
    """``capacity`` units (bytes, pixels, images) reserved and released by requests."""

    def __init__(self, capacity: int, *, setting: str, unit: str, small_share: int | None = SMALL_SHARE) -> None:
        self.capacity = capacity
        self.setting = setting
        self.unit = unit
        self.reserve = capacity // small_share if small_share else 0
        self.in_use = 0
        self.peak = 0

    def largest_request(self) -> int:
        """The most one request can ever be granted."""
        return self.capacity - self.reserve

    def try_reserve(self, amount: int) -> bool:
        limit = self.capacity if amount <= self.reserve else self.capacity - self.reserve
        if self.in_use + amount > limit:
            return False
        self.in_use += amount
        self.peak = max(self.peak, self.in_use)
        return True

    def release(self, amount: int) -> None:
        self.in_use = max(0, self.in_use - amount)

    def refusal(self, amount: int) -> ApiError:
        return ApiError(
            503,
            f"busy: this request needs {amount} {self.unit} and {self.in_use} of {self.capacity} are in use "
            f"({self.setting}); retry later",
            retry_after=RETRY_AFTER_S,
        )

    @contextlib.contextmanager
    def hold(self, amount: int) -> Iterator[None]:
        """Reserve ``amount`` for the block, or raise a 503 :class:`ApiError` at once."""
        if not self.try_reserve(amount):
            raise self.refusal(amount)
        try:
            yield
        finally:
            self.release(amount)
