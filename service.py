"""BentoML service: HTTP image classification with the exported VGG, batched into ONNX Runtime.

``bentoml serve`` (from the project root) serves ``vgg:latest`` from the BentoML model store,
or the tag / ``.onnx`` path in ``$VGG_MODEL``:

- ``POST /classify``: one image (multipart field ``image``), optional ``top_k``.
- ``POST /classify_batch``: several images (multipart field ``images``, repeated), optional ``top_k``.
- ``GET /model``: what is served (tag, architecture, labels, test scale, crop, TTA, precision,
  ONNX Runtime provider, validation top-1, workers), as JSON.
- ``GET /ui``: a page to try the model in a browser (``serving/page.py``, ``serving/static/``).
- ``GET /livez``, ``/readyz`` (ready once every worker is warmed up), ``/metrics`` (Prometheus),
  ``/`` (OpenAPI docs).

Both endpoints decode and resize each image in a worker thread (``vgg.preprocessing``: the
same functions as the export's reference check), then submit the uint8 ``Q x Q`` array to
one batchable inference method, :meth:`VGGClassifier.infer_batch`, through BentoML's adaptive
batching dispatcher: concurrent requests (and the images of one batch request) become one
ONNX Runtime call of up to ``VGG_MAX_BATCH_SIZE`` images.

``VGG_WORKERS`` worker processes (default: one per visible GPU, 1 on a CPU) each load their own
engine on their own GPU, or with their share of the CPU cores (:mod:`serving.workers`); the
graph's precision is chosen per device (``VGG_PRECISION``, :func:`serving.engine.choose_precision`).

Configuration (environment): see ``README.md, "Serving"`` and :class:`serving.settings.Settings`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import TypeVar

import bentoml
import numpy as np
from pydantic import BaseModel
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from serving.admission import Budget
from serving.batching import BatchDispatcher
from serving.engine import Engine, EngineError, load_engine, warm_up_sizes
from serving.guard import RequestGuard
from serving.images import ApiError, preprocess_upload
from serving.memory import keep_large_buffers_mapped
from serving.metrics import bound_endpoint_labels, inference_metrics
from serving.ort_thread import OrtThread
from serving.page import PAGE_PATH, PageMiddleware, page_url
from serving.settings import Settings, SettingsError
from serving.startup import check_start
from serving.workers import WarmBoard, configured_workers, cpu_threads, gpu_for_worker, visible_gpus, worker_index
from vgg.errors import one_line

logger = logging.getLogger("bentoml.vgg")

T = TypeVar("T")
DEFAULT_TOP_K = 5
SERVICE_NAME = "vgg"
WARMING_UP_RETRY_AFTER_S = 5


class Prediction(BaseModel):
    label: str
    index: int
    score: float


class Classification(BaseModel):
    label: str
    index: int
    score: float
    top: list[Prediction]
    model: str


def classification(probs: np.ndarray, *, top_k: int, labels: Sequence[str], model: str) -> Classification:
    """The answer for one image: the ``top_k`` classes by probability, best first."""
    order = np.argsort(-probs, kind="stable")[:top_k]
    top = [Prediction(label=labels[index], index=int(index), score=float(probs[index])) for index in order]
    return Classification(label=top[0].label, index=top[0].index, score=top[0].score, top=top, model=model)


def resolve_top_k(top_k: int | None, *, num_classes: int) -> int:
    """``top_k`` checked against the model; by default 5, or every class of a smaller model."""
    if top_k is None:
        return min(DEFAULT_TOP_K, num_classes)
    if not 1 <= top_k <= num_classes:
        raise ApiError(400, f"top_k must be between 1 and {num_classes}, got {top_k}")
    return top_k


async def infer_all(
    submit: Callable[[np.ndarray], Awaitable[np.ndarray]], arrays: Sequence[np.ndarray]
) -> list[np.ndarray]:
    """Submit every array to the batch dispatcher; an inference failure is a logged 503, not a 500."""
    try:
        return list(await asyncio.gather(*(submit(array) for array in arrays)))
    except ApiError:
        raise
    except Exception as error:  # ONNX Runtime raises its own types
        logger.exception("inference failed")
        raise ApiError(503, f"inference failed: {one_line(error)}") from None


def error_response(error: ApiError) -> JSONResponse:
    headers = {"Retry-After": str(error.retry_after)} if error.retry_after is not None else None
    return JSONResponse({"error": error.message}, status_code=error.status, headers=headers)


def served_test_scale() -> int | None:
    """The served model's test scale Q once this worker has loaded it (for the request guard)."""
    try:
        engine = bentoml.get_current_service().engine
    except Exception:  # noqa: BLE001 - no service instance yet
        return None
    return None if engine is None else engine.test_scale


async def model_info(_: Request) -> JSONResponse:
    """``GET /model``: what this server serves (see :meth:`VGGClassifier.describe`)."""
    try:
        return JSONResponse(bentoml.get_current_service().describe())
    except ApiError as error:
        return error_response(error)


# Plain GET routes next to the BentoML APIs (which are POST only).
info_app = Starlette(routes=[Route("/model", model_info, methods=["GET"])])


@bentoml.service(name=SERVICE_NAME, workers=configured_workers(), traffic={"timeout": 120})
@bentoml.asgi_app(info_app, path="/")
class VGGClassifier:
    """VGG (Simonyan & Zisserman, 2014) image classifier over ONNX Runtime."""

    @bentoml.on_deployment
    def check_before_start() -> None:
        """In the ``bentoml serve`` process, before any worker starts: a bad setting, a missing
        model or one that a worker could not open or run stops the server with one line
        instead of a worker restarting in a loop (:mod:`serving.startup`)."""
        try:
            tag = check_start()
        except (EngineError, SettingsError) as error:
            raise SystemExit(f"vgg service cannot start: {error}") from None
        logger.info("model to serve: %s, %d worker(s)", tag, configured_workers())

    def __init__(self) -> None:
        self.settings = Settings.from_env()
        self.workers = configured_workers()
        self.worker = worker_index()
        self._warm = WarmBoard(self.workers)
        self._warm.mark_cold(self.worker)
        bound_endpoint_labels(served_prefixes=(PAGE_PATH,))
        keep_large_buffers_mapped()
        self.engine: Engine | None = None  # loaded in the background, after the server accepts connections
        self.metrics = inference_metrics(max_batch_size=self.settings.max_batch_size)
        self._dispatcher = BatchDispatcher(
            self.infer_batch, max_batch_size=self.settings.max_batch_size, max_latency_ms=self.settings.max_latency_ms
        )
        self._submit = self._dispatcher.submit
        self._queued = Budget(
            self.settings.max_queued_images, setting="VGG_MAX_QUEUED_IMAGES", unit="images", small_share=None
        )
        self._ready = False
        self._failure: str | None = None
        self._starting: asyncio.Task | None = None
        self._ort = OrtThread()  # every ONNX Runtime call of this worker, one at a time

    @bentoml.on_startup
    async def start_in_background(self) -> None:
        """Load the engine and warm up in a background task: the server accepts connections
        meanwhile, ``/livez`` answers 200 and ``/readyz`` 503 until every batch size is warm."""
        self._starting = asyncio.create_task(self._load_and_warm_up())

    async def _load_and_warm_up(self) -> None:
        try:
            self.engine = await self._ort.run(
                functools.partial(
                    load_engine,
                    require_gpu=self.settings.require_gpu,
                    precision=self.settings.precision,
                    intra_op_threads=cpu_threads(self.workers),
                    gpu_id=gpu_for_worker(self.worker, visible_gpus()),
                )
            )
            logger.info(
                "worker %d/%d serving %s: %s graph on %s; batches of up to %d, max latency %d ms",
                self.worker,
                self.workers,
                self.engine.tag,
                self.engine.precision,
                self.engine.provider,
                self.settings.max_batch_size,
                self.settings.max_latency_ms,
            )
            await self._warm_up(self.engine)
        except asyncio.CancelledError:
            raise
        except Exception as error:  # noqa: BLE001 - reported once; the worker stays up, not ready
            self._failure = one_line(error, with_type=not isinstance(error, EngineError))
            logger.error("worker %d cannot serve: %s", self.worker, self._failure)

    async def _warm_up(self, engine: Engine) -> None:
        """Run every batch size the dispatcher will form, then train the dispatcher's latency
        model (with no latency limit: warm-up cannot fail on ``VGG_MAX_LATENCY_MS``)."""
        sizes = warm_up_sizes(self.settings.max_batch_size)
        await self._ort.run(engine.warm_up, sizes)
        blank = np.zeros((engine.test_scale, engine.test_scale, 3), dtype=np.uint8)
        with self._dispatcher.without_latency_limit():
            for _ in range(12):  # the dispatcher profiles its first calls one request at a time
                await self._submit(blank)
            for size in sizes:
                await asyncio.gather(*(self._submit(blank) for _ in range(size)))
        self._dispatcher.forget_queueing()
        self._ready = True
        self._warm.mark_warm(self.worker)
        logger.info("worker %d warmed up on batch sizes %s", self.worker, sizes)
        if self._warm.all_warm():
            logger.info("ready: try it in a browser at %s", page_url(SERVICE_NAME))

    @bentoml.on_shutdown
    async def release(self) -> None:
        self._warm.mark_cold(self.worker)
        if self._starting is not None and not self._starting.done():
            self._starting.cancel()  # a call under way goes on in its daemon thread; exit does not wait
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._starting

    def __is_ready__(self) -> bool:
        """Ready when this worker and every other worker of the server are warm."""
        return self._ready and self._warm.all_warm()

    def _serving_engine(self) -> Engine:
        """The engine once warm, else a 503 with ``Retry-After``."""
        if self._ready and self.engine is not None:
            return self.engine
        raise self._not_serving()

    def _not_serving(self) -> ApiError:
        if self._failure is not None:
            return ApiError(503, f"this worker cannot serve: {self._failure}")
        return ApiError(
            503,
            "warming up: the model is being loaded and warmed up, retry shortly",
            retry_after=WARMING_UP_RETRY_AFTER_S,
        )

    def describe(self) -> dict:
        """What is served: the engine's model and precision, and the number of workers. Like the
        APIs, a 503 with ``Retry-After`` until this worker is warm (the answer is then final)."""
        return {**self._serving_engine().describe(), "workers": self.workers}

    async def infer_batch(self, images: Sequence[np.ndarray]) -> list[np.ndarray]:
        """The one batchable inference method: ``[Q, Q, 3]`` uint8 images -> probabilities,
        as one ONNX Runtime call."""
        batch = np.stack(images)
        # A thread of its own: an inference never waits behind image decoding in the shared pool.
        engine = self.engine
        assert engine is not None, "inference before the engine is loaded"
        probs = await self._ort.run(engine.run, batch)
        self.metrics.observe(len(images))
        return list(probs)

    async def _preprocess(self, engine: Engine, path: Path, *, position: int | None) -> np.ndarray:
        """Decode one upload in a worker thread; in a batch, errors name the image's position."""
        try:
            return await asyncio.to_thread(
                preprocess_upload, path, test_scale=engine.test_scale, max_pixels=self.settings.max_pixels
            )
        except ApiError as error:
            if position is None:
                raise
            raise ApiError(
                error.status, f"images[{position}]: {error.message}", retry_after=error.retry_after
            ) from None

    async def _classify_paths(self, paths: Sequence[Path], top_k: int | None, *, batch: bool) -> list[Classification]:
        engine = self._serving_engine()
        top_k = resolve_top_k(top_k, num_classes=engine.num_classes)
        with self._queued.hold(len(paths)):  # VGG_MAX_QUEUED_IMAGES: refused at once past it
            arrays = await asyncio.gather(
                *(self._preprocess(engine, path, position=index if batch else None) for index, path in enumerate(paths))
            )
            probs = await infer_all(self._submit, arrays)
        return [classification(row, top_k=top_k, labels=engine.labels, model=engine.tag) for row in probs]

    @bentoml.api(route="/classify")
    async def classify(self, image: Path, top_k: int | None = None) -> Classification:
        """Classify one image (JPEG, PNG, WebP, BMP, GIF first frame, TIFF); ``top_k``: default 5,
        or all classes of a model with fewer."""
        try:
            (answer,) = await self._classify_paths([image], top_k, batch=False)
        except ApiError as error:
            return error_response(error)  # type: ignore[return-value]
        return answer

    @bentoml.api(route="/classify_batch")
    async def classify_batch(self, images: list[Path], top_k: int | None = None) -> list[Classification]:
        """Classify several images sent in one request; answers in the same order (``top_k``:
        default 5, or all classes of a model with fewer)."""
        try:
            if not images:
                raise ApiError(400, "no images: send one or more files in the 'images' field")
            if len(images) > self.settings.max_images_per_request:
                raise ApiError(
                    413, f"{len(images)} images in one request, limit is {self.settings.max_images_per_request}"
                )
            return await self._classify_paths(images, top_k, batch=True)
        except ApiError as error:
            return error_response(error)  # type: ignore[return-value]


VGGClassifier.add_asgi_middleware(PageMiddleware)
VGGClassifier.add_asgi_middleware(
    RequestGuard,
    paths={"/classify": "image", "/classify_batch": "images"},
    batch_paths=("/classify_batch",),
    test_scale=served_test_scale,
)
