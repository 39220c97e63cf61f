"""ONNX Runtime engine for the exported VGG graph (``images`` uint8 [N, Q, Q, 3] -> ``probs``).

One session, loaded once. CUDA when a GPU is usable (IO binding, exhaustive cuDNN algorithm
search, which pays off for VGG's fixed-size 3x3 convolutions, paper section 2.1; the fp16
graph when one is registered), else the CPU provider with one intra-op thread per physical
core. The service, its tests and ``bench/serve.py`` all use this module.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from vgg.errors import one_line

__all__ = ["EngineError", "ModelFiles", "Engine", "model_spec", "is_onnx_path", "resolve_model", "check_model", "load_engine", "warm_up_sizes", "HOW_TO_GET_A_MODEL"]

logger = logging.getLogger(__name__)

HOW_TO_GET_A_MODEL = (
    "train and register one with `python -m training.run --cfg D`, "
    "or export a checkpoint with `python -m export --checkpoint runs/<run>/best.pt`"
)


class EngineError(RuntimeError):
    """The model cannot be found, loaded or run as asked (one-line message)."""


@dataclass(frozen=True)
class ModelFiles:
    """Where a model's graphs are and what they need: the service's view of a store entry."""

    tag: str
    onnx_path: Path
    labels: list[str]
    scale: int
    fp16_path: Path | None = None
    metadata: dict[str, Any] = field(default_factory=dict)


def _labels_from_metadata(metadata: dict[str, Any], num_classes: int) -> list[str]:
    labels = metadata.get("labels")
    if isinstance(labels, str):
        try:
            labels = json.loads(labels)
        except ValueError:
            raise EngineError("metadata 'labels' is not a JSON list") from None
    if not labels:
        labels = [str(index) for index in range(num_classes)]
    if not isinstance(labels, list):
        raise EngineError("metadata 'labels' is not a list")
    return [str(label) for label in labels]


def _positive_int(metadata: dict[str, Any], key: str, *, where: str) -> int:
    """``metadata[key]`` as a positive int, or a one-line :class:`EngineError`."""
    value = metadata.get(key)
    try:
        number = int(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise EngineError(f"{where}: metadata {key!r} is {value!r}, not an integer: re-export the model") from None
    if number < 1 or (isinstance(value, float) and value != number):
        raise EngineError(f"{where}: metadata {key!r} is {value!r}, not a positive integer: re-export the model")
    return number


def _check_labels(labels: list[str], num_classes: Any, *, where: str) -> None:
    if isinstance(num_classes, int) and len(labels) != num_classes:
        raise EngineError(f"{where}: {len(labels)} labels for {num_classes} classes: re-export the model")


def _model_files_from_onnx(path: Path) -> ModelFiles:
    """A bare ``.onnx`` file: its metadata_props carry ``scale`` and ``labels``."""
    import onnxruntime as ort

    if not path.is_file():
        raise EngineError(f"{path}: no such ONNX file")
    try:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as error:  # ORT raises its own exception types
        raise EngineError(f"{path}: not a loadable ONNX model ({one_line(error)})") from None
    props = dict(session.get_modelmeta().custom_metadata_map)
    input_size = session.get_inputs()[0].shape[1]
    num_classes = session.get_outputs()[0].shape[-1]
    if "scale" in props:
        scale = _positive_int(props, "scale", where=str(path))
    elif isinstance(input_size, int):
        scale = input_size
    else:
        raise EngineError(f"{path}: the graph has no 'scale' metadata and a dynamic input size")
    labels = _labels_from_metadata(props, num_classes if isinstance(num_classes, int) else 0)
    _check_labels(labels, num_classes, where=str(path))
    return ModelFiles(tag=path.name, onnx_path=path, labels=labels, scale=scale, metadata=props)


def _store_labels(model: Any, metadata: dict[str, Any], num_classes: int) -> list[str]:
    from export.registry import model_classes

    try:
        return [str(label) for label in model_classes(model)]
    except (OSError, ValueError):
        return _labels_from_metadata(metadata, num_classes)


def _model_files_from_store(tag: str) -> ModelFiles:
    from bentoml.exceptions import NotFound

    from export.registry import MODEL_NAME, latest_model, model_files

    try:
        model = latest_model(tag)
    except NotFound:
        if tag in (MODEL_NAME, f"{MODEL_NAME}:latest"):
            raise EngineError(f"no '{MODEL_NAME}' model in the BentoML store: {HOW_TO_GET_A_MODEL}") from None
        raise EngineError(f"model {tag!r} is not in the BentoML store: {HOW_TO_GET_A_MODEL}") from None
    except ValueError as error:
        raise EngineError(f"{tag!r} is neither a model tag nor an .onnx path ({error})") from None
    except OSError as error:  # e.g. a mounted store the service's user cannot read
        raise EngineError(f"cannot read the BentoML store for {tag!r}: {error.strerror or error}") from None
    metadata, where = dict(model.info.metadata), f"model {model.tag}"
    graphs = model_files(model)
    if "fp32" not in graphs:
        raise EngineError(f"{where} has no model.onnx: re-export it")
    scale = _positive_int(metadata, "scale", where=where)
    num_classes = _positive_int(metadata, "num_classes", where=where) if "num_classes" in metadata else None
    labels = _store_labels(model, metadata, num_classes or 0)
    _check_labels(labels, num_classes, where=where)
    return ModelFiles(
        tag=str(model.tag), onnx_path=graphs["fp32"], labels=labels, scale=scale,
        fp16_path=graphs.get("fp16"), metadata=metadata,
    )


def model_spec(spec: str | None = None) -> str:
    """``spec``, else ``$VGG_MODEL``, else ``vgg:latest``."""
    return spec or os.environ.get("VGG_MODEL") or "vgg:latest"


def is_onnx_path(spec: str) -> bool:
    return spec.endswith(".onnx") or os.sep in spec


def resolve_model(spec: str | None = None) -> ModelFiles:
    """``spec``: a store tag (``vgg``, ``vgg:<version>``), a path to an ``.onnx`` file, or None
    for ``$VGG_MODEL`` or else ``vgg:latest``."""
    spec = model_spec(spec)
    if is_onnx_path(spec):
        return _model_files_from_onnx(Path(spec).expanduser())
    return _model_files_from_store(spec)


def check_model(spec: str | None = None, *, require_gpu: bool = False) -> str:
    """Fail fast, with a one-line :class:`EngineError`, when the service could not start.

    An ``.onnx`` path is opened (CPU session, metadata checked) so a junk file fails here,
    not in a restarting worker; a store entry's metadata is checked without a session.
    Returns the model's tag or file name."""
    if require_gpu and not _cuda_usable():
        raise EngineError(
            "VGG_REQUIRE_GPU=1 but no usable GPU: ONNX Runtime's CUDA provider, the NVIDIA driver "
            "or a visible GPU is missing"
        )
    spec = model_spec(spec)
    if is_onnx_path(spec) and not Path(spec).expanduser().is_file():
        raise EngineError(f"VGG_MODEL={spec}: no such ONNX file")
    return resolve_model(spec).tag


CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")


def cgroup_cpu_limit(cpu_max: Path = CGROUP_CPU_MAX) -> int | None:
    """CPUs allowed by a cgroup v2 quota (``docker run --cpus``), rounded up; None without one."""
    try:
        quota, period = cpu_max.read_text().split()[:2]
        return None if quota == "max" else max(1, math.ceil(int(quota) / int(period)))
    except (OSError, ValueError, ZeroDivisionError):
        return None


def physical_cores() -> int:
    """Physical cores, capped by the CPU affinity mask and the cgroup quota of a container."""
    import psutil

    cores = psutil.cpu_count(logical=False) or os.cpu_count() or 1
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else cores
    return max(1, min(cores, affinity, cgroup_cpu_limit() or cores))


def _cuda_device_count() -> int:
    """GPUs the NVIDIA driver can see (0 without a driver, or with CUDA_VISIBLE_DEVICES="")."""
    import ctypes

    try:
        driver = ctypes.CDLL("libcuda.so.1")  # the driver: absent on machines without a GPU
    except OSError:
        return 0
    count = ctypes.c_int(0)
    if driver.cuInit(0) != 0 or driver.cuDeviceGetCount(ctypes.byref(count)) != 0:
        return 0
    return count.value


def _cuda_usable() -> bool:
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return False
    return _cuda_device_count() > 0


def _open_session(files: ModelFiles, *, cuda: bool, intra_op_threads: int | None) -> tuple[Any, Path]:
    """CUDA: the fp16 graph when there is one, exhaustive cuDNN algorithm search. CPU: the
    fp32 graph, one intra-op thread per physical core, sequential execution."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if cuda:
        graph = files.fp16_path or files.onnx_path
        providers: list[Any] = [("CUDAExecutionProvider", {"cudnn_conv_algo_search": "EXHAUSTIVE"}), "CPUExecutionProvider"]
    else:
        graph = files.onnx_path
        options.intra_op_num_threads = intra_op_threads or physical_cores()
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        # No busy-waiting between calls: the cores are shared with image decoding and HTTP.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        providers = ["CPUExecutionProvider"]
    try:
        return ort.InferenceSession(str(graph), sess_options=options, providers=providers), graph
    except Exception as error:  # ORT raises its own exception types
        raise EngineError(f"{graph}: cannot create an ONNX Runtime session ({one_line(error)})") from None


class Engine:
    """An ORT session over the exported graph, with the model's labels and input size."""

    def __init__(self, files: ModelFiles, *, device: str = "auto", intra_op_threads: int | None = None) -> None:
        if device not in ("auto", "cuda", "cpu"):
            raise EngineError(f"device must be auto, cuda or cpu, not {device!r}")
        self.files = files
        self.tag = files.tag
        self.labels = files.labels
        self.scale = files.scale
        want_cuda = device == "cuda" or (device == "auto" and _cuda_usable())
        self.session, self.graph_path = _open_session(files, cuda=want_cuda, intra_op_threads=intra_op_threads)
        self.provider = self.session.get_providers()[0]
        if want_cuda and self.provider != "CUDAExecutionProvider":
            if device == "cuda":
                raise EngineError("a GPU was required but ONNX Runtime could not use CUDA (see its log above)")
            logger.warning("ONNX Runtime could not use CUDA: falling back to the CPU")
            self.session, self.graph_path = _open_session(files, cuda=False, intra_op_threads=intra_op_threads)
            self.provider = self.session.get_providers()[0]
        self.input_name = self.session.get_inputs()[0].name
        self.output_name = self.session.get_outputs()[0].name
        self.num_classes = len(self.labels)
        _check_labels(self.labels, self.session.get_outputs()[0].shape[-1], where=str(self.graph_path))
        self._gpu_batch_sizes: list[int] = []  # fixed shapes the GPU session was tuned for
        logger.info(
            "engine: %s on %s (%s), input %dx%d, %d classes",
            self.tag, self.provider, self.graph_path.name, self.scale, self.scale, self.num_classes,
        )

    @property
    def on_gpu(self) -> bool:
        return self.provider == "CUDAExecutionProvider"

    def run(self, images: np.ndarray) -> np.ndarray:
        """``images`` uint8 [N, Q, Q, 3] -> float32 probabilities [N, num_classes]."""
        images = np.ascontiguousarray(images, dtype=np.uint8)
        if images.ndim != 4 or images.shape[1:] != (self.scale, self.scale, 3):
            raise EngineError(f"expected uint8 [N, {self.scale}, {self.scale}, 3], got {list(images.shape)}")
        if self.on_gpu:
            return self._run_padded(images)
        (probs,) = self.session.run([self.output_name], {self.input_name: images})
        return np.asarray(probs, dtype=np.float32)

    def _run_padded(self, images: np.ndarray) -> np.ndarray:
        """On the GPU, pad to the next warmed-up batch size: cuDNN's exhaustive search then
        runs once per size at warm-up, never on a live request."""
        count = len(images)
        size = next((size for size in self._gpu_batch_sizes if size >= count), count)
        if size > count:
            padding = np.zeros((size - count, *images.shape[1:]), dtype=np.uint8)
            images = np.concatenate([images, padding])
        return self._run_io_binding(images)[:count]

    def _run_io_binding(self, images: np.ndarray) -> np.ndarray:
        import onnxruntime as ort

        binding = self.session.io_binding()
        binding.bind_ortvalue_input(self.input_name, ort.OrtValue.ortvalue_from_numpy(images, "cuda", 0))
        binding.bind_output(self.output_name, "cuda", 0)
        self.session.run_with_iobinding(binding)
        return np.asarray(binding.copy_outputs_to_cpu()[0], dtype=np.float32)

    def warm_up(self, batch_sizes: Sequence[int]) -> None:
        """Run each batch size once so allocations and cuDNN algorithm choices happen now."""
        for size in batch_sizes:
            self.run(np.zeros((size, self.scale, self.scale, 3), dtype=np.uint8))
        if self.on_gpu:
            self._gpu_batch_sizes = sorted(set(batch_sizes))


def warm_up_sizes(max_batch_size: int) -> list[int]:
    """Powers of two up to ``max_batch_size``, and ``max_batch_size`` itself."""
    sizes = [1 << power for power in range(max_batch_size.bit_length()) if 1 << power <= max_batch_size]
    return sorted(set(sizes + [max_batch_size]))


def load_engine(spec: str | None = None, *, require_gpu: bool = False, intra_op_threads: int | None = None) -> Engine:
    """Resolve ``spec`` (see :func:`resolve_model`) and open it, on the GPU when usable."""
    files = resolve_model(spec)
    return Engine(files, device="cuda" if require_gpu else "auto", intra_op_threads=intra_op_threads)
