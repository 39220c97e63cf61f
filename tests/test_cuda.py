"""ONNX Runtime's CUDA provider: library preloading and the one-line probe (CPU-side checks;
the ``gpu`` tests run on a machine with a CUDA GPU, e.g. through bench/gpu_check.sh)."""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from serving import cuda as cuda_module
from serving.engine import EngineError, check_model
from tests.helpers import REPO_ROOT, repo_env


def test_the_probe_model_is_what_onnx_writes():
    import onnxruntime as ort
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "probe", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8, producer_name="")
    assert model.SerializeToString() == cuda_module.PROBE_MODEL
    import numpy as np

    session = ort.InferenceSession(cuda_module.PROBE_MODEL, providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {"x": np.array([-2.0], dtype=np.float32)})
    assert out.tolist() == [0.0]


class FakeDriver:
    """libcuda.so.1 as seen with CUDA_VISIBLE_DEVICES="" (loads, but cuInit finds no device)."""

    def __init__(self, init_status: int, count: int) -> None:
        self.init_status, self.count = init_status, count

    def cuInit(self, flags):  # noqa: N802 (the driver's name)
        return self.init_status

    def cuDeviceGetCount(self, pointer):  # noqa: N802
        pointer._obj.value = self.count
        return 0


@pytest.mark.parametrize(("init_status", "count", "expected"), [(100, 0, 0), (0, 0, 0), (0, 2, 2)])
def test_cuda_device_count_asks_the_driver(monkeypatch, init_status, count, expected):
    monkeypatch.setattr(ctypes, "CDLL", lambda name, **_: FakeDriver(init_status, count))
    assert cuda_module.cuda_device_count() == expected


def test_require_gpu_with_a_driver_but_no_visible_gpu_is_one_line(tmp_path, monkeypatch):
    import onnxruntime as ort

    from tests.test_engine import GOOD_PROPS, mean_colour_graph

    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(ctypes, "CDLL", lambda name, **_: FakeDriver(100, 0))  # CUDA_ERROR_NO_DEVICE
    cuda_module.cuda_problem.cache_clear()
    try:
        with pytest.raises(EngineError, match="VGG_REQUIRE_GPU=1 but the GPU is not usable: no GPU visible") as caught:
            check_model(str(mean_colour_graph(tmp_path / "good.onnx", props=GOOD_PROPS)), require_gpu=True)
    finally:
        cuda_module.cuda_problem.cache_clear()
    assert "\n" not in str(caught.value)


def test_a_missing_provider_library_is_named(monkeypatch):
    """With a driver and a GPU but no cuBLAS anywhere, the reason is the loader's own line."""
    import onnxruntime as ort

    def cdll(name, **kwargs):
        if name == "libcuda.so.1":
            return FakeDriver(0, 1)
        if "cublasLt" in str(name):
            raise OSError(f"{name}: cannot open shared object file: No such file or directory")
        return object()  # every other library loads

    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(ctypes, "CDLL", cdll)
    monkeypatch.setattr(cuda_module, "preload_cuda_libraries", lambda: ())
    monkeypatch.setattr(cuda_module, "_ort_cuda_major", lambda: "13")
    cuda_module.cuda_problem.cache_clear()
    try:
        problem = cuda_module.cuda_problem()
    finally:
        cuda_module.cuda_problem.cache_clear()
    assert problem == (
        "ONNX Runtime's CUDA provider cannot load its libraries: "
        "libcublasLt.so.13: cannot open shared object file: No such file or directory"
    )


def _real_library() -> Path:
    """A real shared library to copy under CUDA's names (``ctypes`` loads it for real)."""
    return next(
        Path(p)
        for p in ("/lib/x86_64-linux-gnu/libz.so.1", "/usr/lib/x86_64-linux-gnu/libz.so.1", "/lib64/libz.so.1")
        if Path(p).exists()
    )


def _preload_from(monkeypatch, sites: list[Path]) -> tuple[tuple[str, ...], list[str]]:
    """Run the preloader with ``sites`` first on ``sys.path`` and ORT built for CUDA 13: the
    names it reports loaded, and every path handed to ``ctypes.CDLL``, in order."""
    loaded_paths: list[str] = []
    real_cdll = ctypes.CDLL

    def recording_cdll(name, **kwargs):
        loaded_paths.append(str(name))
        return real_cdll(name, **kwargs)

    monkeypatch.setattr(sys, "path", [*map(str, sites), *sys.path])
    monkeypatch.setattr(ctypes, "CDLL", recording_cdll)
    monkeypatch.setattr(cuda_module, "_ort_cuda_major", lambda: "13")
    for key in [key for key in sys.modules if key == "nvidia" or key.startswith("nvidia.")]:
        monkeypatch.delitem(sys.modules, key)
    return cuda_module.preload_cuda_libraries.__wrapped__(), loaded_paths


def test_preload_finds_pip_installed_libraries_on_sys_path(tmp_path, monkeypatch):
    """A site-packages folder that is not ORT's own (``pip install --target``) is searched too:
    its ``nvidia/*/lib`` libraries are loaded by full path, cuBLASLt before cuBLAS."""
    lib = tmp_path / "site" / "nvidia" / "cu13" / "lib"
    cudnn = tmp_path / "site" / "nvidia" / "cudnn" / "lib"
    lib.mkdir(parents=True)
    cudnn.mkdir(parents=True)
    for name in ("libcublas.so.13", "libcublasLt.so.13", "libcurand.so.10", "libcusparse.so.12"):
        shutil.copy(_real_library(), lib / name)
    shutil.copy(_real_library(), cudnn / "libcudnn.so.9")
    loaded, loaded_paths = _preload_from(monkeypatch, [tmp_path / "site"])
    assert {"libcublasLt.so.13", "libcublas.so.13", "libcurand.so.10", "libcudnn.so.9"} <= set(loaded)
    assert "libcusparse.so.12" not in loaded  # only what the provider needs
    ours = [Path(path).name for path in loaded_paths if path.startswith(str(tmp_path))]
    assert ours.index("libcublasLt.so.13") < ours.index("libcublas.so.13")


def test_preload_takes_a_library_from_the_first_site_packages_on_sys_path(tmp_path, monkeypatch):
    """Two site-packages holding the same library: the one earlier on ``sys.path`` is loaded,
    whatever the folders' names (here the later one sorts first)."""
    first, later = tmp_path / "z-first", tmp_path / "a-later"
    for site in (first, later):
        lib = site / "nvidia" / "cu13" / "lib"
        lib.mkdir(parents=True)
        shutil.copy(_real_library(), lib / "libcurand.so.10")
    loaded, loaded_paths = _preload_from(monkeypatch, [first, later])
    assert "libcurand.so.10" in loaded
    curand = [path for path in loaded_paths if path.endswith("libcurand.so.10")]
    assert curand[0] == str(first / "nvidia" / "cu13" / "lib" / "libcurand.so.10")
    assert not any(path.startswith(str(later)) for path in loaded_paths)


def test_without_a_gpu_the_probe_says_why_in_one_line():
    if cuda_module.cuda_device_count() > 0:
        pytest.skip("this machine has a GPU")
    problem = cuda_module.cuda_problem()
    assert problem is not None and "\n" not in problem


@pytest.mark.gpu
def test_cuda_session_without_torch_in_the_process():
    """The service's processes never import torch: the CUDA provider must work on its own."""
    if os.environ.get("VGG_CHECK_DEVICE", "cuda") != "cuda":
        pytest.skip("a dry run on the CPU")
    code = (
        "import sys; from serving.cuda import cuda_problem; problem = cuda_problem(); "
        "assert 'torch' not in sys.modules; print(problem)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, env=repo_env(), capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "None", result.stdout + result.stderr[-2000:]
