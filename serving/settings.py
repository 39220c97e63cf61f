"""The service's settings, from environment variables (documented in README.md, "Serving")."""

from __future__ import annotations

import os
from dataclasses import dataclass

from vgg.preprocessing import DEFAULT_MAX_PIXELS, PILLOW_LIMIT

__all__ = ["Settings", "SettingsError", "PRECISION_CHOICES", "BOUNDS"]

PRECISION_CHOICES = ("auto", "fp32", "fp16", "int8")  # VGG_PRECISION


class SettingsError(ValueError):
    """An environment variable has a value the service cannot use."""


def _int_env(name: str, default: int | None, *, minimum: int, maximum: int) -> int | None:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise SettingsError(f"{name}={raw!r} is not an integer") from None
    if not minimum <= value <= maximum:
        raise SettingsError(f"{name}={value} must be between {minimum} and {maximum}")
    return value


def _float_env(name: str, default: float, *, minimum: float, maximum: float) -> float:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise SettingsError(f"{name}={raw!r} is not a number") from None
    if not minimum <= value <= maximum:  # also refuses nan
        raise SettingsError(f"{name}={raw} must be between {minimum:g} and {maximum:g}")
    return value


def _choice_env(name: str, default: str, choices: tuple[str, ...]) -> str:
    value = os.environ.get(name, "").strip().lower() or default
    if value not in choices:
        raise SettingsError(f"{name}={value!r}: choose one of {', '.join(choices)}")
    return value


def _bool_env(name: str) -> bool:
    value = os.environ.get(name, "").strip().lower()
    if value in ("", "0", "false", "no", "off"):
        return False
    if value in ("1", "true", "yes", "on"):
        return True
    raise SettingsError(f"{name}={value!r}: use 1 or 0")


MiB = 1024 * 1024
SMALL_SHARE = 8  # 1/8 of the buffered-bytes and decode budgets is kept for requests of at most 1/8 of them

# name: (field, minimum, maximum). Every setting is checked against these documented bounds
# (README.md, "Serving") before any worker starts.
BOUNDS: dict[str, tuple[str, int, int]] = {
    "VGG_MAX_BATCH_SIZE": ("max_batch_size", 2, 256),
    "VGG_MAX_LATENCY_MS": ("max_latency_ms", 1, 600_000),
    "VGG_MAX_BODY_BYTES": ("max_body_bytes", 1024, 1024 * MiB),
    "VGG_MAX_BUFFERED_BYTES": ("max_buffered_bytes", 1024, 16 * 1024 * MiB),
    "VGG_MAX_PIXELS": ("max_pixels", 1, PILLOW_LIMIT),
    "VGG_MAX_REQUEST_PIXELS": ("max_request_pixels", 1, 10**10),
    "VGG_MAX_DECODE_PIXELS": ("max_decode_pixels", 1, 10**11),
    "VGG_MAX_IMAGES_PER_REQUEST": ("max_images_per_request", 1, 1024),
    "VGG_MAX_QUEUED_IMAGES": ("max_queued_images", 1, 65_536),
    "VGG_WORKERS": ("workers", 1, 64),
}
BODY_TIMEOUT_BOUNDS = (1.0, 3600.0)  # VGG_BODY_TIMEOUT_S


@dataclass(frozen=True)
class Settings:
    max_batch_size: int = 32  # VGG_MAX_BATCH_SIZE: images per ONNX Runtime call (and the largest warm-up batch)
    max_latency_ms: int = 30_000  # VGG_MAX_LATENCY_MS: queue + inference budget; later requests get 503
    max_body_bytes: int = 20 * MiB  # VGG_MAX_BODY_BYTES: larger request bodies get 413
    max_buffered_bytes: int = 100 * MiB  # VGG_MAX_BUFFERED_BYTES: request bodies held at once; past it 503
    body_timeout_s: float = 30.0  # VGG_BODY_TIMEOUT_S: a body not received in full by then is dropped (408)
    max_pixels: int = DEFAULT_MAX_PIXELS  # VGG_MAX_PIXELS: one image's declared pixels (413), from the header
    max_request_pixels: int = 200_000_000  # VGG_MAX_REQUEST_PIXELS: pixels one request decodes (413)
    max_decode_pixels: int = 400_000_000  # VGG_MAX_DECODE_PIXELS: pixels the worker decodes at once (503)
    max_images_per_request: int = 64  # VGG_MAX_IMAGES_PER_REQUEST: /classify_batch limit (413)
    max_queued_images: int = 256  # VGG_MAX_QUEUED_IMAGES: images waiting for or in inference (503)
    require_gpu: bool = False  # VGG_REQUIRE_GPU=1: refuse to start on the CPU
    precision: str = (
        "auto"  # VGG_PRECISION: auto (fp16 on CUDA, int8 on the CPU, when the model has it), fp32, fp16, int8
    )
    workers: int | None = None  # VGG_WORKERS: server processes; None = one per visible GPU, 1 on a CPU

    @classmethod
    def from_env(cls) -> Settings:
        values: dict = {}
        for name, (field, minimum, maximum) in BOUNDS.items():
            values[field] = _int_env(name, getattr(cls, field), minimum=minimum, maximum=maximum)
        settings = cls(
            **values,
            body_timeout_s=_float_env(
                "VGG_BODY_TIMEOUT_S", cls.body_timeout_s, minimum=BODY_TIMEOUT_BOUNDS[0], maximum=BODY_TIMEOUT_BOUNDS[1]
            ),
            require_gpu=_bool_env("VGG_REQUIRE_GPU"),
            precision=_choice_env("VGG_PRECISION", cls.precision, PRECISION_CHOICES),
        )
        settings.check_consistency()
        return settings

    def check_consistency(self) -> None:
        """The caps must nest: one request must fit in what the worker holds at once (less the
        share of the buffered-bytes and decode budgets kept for small requests)."""
        for small, large, share in (
            ("VGG_MAX_BODY_BYTES", "VGG_MAX_BUFFERED_BYTES", SMALL_SHARE),
            ("VGG_MAX_PIXELS", "VGG_MAX_REQUEST_PIXELS", None),
            ("VGG_MAX_REQUEST_PIXELS", "VGG_MAX_DECODE_PIXELS", SMALL_SHARE),
            ("VGG_MAX_IMAGES_PER_REQUEST", "VGG_MAX_QUEUED_IMAGES", None),
        ):
            small_value, large_value = getattr(self, BOUNDS[small][0]), getattr(self, BOUNDS[large][0])
            usable = large_value - large_value // share if share else large_value
            if small_value > usable:
                kept = f" less the 1/{share} kept for small requests" if share else ""
                raise SettingsError(
                    f"{small}={small_value} is larger than {large}={large_value}{kept}; raise {large} or lower {small}"
                )
