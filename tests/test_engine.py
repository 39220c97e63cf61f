"""serving.engine on small hand-built ONNX graphs: malformed models fail with one EngineError line.

The graphs have the exported interface (``images`` uint8 [N, Q, Q, 3] -> ``probs`` [N, C]) but
no network: the mean colour of each image, softmaxed. Fast: no export, no server.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from serving import engine as engine_module
from serving.engine import Engine, EngineError, ModelFiles, check_model, choose_precision, resolve_model
from vgg import store

pytestmark = pytest.mark.usefixtures("bentoml_home")  # a fresh model store per test

SCALE = 4
CLASSES = ["red", "green", "blue"]


def mean_colour_graph(path: Path, *, props: dict[str, str], sign: float = 1.0) -> Path:
    """``images`` uint8 [N, SCALE, SCALE, 3] -> softmax of ``sign`` x the mean colour, [N, 3]."""
    nodes = [
        helper.make_node("Cast", ["images"], ["pixels"], to=TensorProto.FLOAT),
        helper.make_node("ReduceMean", ["pixels"], ["colour"], axes=[1, 2], keepdims=0),
        helper.make_node("Mul", ["colour", "sign"], ["signed"]),
        helper.make_node("Softmax", ["signed"], ["probs"], axis=1),
    ]
    graph = helper.make_graph(
        nodes,
        "mean_colour",
        [helper.make_tensor_value_info("images", TensorProto.UINT8, ["N", SCALE, SCALE, 3])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["N", len(CLASSES)])],
        initializer=[helper.make_tensor("sign", TensorProto.FLOAT, [], [sign])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    helper.set_model_props(model, props)
    onnx.save(model, str(path))
    return path


GOOD_PROPS = {"test_scale": str(SCALE), "labels": json.dumps(CLASSES)}


def test_a_well_formed_graph_is_served(tmp_path, monkeypatch):
    path = mean_colour_graph(tmp_path / "good.onnx", props=GOOD_PROPS)
    monkeypatch.setenv("VGG_MODEL", str(path))
    assert check_model() == "good.onnx"
    engine = Engine(resolve_model(), device="cpu", intra_op_threads=1)
    image = np.zeros((1, SCALE, SCALE, 3), dtype=np.uint8)
    image[..., 2] = 9  # blue
    assert engine.labels == CLASSES and int(engine.run(image).argmax()) == 2


def test_models_exported_before_the_test_scale_key_still_load(tmp_path):
    """Older exports carry Q as metadata "scale": a bare .onnx file and a store entry."""
    old_props = {"scale": str(SCALE), "labels": json.dumps(CLASSES)}
    path = mean_colour_graph(tmp_path / "old.onnx", props=old_props)
    assert resolve_model(str(path)).test_scale == SCALE
    graph = mean_colour_graph(tmp_path / "model.onnx", props=old_props)
    (tmp_path / "classes.json").write_text(json.dumps(CLASSES))
    files = {"model.onnx": graph, "classes.json": tmp_path / "classes.json"}
    tag = store.register(files=files, labels={"cfg": "A"}, metadata={"scale": SCALE, "num_classes": 3})
    engine = Engine(resolve_model(tag), device="cpu", intra_op_threads=1)
    assert engine.test_scale == SCALE and engine.labels == CLASSES


@pytest.mark.parametrize(
    ("props", "words"),
    [
        ({**GOOD_PROPS, "test_scale": "big"}, "metadata 'test_scale' is 'big', not an integer"),
        ({**GOOD_PROPS, "test_scale": "0"}, "not a positive integer"),
        ({**GOOD_PROPS, "labels": json.dumps(CLASSES[:2])}, "2 labels for 3 classes"),
        ({**GOOD_PROPS, "labels": "[not json"}, "'labels' is not a JSON list"),
    ],
    ids=["scale-not-int", "scale-zero", "labels-short", "labels-not-json"],
)
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
    return store.register(files=files, labels={"cfg": "A"}, metadata=metadata)


@pytest.mark.parametrize(
    ("metadata", "classes", "words"),
    [
        ({"num_classes": 3}, CLASSES, "metadata 'test_scale' is None, not an integer"),
        ({"test_scale": "4x4", "num_classes": 3}, CLASSES, "metadata 'test_scale' is '4x4'"),
        ({"scale": "4x4", "num_classes": 3}, CLASSES, "metadata 'scale' is '4x4'"),
        ({"test_scale": SCALE, "num_classes": 3}, CLASSES[:2], "2 labels for 3 classes"),
    ],
    ids=["no-scale", "scale-not-int", "old-key-scale-not-int", "labels-short"],
)
def test_malformed_store_entries_are_one_engine_error(tmp_path, metadata, classes, words):
    tag = register_entry(tmp_path, metadata=metadata, classes=classes)
    with pytest.raises(EngineError, match=words):
        check_model(tag)


def test_labels_that_do_not_fit_the_graph_fail_when_the_engine_opens(tmp_path):
    tag = register_entry(tmp_path, metadata={"test_scale": SCALE}, classes=CLASSES + ["purple"])
    with pytest.raises(EngineError, match="4 labels for 3 classes"):
        Engine(resolve_model(tag), device="cpu", intra_op_threads=1)


def test_an_unreadable_store_is_one_engine_error(monkeypatch):
    def unreadable(tag):
        raise PermissionError(13, "Permission denied", "/home/vgg/bentoml/models/vgg")

    monkeypatch.setattr(store, "latest_model", unreadable)
    with pytest.raises(EngineError, match="cannot read the BentoML store for 'vgg:latest': Permission denied"):
        check_model()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("max 100000\n", None),
        ("150000 100000\n", 2),
        ("50000 100000\n", 1),
        ("400000 100000", 4),
        ("junk", None),
    ],
)
def test_cgroup_cpu_limit(tmp_path, text, expected):
    (tmp_path / "cpu.max").write_text(text)
    assert engine_module.cgroup_cpu_limit(tmp_path / "cpu.max") == expected


# ---------------------------------------------------------------- precision per device


def graphs_of(*precisions: str) -> ModelFiles:
    return ModelFiles(
        tag="vgg:test", graphs={p: Path(f"{p}.onnx") for p in precisions}, labels=CLASSES, test_scale=SCALE
    )


@pytest.mark.parametrize(
    ("have", "device", "expected"),
    [
        (("fp32",), "cpu", "fp32"),
        (("fp32",), "cuda", "fp32"),
        (("fp32", "int8"), "cpu", "int8"),
        (("fp32", "int8"), "cuda", "fp32"),
        (("fp32", "fp16"), "cpu", "fp32"),
        (("fp32", "fp16"), "cuda", "fp16"),
        (("int8",), "cpu", "int8"),
        (("fp16",), "cuda", "fp16"),
    ],
)
def test_auto_precision_is_the_fastest_graph_the_device_runs(have, device, expected):
    assert choose_precision("auto", graphs_of(*have), device=device) == expected


@pytest.mark.parametrize(
    ("requested", "have", "device"),
    [
        ("fp32", ("fp32", "int8"), "cpu"),
        ("int8", ("fp32", "int8"), "cpu"),
        ("fp32", ("fp32", "fp16"), "cuda"),
        ("fp16", ("fp32", "fp16"), "cuda"),
    ],
)
def test_an_explicit_precision_the_model_and_device_have_is_served(requested, have, device):
    assert choose_precision(requested, graphs_of(*have), device=device) == requested


@pytest.mark.parametrize(
    ("requested", "have", "device", "words"),
    [
        (
            "int8",
            ("fp32",),
            "cpu",
            "VGG_PRECISION=int8: vgg:test has no int8 graph (it has fp32); export it with --precision int8",
        ),
        ("fp16", ("fp32", "int8"), "cuda", "has no fp16 graph (it has fp32+int8)"),
        ("fp16", ("fp32", "fp16"), "cpu", "the CPU this server runs on does not serve fp16 graphs"),
        ("int8", ("fp32", "int8"), "cuda", "the GPU (CUDA) this server runs on does not serve int8 graphs"),
        ("auto", ("fp16",), "cpu", "vgg:test has only fp16 graphs, which the CPU does not run"),
        ("bf16", ("fp32",), "cpu", "VGG_PRECISION='bf16': choose auto, fp32, fp16, int8"),
    ],
)
def test_a_precision_the_model_or_device_lacks_is_one_line(requested, have, device, words):
    with pytest.raises(EngineError, match=re.escape(words)) as error:
        choose_precision(requested, graphs_of(*have), device=device)
    assert "\n" not in str(error.value)


def register_graphs(tmp_path: Path, graphs: dict[str, Path]) -> str:
    (tmp_path / "classes.json").write_text(json.dumps(CLASSES))
    files = {store.ONNX_FILES[precision]: path for precision, path in graphs.items()}
    metadata = {
        "test_scale": SCALE,
        "num_classes": 3,
        "cfg": "A",
        "batch_norm": False,
        "crop": 3,
        "tta": "center",
        "val_top1": 0.5,
        "precisions": list(graphs),
    }
    return store.register(
        files={**files, "classes.json": tmp_path / "classes.json"}, labels={"cfg": "A"}, metadata=metadata
    )


def test_the_cpu_engine_serves_the_int8_graph_of_a_store_entry_by_default(tmp_path, monkeypatch):
    """Two graphs that answer differently: the engine's answers show which file it runs."""
    monkeypatch.setattr(engine_module, "_cuda_usable", lambda: False)
    fp32 = mean_colour_graph(tmp_path / "fp32.onnx", props=GOOD_PROPS)
    int8 = mean_colour_graph(tmp_path / "int8.onnx", props={**GOOD_PROPS, "precision": "int8"}, sign=-1.0)
    tag = register_graphs(tmp_path, {"fp32": fp32, "int8": int8})
    image = np.zeros((1, SCALE, SCALE, 3), dtype=np.uint8)
    image[..., 2] = 9  # blue: fp32 says blue, the sign-flipped "int8" graph says not blue
    engine = Engine(resolve_model(tag), intra_op_threads=1)
    assert (engine.precision, engine.provider, engine.graph_path.name) == (
        "int8",
        "CPUExecutionProvider",
        "model.int8.onnx",
    )
    assert int(engine.run(image).argmax()) != 2
    engine = Engine(resolve_model(tag), precision="fp32", intra_op_threads=1)
    assert (engine.precision, engine.graph_path.name, int(engine.run(image).argmax())) == ("fp32", "model.onnx", 2)
    described = engine.describe()
    assert described == {
        "tag": tag,
        "cfg": "A",
        "batch_norm": False,
        "num_classes": 3,
        "labels": CLASSES,
        "test_scale": SCALE,
        "crop": 3,
        "tta": "center",
        "precision": "fp32",
        "provider": "CPUExecutionProvider",
        "val_top1": 0.5,
    }


def test_a_gpu_session_that_fails_falls_back_to_the_cpus_precision(tmp_path, monkeypatch):
    """CUDA looked usable but its session failed (say, cuDNN missing): the CPU serves, with the
    graph the CPU prefers; with the GPU required, one EngineError."""
    fp32 = mean_colour_graph(tmp_path / "fp32.onnx", props=GOOD_PROPS)
    int8 = mean_colour_graph(tmp_path / "int8.onnx", props={**GOOD_PROPS, "precision": "int8"}, sign=-1.0)
    files = resolve_model(register_graphs(tmp_path, {"fp32": fp32, "int8": int8}))
    real_open = engine_module._open_session

    def no_cuda(graph, *, cuda, **options):
        if cuda:
            raise EngineError(f"{graph}: cannot create an ONNX Runtime session (libcudnn.so.9: not found)")
        return real_open(graph, cuda=False, **options)

    monkeypatch.setattr(engine_module, "_cuda_usable", lambda: True)
    monkeypatch.setattr(engine_module, "_open_session", no_cuda)
    engine = Engine(files, intra_op_threads=1)
    assert (engine.provider, engine.precision) == ("CPUExecutionProvider", "int8")
    with pytest.raises(EngineError, match="libcudnn"):
        Engine(files, device="cuda")
    with pytest.raises(EngineError, match="the GPU \\(CUDA\\) this server runs on does not serve int8"):
        Engine(files, precision="int8")  # an explicit precision the GPU does not serve is not a fallback


def test_a_bare_onnx_file_is_served_in_the_precision_its_metadata_names(tmp_path, monkeypatch):
    monkeypatch.setattr(engine_module, "_cuda_usable", lambda: False)
    props = {
        **GOOD_PROPS,
        "precision": "int8",
        "cfg": "D",
        "batch_norm": "true",
        "crop": "3",
        "tta": "five",
        "val_top1": "0.75",
    }
    path = mean_colour_graph(tmp_path / "m.onnx", props=props)
    assert check_model(str(path), precision="auto") == "m.onnx"
    engine = Engine(resolve_model(str(path)), intra_op_threads=1)
    assert engine.precision == "int8"
    assert {k: engine.describe()[k] for k in ("cfg", "batch_norm", "crop", "tta", "val_top1", "test_scale")} == {
        "cfg": "D",
        "batch_norm": True,
        "crop": 3,
        "tta": "five",
        "val_top1": 0.75,
        "test_scale": SCALE,
    }
    with pytest.raises(EngineError, match="VGG_PRECISION=fp32: m.onnx has no fp32 graph"):
        check_model(str(path), precision="fp32")
    old = mean_colour_graph(tmp_path / "old.onnx", props=GOOD_PROPS)  # exported before precisions were recorded
    assert Engine(resolve_model(str(old)), intra_op_threads=1).precision == "fp32"


def test_physical_cores_respect_a_container_quota(monkeypatch):
    monkeypatch.setattr(engine_module, "cgroup_cpu_limit", lambda: 1)
    assert engine_module.physical_cores() == 1
