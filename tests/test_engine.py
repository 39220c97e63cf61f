"""serving.engine on small hand-built ONNX graphs: malformed models fail with one EngineError line.

The graphs have the exported interface (``images`` uint8 [N, Q, Q, 3] -> ``probs`` [N, C]) but
no network: the mean colour of each image, softmaxed. Fast: no export, no server.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from export import registry
from serving import engine as engine_module
from serving.engine import Engine, EngineError, check_model, resolve_model

pytestmark = pytest.mark.usefixtures("bentoml_home")  # a fresh model store per test

SCALE = 4
CLASSES = ["red", "green", "blue"]


def mean_colour_graph(path: Path, *, props: dict[str, str]) -> Path:
    """``images`` uint8 [N, SCALE, SCALE, 3] -> softmax of the mean colour, [N, 3]."""
    nodes = [
        helper.make_node("Cast", ["images"], ["pixels"], to=TensorProto.FLOAT),
        helper.make_node("ReduceMean", ["pixels"], ["colour"], axes=[1, 2], keepdims=0),
        helper.make_node("Softmax", ["colour"], ["probs"], axis=1),
    ]
    graph = helper.make_graph(
        nodes, "mean_colour",
        [helper.make_tensor_value_info("images", TensorProto.UINT8, ["N", SCALE, SCALE, 3])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["N", len(CLASSES)])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    helper.set_model_props(model, props)
    onnx.save(model, str(path))
    return path


GOOD_PROPS = {"scale": str(SCALE), "labels": json.dumps(CLASSES)}


def test_a_well_formed_graph_is_served(tmp_path, monkeypatch):
    path = mean_colour_graph(tmp_path / "good.onnx", props=GOOD_PROPS)
    monkeypatch.setenv("VGG_MODEL", str(path))
    assert check_model() == "good.onnx"
    engine = Engine(resolve_model(), device="cpu", intra_op_threads=1)
    image = np.zeros((1, SCALE, SCALE, 3), dtype=np.uint8)
    image[..., 2] = 9  # blue
    assert engine.labels == CLASSES and int(engine.run(image).argmax()) == 2


@pytest.mark.parametrize(("props", "words"), [
    ({**GOOD_PROPS, "scale": "big"}, "metadata 'scale' is 'big', not an integer"),
    ({**GOOD_PROPS, "scale": "0"}, "not a positive integer"),
    ({**GOOD_PROPS, "labels": json.dumps(CLASSES[:2])}, "2 labels for 3 classes"),
    ({**GOOD_PROPS, "labels": "[not json"}, "'labels' is not a JSON list"),
], ids=["scale-not-int", "scale-zero", "labels-short", "labels-not-json"])
def test_malformed_onnx_metadata_is_one_engine_error(tmp_path, props, words):
    path = mean_colour_graph(tmp_path / "bad.onnx", props=props)
    with pytest.raises(EngineError, match=words) as error:
        check_model(str(path))
    assert "\n" not in str(error.value)


def test_junk_onnx_file_fails_the_start_up_check(tmp_path, monkeypatch):
    (tmp_path / "junk.onnx").write_bytes(b"this is not a model")
    monkeypatch.setenv("VGG_MODEL", str(tmp_path / "junk.onnx"))
    with pytest.raises(EngineError, match="not a loadable ONNX model"):
        check_model()


def register_entry(tmp_path: Path, *, metadata: dict, classes: list[str]) -> str:
    graph = mean_colour_graph(tmp_path / "model.onnx", props=GOOD_PROPS)
    (tmp_path / "classes.json").write_text(json.dumps(classes))
    files = {"model.onnx": graph, "classes.json": tmp_path / "classes.json"}
    return registry.register(files=files, labels={"cfg": "A"}, metadata=metadata)


@pytest.mark.parametrize(("metadata", "classes", "words"), [
    ({"num_classes": 3}, CLASSES, "metadata 'scale' is None, not an integer"),
    ({"scale": "4x4", "num_classes": 3}, CLASSES, "metadata 'scale' is '4x4'"),
    ({"scale": SCALE, "num_classes": 3}, CLASSES[:2], "2 labels for 3 classes"),
], ids=["no-scale", "scale-not-int", "labels-short"])
def test_malformed_store_entries_are_one_engine_error(tmp_path, metadata, classes, words):
    tag = register_entry(tmp_path, metadata=metadata, classes=classes)
    with pytest.raises(EngineError, match=words):
        check_model(tag)


def test_labels_that_do_not_fit_the_graph_fail_when_the_engine_opens(tmp_path):
    tag = register_entry(tmp_path, metadata={"scale": SCALE}, classes=CLASSES + ["purple"])
    with pytest.raises(EngineError, match="4 labels for 3 classes"):
        Engine(resolve_model(tag), device="cpu", intra_op_threads=1)


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
    import ctypes

    monkeypatch.setattr(ctypes, "CDLL", lambda name: FakeDriver(init_status, count))
    assert engine_module._cuda_device_count() == expected


def test_require_gpu_with_a_driver_but_no_visible_gpu_is_refused(tmp_path, monkeypatch):
    import ctypes

    import onnxruntime as ort

    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(ctypes, "CDLL", lambda name: FakeDriver(100, 0))  # CUDA_ERROR_NO_DEVICE
    with pytest.raises(EngineError, match="VGG_REQUIRE_GPU=1 but no usable GPU"):
        check_model(str(mean_colour_graph(tmp_path / "good.onnx", props=GOOD_PROPS)), require_gpu=True)


def test_an_unreadable_store_is_one_engine_error(monkeypatch):
    def unreadable(tag):
        raise PermissionError(13, "Permission denied", "/home/vgg/bentoml/models/vgg")

    monkeypatch.setattr(registry, "latest_model", unreadable)
    with pytest.raises(EngineError, match="cannot read the BentoML store for 'vgg:latest': Permission denied"):
        check_model()


@pytest.mark.parametrize(("text", "expected"), [
    ("max 100000\n", None), ("150000 100000\n", 2), ("50000 100000\n", 1), ("400000 100000", 4), ("junk", None),
])
def test_cgroup_cpu_limit(tmp_path, text, expected):
    (tmp_path / "cpu.max").write_text(text)
    assert engine_module.cgroup_cpu_limit(tmp_path / "cpu.max") == expected


def test_physical_cores_respect_a_container_quota(monkeypatch):
    monkeypatch.setattr(engine_module, "cgroup_cpu_limit", lambda: 1)
    assert engine_module.physical_cores() == 1
