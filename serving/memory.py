"""Give decoded-image memory back to the system once a burst of large images is over.

glibc's malloc raises its mmap threshold (up to 32 MiB) after large blocks are freed, so the
buffers of later large images (Pillow allocates images in blocks of up to 16 MiB) come from
the heap arenas of the decoding threads, and a burst of large images leaves the worker's
resident size grown for good. A fixed threshold keeps every large buffer in its own mapping,
returned to the system when freed, and :func:`trim` hands back what the arenas keep free.
No-ops where the C library is not glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging

__all__ = ["MMAP_THRESHOLD_BYTES", "keep_large_buffers_mapped", "trim"]

logger = logging.getLogger(__name__)

M_MMAP_THRESHOLD = -3  # glibc mallopt parameter numbers (malloc.h)
MMAP_THRESHOLD_BYTES = 1024 * 1024  # larger allocations get their own mapping


@functools.lru_cache(maxsize=1)
def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


def keep_large_buffers_mapped() -> bool:
    """Fix malloc's mmap threshold at :data:`MMAP_THRESHOLD_BYTES` (call once per worker)."""
    libc = _libc()
    if libc is None:
        return False
    done = bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))
    logger.debug("malloc mmap threshold fixed at %d bytes: %s", MMAP_THRESHOLD_BYTES, done)
    return done


def trim() -> None:
    """Return the free memory of malloc's arenas to the system."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)
