"""Prometheus metrics of the inference batches actually formed (served on ``/metrics``)."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

__all__ = ["InferenceMetrics", "inference_metrics"]


@dataclass(frozen=True)
class InferenceMetrics:
    calls: Any  # Counter: ONNX Runtime calls
    images: Any  # Counter: images classified
    batch_size: Any  # Histogram: images per ONNX Runtime call

    def observe(self, batch_size: int) -> None:
        self.calls.inc()
        self.images.inc(batch_size)
        self.batch_size.observe(batch_size)


@functools.lru_cache(maxsize=None)
def inference_metrics(*, max_batch_size: int) -> InferenceMetrics:
    """Created on first use, inside the server worker: BentoML sets PROMETHEUS_MULTIPROC_DIR
    before the service is instantiated, so these land in the served registry."""
    import prometheus_client

    buckets = sorted({1 << power for power in range(max_batch_size.bit_length() + 1)} | {max_batch_size})
    return InferenceMetrics(
        calls=prometheus_client.Counter("vgg_inference_calls", "ONNX Runtime calls (one per batch formed)"),
        images=prometheus_client.Counter("vgg_inference_images", "Images classified"),
        batch_size=prometheus_client.Histogram(
            "vgg_inference_batch_size", "Images per ONNX Runtime call", buckets=[float(b) for b in buckets]
        ),
    )
