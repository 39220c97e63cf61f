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
import logging
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import bentoml
import numpy as np
from pydantic import BaseModel
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from serving.batching import BatchDispatcher
from serving.engine import Engine, EngineError, check_model, load_engine, warm_up_sizes
from serving.guard import RequestGuard
from serving.images import ApiError, preprocess_upload
from serving.metrics import inference_metrics
from serving.page import PageMiddleware, page_url
from serving.settings import Settings, SettingsError
from serving.workers import WarmBoard, configured_workers, cpu_threads, gpu_for_worker, visible_gpus, worker_index
from vgg.errors import one_line

logger = logging.getLogger("bentoml.vgg")

DEFAULT_TOP_K = 5
SERVICE_NAME = "vgg"


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
    return JSONResponse({"error": error.message}, status_code=error.status)


async def model_info(_: Request) -> JSONResponse:
    """``GET /model``: what this server serves (see :meth:`VGGClassifier.describe`)."""
    return JSONResponse(bentoml.get_current_service().describe())


# Plain GET routes next to the BentoML APIs (which are POST only).
info_app = Starlette(routes=[Route("/model", model_info, methods=["GET"])])


@bentoml.service(name=SERVICE_NAME, workers=configured_workers(), traffic={"timeout": 120})
@bentoml.asgi_app(info_app, path="/")
class VGGClassifier:
    """VGG (Simonyan & Zisserman, 2014) image classifier over ONNX Runtime."""

    @bentoml.on_deployment
    def check_before_start() -> None:
        """In the ``bentoml serve`` process, before any worker starts: a missing model or a bad
        setting stops the server with one line instead of a worker restarting in a loop."""
        try:
            settings = Settings.from_env()
            tag = check_model(require_gpu=settings.require_gpu, precision=settings.precision)
        except (EngineError, SettingsError) as error:
            raise SystemExit(f"vgg service cannot start: {error}") from None
        logger.info("model to serve: %s, %d worker(s)", tag, configured_workers())

    def __init__(self) -> None:
        self.settings = Settings.from_env()
        self.workers = configured_workers()
        self.worker = worker_index()
        self._warm = WarmBoard(self.workers)
        self._warm.mark_cold(self.worker)
        try:
            self.engine: Engine = load_engine(
                require_gpu=self.settings.require_gpu,
                precision=self.settings.precision,
                intra_op_threads=cpu_threads(self.workers),
                gpu_id=gpu_for_worker(self.worker, visible_gpus()),
            )
        except EngineError as error:
            logger.error("cannot start: %s", error)
            raise SystemExit(f"cannot start: {error}") from None
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
        self.metrics = inference_metrics(max_batch_size=self.settings.max_batch_size)
        self._dispatcher = BatchDispatcher(
            self.infer_batch, max_batch_size=self.settings.max_batch_size, max_latency_ms=self.settings.max_latency_ms
        )
        self._submit = self._dispatcher.submit
        self._inference_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vgg-ort")
        self._ready = False

    @bentoml.on_startup
    async def warm_up(self) -> None:
        """Run every batch size the dispatcher will form, then train the dispatcher's latency
        model, before ``/readyz`` answers 200."""
        sizes = warm_up_sizes(self.settings.max_batch_size)
        await asyncio.to_thread(self.engine.warm_up, sizes)
        blank = np.zeros((self.engine.test_scale, self.engine.test_scale, 3), dtype=np.uint8)
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
    def release(self) -> None:
        self._warm.mark_cold(self.worker)
        self._inference_thread.shutdown(wait=True)

    def __is_ready__(self) -> bool:
        """Ready when this worker and every other worker of the server are warm."""
        return self._ready and self._warm.all_warm()

    def describe(self) -> dict:
        """What is served: the engine's model and precision, and the number of workers."""
        return {**self.engine.describe(), "workers": self.workers}

    async def infer_batch(self, images: Sequence[np.ndarray]) -> list[np.ndarray]:
        """The one batchable inference method: ``[Q, Q, 3]`` uint8 images -> probabilities,
        as one ONNX Runtime call."""
        batch = np.stack(images)
        # Its own thread: an inference never waits behind image decoding in the shared pool.
        probs = await asyncio.get_running_loop().run_in_executor(self._inference_thread, self.engine.run, batch)
        self.metrics.observe(len(images))
        return list(probs)

    async def _preprocess(self, path: Path, *, position: int | None) -> np.ndarray:
        """Decode one upload in a worker thread; in a batch, errors name the image's position."""
        try:
            return await asyncio.to_thread(
                preprocess_upload, path, test_scale=self.engine.test_scale, max_pixels=self.settings.max_pixels
            )
        except ApiError as error:
            if position is None:
                raise
            raise ApiError(error.status, f"images[{position}]: {error.message}") from None

    async def _classify_paths(self, paths: Sequence[Path], top_k: int | None, *, batch: bool) -> list[Classification]:
        top_k = resolve_top_k(top_k, num_classes=self.engine.num_classes)
        arrays = await asyncio.gather(
            *(self._preprocess(path, position=index if batch else None) for index, path in enumerate(paths))
        )
        probs = await infer_all(self._submit, arrays)
        return [classification(row, top_k=top_k, labels=self.engine.labels, model=self.engine.tag) for row in probs]

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
VGGClassifier.add_asgi_middleware(RequestGuard, paths={"/classify": "image", "/classify_batch": "images"})
