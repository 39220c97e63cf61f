"""The service's settings, from environment variables (documented in README.md, "Serving")."""

from __future__ import annotations

import os
from dataclasses import dataclass

from vgg.preprocessing import DEFAULT_MAX_PIXELS

__all__ = ["Settings", "SettingsError", "PRECISION_CHOICES"]

PRECISION_CHOICES = ("auto", "fp32", "fp16", "int8")  # VGG_PRECISION


class SettingsError(ValueError):
    """An environment variable has a value the service cannot use."""


def _int_env(name: str, default: int | None, *, minimum: int) -> int | None:
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


def _choice_env(name: str, default: str, choices: tuple[str, ...]) -> str:
    value = os.environ.get(name, "").strip().lower() or default
    if value not in choices:
        raise SettingsError(f"{name}={value!r}: choose one of {', '.join(choices)}")
    return value


@dataclass(frozen=True)
class Settings:
    max_batch_size: int = 32  # VGG_MAX_BATCH_SIZE: images per ONNX Runtime call
    max_latency_ms: int = 30_000  # VGG_MAX_LATENCY_MS: queue + inference budget; later requests get 503
    max_body_bytes: int = 20 * 1024 * 1024  # VGG_MAX_BODY_BYTES: larger request bodies get 413
    max_pixels: int = DEFAULT_MAX_PIXELS  # VGG_MAX_PIXELS: decompression-bomb limit, checked from the header
    max_images_per_request: int = 64  # VGG_MAX_IMAGES_PER_REQUEST: /classify_batch limit
    require_gpu: bool = False  # VGG_REQUIRE_GPU=1: refuse to start on the CPU
    precision: str = (
        "auto"  # VGG_PRECISION: auto (fp16 on CUDA, int8 on the CPU, when the model has it), fp32, fp16, int8
    )
    workers: int | None = None  # VGG_WORKERS: server processes; None = one per visible GPU, 1 on a CPU

    @classmethod
    def from_env(cls) -> Settings:
        return cls(
            max_batch_size=_int_env("VGG_MAX_BATCH_SIZE", cls.max_batch_size, minimum=2),
            max_latency_ms=_int_env("VGG_MAX_LATENCY_MS", cls.max_latency_ms, minimum=1),
            max_body_bytes=_int_env("VGG_MAX_BODY_BYTES", cls.max_body_bytes, minimum=1),
            max_pixels=_int_env("VGG_MAX_PIXELS", cls.max_pixels, minimum=1),
            max_images_per_request=_int_env("VGG_MAX_IMAGES_PER_REQUEST", cls.max_images_per_request, minimum=1),
            require_gpu=os.environ.get("VGG_REQUIRE_GPU", "").strip().lower() in ("1", "true", "yes"),
            precision=_choice_env("VGG_PRECISION", cls.precision, PRECISION_CHOICES),
            workers=_int_env("VGG_WORKERS", None, minimum=1),  # type: ignore[arg-type]
        )
