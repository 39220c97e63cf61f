"""The service's settings, from environment variables (documented in README.md, "Serving")."""

from __future__ import annotations

import os
from dataclasses import dataclass

from vgg.preprocessing import DEFAULT_MAX_PIXELS

__all__ = ["Settings", "SettingsError"]


class SettingsError(ValueError):
    """An environment variable has a value the service cannot use."""


def _int_env(name: str, default: int, *, minimum: int) -> int:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise SettingsError(f"{name}={raw!r} is not an integer") from None
    if value < minimum:
        raise SettingsError(f"{name}={value} must be at least {minimum}")
    return value


@dataclass(frozen=True)
class Settings:
    max_batch_size: int = 32  # VGG_MAX_BATCH_SIZE: images per ONNX Runtime call
    max_latency_ms: int = 30_000  # VGG_MAX_LATENCY_MS: queue + inference budget; later requests get 503
    max_body_bytes: int = 20 * 1024 * 1024  # VGG_MAX_BODY_BYTES: larger request bodies get 413
    max_pixels: int = DEFAULT_MAX_PIXELS  # VGG_MAX_PIXELS: decompression-bomb limit, checked from the header
    max_images_per_request: int = 64  # VGG_MAX_IMAGES_PER_REQUEST: /classify_batch limit
    require_gpu: bool = False  # VGG_REQUIRE_GPU=1: refuse to start on the CPU

    @classmethod
    def from_env(cls) -> "Settings":
        return cls(
            max_batch_size=_int_env("VGG_MAX_BATCH_SIZE", cls.max_batch_size, minimum=2),
            max_latency_ms=_int_env("VGG_MAX_LATENCY_MS", cls.max_latency_ms, minimum=1),
            max_body_bytes=_int_env("VGG_MAX_BODY_BYTES", cls.max_body_bytes, minimum=1),
            max_pixels=_int_env("VGG_MAX_PIXELS", cls.max_pixels, minimum=1),
            max_images_per_request=_int_env("VGG_MAX_IMAGES_PER_REQUEST", cls.max_images_per_request, minimum=1),
            require_gpu=os.environ.get("VGG_REQUIRE_GPU", "").strip().lower() in ("1", "true", "yes"),
        )
