"""Prometheus metrics of the inference batches actually formed (served on ``/metrics``)."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

__all__ = ["InferenceMetrics", "inference_metrics", "bound_endpoint_labels", "route_label", "OTHER_ENDPOINT"]


@dataclass(frozen=True)
class InferenceMetrics:
    calls: Any  # Counter: ONNX Runtime calls
    images: Any  # Counter: images classified
    batch_size: Any  # Histogram: images per ONNX Runtime call

    def observe(self, batch_size: int) -> None:
        self.calls.inc()
        self.images.inc(batch_size)
        self.batch_size.observe(batch_size)


@functools.cache
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


OTHER_ENDPOINT = "other"  # the /metrics label of every path no route serves


def route_label(routes: list[Any], scope: dict[str, Any], *, depth: int = 0) -> str | None:
    """The route template serving ``scope`` (``/classify``, ``/static_content/{path}``), or
    None when no route does; looks into mounted apps' routes."""
    from starlette.routing import Match, Mount

    for route in routes:
        match, child = route.matches(scope)
        if match is Match.NONE:
            continue
        path = getattr(route, "path", "")
        inner_routes = getattr(route, "routes", None)
        if inner_routes and depth < 4:
            inner = route_label(inner_routes, {**scope, **child}, depth=depth + 1)
            if inner is not None:
                return path + inner
            continue  # a mount (such as one at "/") with no route for this path
        return path + "/{path}" if isinstance(route, Mount) else path
    return None


def prefix_label(path: str, prefixes: tuple[str, ...]) -> str | None:
    for prefix in prefixes:
        if path == prefix:
            return prefix
        if path.startswith(prefix + "/"):
            return prefix + "/{path}"
    return None


def bound_endpoint_labels(*, served_prefixes: tuple[str, ...] = ()) -> None:
    """Label BentoML's per-request metrics by route template, and every unknown path as
    ``other``: a scan of random URLs must not add one series per URL to ``/metrics``.
    ``served_prefixes``: paths answered by a middleware rather than a route (``/ui``): labelled
    ``/ui`` and ``/ui/{path}``.

    BentoML's traffic middleware labels by the raw request path and runs before the service's
    own middleware, so its ``__call__`` is wrapped (bentoml is pinned; checked loudly here).
    Idempotent; call it in the server worker."""
    from bentoml._internal.server.http.instruments import RunnerTrafficMetricsMiddleware as Traffic

    original = Traffic.__call__
    if getattr(original, "bounded_labels", False):
        return
    if not callable(getattr(Traffic, "_setup", None)):
        raise RuntimeError("bentoml's RunnerTrafficMetricsMiddleware changed: update serving/metrics.py")

    async def call(self: Any, scope: dict[str, Any], receive: Any, send: Any) -> None:
        app = scope.get("app")
        if scope.get("type") != "http" or scope.get("path") == "/metrics" or app is None:
            await original(self, scope, receive, send)
            return
        label = prefix_label(scope["path"], served_prefixes) or route_label(getattr(app, "routes", []), scope)
        label = label or OTHER_ENDPOINT
        if label == scope["path"]:
            await original(self, scope, receive, send)
            return
        await original(_Labelled(self, scope), {**scope, "path": label}, receive, send)

    call.bounded_labels = True  # type: ignore[attr-defined]
    Traffic.__call__ = call


class _Labelled:
    """The middleware as its ``__call__`` sees it, but whose inner app gets the real scope."""

    def __init__(self, middleware: Any, scope: dict[str, Any]) -> None:
        self._middleware, self._scope = middleware, scope

    def __getattr__(self, name: str) -> Any:
        return getattr(self._middleware, name)

    async def app(self, _labelled_scope: dict[str, Any], receive: Any, send: Any) -> None:
        await self._middleware.app(self._scope, receive, send)
