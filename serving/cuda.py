"""Make ONNX Runtime's CUDA provider loadable, and find out for certain whether it works.

``onnxruntime-gpu``'s CUDA provider library links against the CUDA runtime, cuBLAS, cuRAND
(and loads cuDNN) by soname, with no RUNPATH. pip installs those libraries as ``nvidia-*``
wheels under ``site-packages/nvidia/<package>/lib``, where the dynamic loader does not look:
unless something (``import torch``) loaded them first, ORT silently falls back to the CPU.
:func:`preload_cuda_libraries` finds them on ``sys.path`` (any site-packages, also one that
is not ORT's own, e.g. after ``pip install --target``) and loads them by full path, so that
the provider's dependencies resolve to the already loaded copies.

:func:`cuda_problem` then opens a tiny session with the CUDA provider and says, in one line,
why CUDA is not usable (``None`` when it is).
"""

from __future__ import annotations

import ctypes
import functools
import glob
import importlib.util
import logging
import os
from pathlib import Path

from vgg.errors import one_line

__all__ = ["preload_cuda_libraries", "cuda_problem", "cuda_device_count", "PROBE_MODEL"]

logger = logging.getLogger(__name__)

# A one-node ONNX model (opset 13, IR 8: y = Relu(x), x and y float[1]), serialised. It is
# what `onnx.helper.make_model(make_graph([make_node("Relu", ["x"], ["y"])], "probe", ...))`
# writes (tests/test_cuda.py rebuilds it with onnx and compares): serving ships without onnx.
PROBE_MODEL = (
    b'\x08\x08\x12\x00:7\n\x0c\n\x01x\x12\x01y"\x04Relu\x12\x05probeZ\x0f\n\x01x\x12\n\n\x08\x08\x01'
    b"\x12\x04\n\x02\x08\x01b\x0f\n\x01y\x12\n\n\x08\x08\x01\x12\x04\n\x02\x08\x01B\x04\n\x00\x10\r"
)

# Load order matters: cuBLAS needs cuBLASLt, cuDNN's sub-libraries are loaded after its graph
# library. '{cuda}' is ORT's CUDA major version; the other majors are fixed by the toolkit.
_LIBRARIES = (
    "libcudart.so.{cuda}",
    "libcublasLt.so.{cuda}",
    "libcublas.so.{cuda}",
    "libcurand.so.10",
    "libcufft.so.*",
    "libnvrtc.so.{cuda}",
    "libcudnn_graph.so.9",
    "libcudnn.so.9",
    "libcudnn_*.so.9",
)


def _ort_cuda_major() -> str | None:
    try:
        from onnxruntime.capi import build_and_package_info as info
    except ImportError:
        return None
    version = getattr(info, "cuda_version", "") or ""
    return version.split(".")[0] or None


def _nvidia_library_dirs() -> list[Path]:
    """Every ``nvidia/**/lib`` folder of the namespace package ``nvidia`` on ``sys.path``, in
    ``sys.path`` order: where two site-packages hold the same library, the one Python would
    import from first wins, as it would for a module."""
    try:
        spec = importlib.util.find_spec("nvidia")
    except (ImportError, ValueError):
        return []
    roots = list(spec.submodule_search_locations or []) if spec else []
    folders = (
        Path(lib) for root in roots for lib in sorted(glob.glob(os.path.join(root, "**", "lib"), recursive=True))
    )
    return list(dict.fromkeys(folders))


@functools.cache
def preload_cuda_libraries() -> tuple[str, ...]:
    """Load the pip-installed CUDA and cuDNN libraries ORT's CUDA provider needs (once per
    process); returns the file names loaded. A library found in none of the folders is left
    to the system's loader path (a CUDA toolkit installed system-wide, as in the CUDA Docker
    images)."""
    major = _ort_cuda_major()
    if major is None:
        return ()
    folders = _nvidia_library_dirs()
    candidates = [
        path for pattern in _LIBRARIES for folder in folders for path in sorted(folder.glob(pattern.format(cuda=major)))
    ]
    loaded: list[str] = []
    for _ in range(2):  # a second pass loads what needed a library found later in the list
        for path in candidates:
            if path.name in loaded:
                continue
            try:
                ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)
                loaded.append(path.name)
            except OSError as error:
                logger.debug("could not preload %s: %s", path, error)
    if loaded:
        logger.debug("preloaded CUDA libraries: %s", ", ".join(loaded))
    return tuple(loaded)


def cuda_device_count() -> int:
    """GPUs the NVIDIA driver can see (0 without a driver, or with CUDA_VISIBLE_DEVICES="")."""
    try:
        driver = ctypes.CDLL("libcuda.so.1")  # the driver: absent on machines without a GPU
    except OSError:
        return 0
    count = ctypes.c_int(0)
    if driver.cuInit(0) != 0 or driver.cuDeviceGetCount(ctypes.byref(count)) != 0:
        return 0
    return count.value


def _missing_provider_dependency() -> str | None:
    """The first shared library the CUDA provider needs that cannot be loaded, as the
    loader's one-line reason."""
    major = _ort_cuda_major() or "13"
    for soname in (
        f"libcudart.so.{major}",
        f"libcublasLt.so.{major}",
        f"libcublas.so.{major}",
        "libcurand.so.10",
        "libcudnn.so.9",
    ):
        try:
            ctypes.CDLL(soname)
        except OSError as error:
            return one_line(error) if str(error).strip() else soname
    return None


@functools.cache
def cuda_problem() -> str | None:
    """``None`` when ONNX Runtime can run a session on the GPU, else one line saying why not.

    Cached per process: the answer does not change while it runs."""
    try:
        import onnxruntime as ort
    except ImportError as error:
        return f"onnxruntime cannot be imported ({error})"
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return f"this onnxruntime {ort.__version__} has no CUDA provider (install onnxruntime-gpu)"
    if cuda_device_count() == 0:
        return "no GPU visible to the NVIDIA driver (no driver, no device, or CUDA_VISIBLE_DEVICES hides them)"
    preload_cuda_libraries()
    missing = _missing_provider_dependency()
    if missing is not None:
        return f"ONNX Runtime's CUDA provider cannot load its libraries: {missing}"
    options = ort.SessionOptions()
    options.log_severity_level = 3  # the reason is reported here, not as ORT's multi-line warning
    try:
        session = ort.InferenceSession(PROBE_MODEL, sess_options=options, providers=["CUDAExecutionProvider"])
    except Exception as error:  # ORT raises its own exception types
        text = str(error).strip().splitlines()
        return f"ONNX Runtime cannot create a CUDA session: {text[0] if text else type(error).__name__}"
    if session.get_providers()[0] != "CUDAExecutionProvider":
        return "ONNX Runtime created the session on the CPU instead of CUDA (CUDA/cuDNN version mismatch?)"
    return None
