"""int8 export (QDQ, per-channel) of a small trained model: agreement with fp32."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from bench import agreement
from export import ExportError, export_checkpoint
from export.check import image_files, load_graph_inputs, run_onnx, session
from tests.export_helpers import CLASS_COLOURS, SCALE, train_on_folder, write_checkpoint, write_colour_folder
from vgg import store

pytestmark = pytest.mark.usefixtures("bentoml_home")  # a fresh model store per test

CALIBRATION = 24
AGREEMENT = 60


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(checkpoint, data root): VGG-A trained a few steps on three colour classes."""
    root = write_colour_folder(tmp_path_factory.mktemp("colours"), per_class=(CALIBRATION + AGREEMENT) // 3 + 4)
    model = train_on_folder(root)
    checkpoint = write_checkpoint(
        tmp_path_factory.mktemp("run") / "best.pt", model, classes=list(CLASS_COLOURS), data=root
    )
    return checkpoint, root


@pytest.mark.slow
def test_int8_agrees_with_fp32_and_is_registered(trained):
    checkpoint, root = trained
    # The library call: the CLI insists on at least 500 agreement images.
    result = export_checkpoint(checkpoint, precision="int8", calibration_count=CALIBRATION, agreement_count=AGREEMENT)
    assert result.checks["int8_top1_agreement"] == 1.0 and result.checks["int8_agreement_images"] == AGREEMENT
    assert result.checks["check_images"] == 12  # 8 real images of the training folder + 4 random ones

    entry = store.latest_model()
    files = store.model_files(entry)
    assert set(files) == {"fp32", "int8"} and entry.info.metadata["precisions"] == ["fp32", "int8"]
    proto = onnx.load(str(files["int8"]))
    ops = [node.op_type for node in proto.graph.node]
    assert ops.count("QuantizeLinear") >= 8 and ops.count("DequantizeLinear") >= 8  # QDQ format
    initializers = {init.name: init for init in proto.graph.initializer}
    weight_dq = [
        node
        for node in proto.graph.node
        if node.op_type == "DequantizeLinear"
        and initializers.get(node.input[0]) is not None
        and initializers[node.input[0]].data_type == onnx.TensorProto.INT8
    ]
    assert weight_dq, "no int8 weights"
    for node in weight_dq:  # per-channel: one scale per output channel
        weights = numpy_helper.to_array(initializers[node.input[0]])
        scales = numpy_helper.to_array(initializers[node.input[1]])
        assert scales.ndim == 1 and len(scales) == weights.shape[0] > 1
    assert proto.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8

    # The trained model separates the classes, and int8 keeps that.
    files_by_class = image_files(root / "train")[:30]
    labels = np.array([list(CLASS_COLOURS).index(p.parent.name) for p in files_by_class])
    images = load_graph_inputs(files_by_class, test_scale=SCALE)
    int8 = run_onnx(session(files["int8"]), images)
    assert (int8.argmax(axis=1) == labels).mean() >= 0.9

    # bench/agreement.py, which runs the graphs as the service does, reports what raw sessions give.
    every = image_files(root / "train")
    truth = np.array([list(CLASS_COLOURS).index(p.parent.name) for p in every])
    images = load_graph_inputs(every, test_scale=SCALE)
    fp32, int8 = (run_onnx(session(files[p]), images).argmax(axis=1) for p in ("fp32", "int8"))
    report_path = checkpoint.parent / "agreement.json"
    assert agreement.main(["--model", str(entry.tag), "--images", str(root / "train"), "--json", str(report_path)]) == 0
    report = json.loads(report_path.read_text())
    assert report["images"] == len(every)
    assert report["graphs"]["fp32"]["top1_accuracy"] == pytest.approx((fp32 == truth).mean())
    assert report["graphs"]["int8"]["top1_accuracy"] == pytest.approx((int8 == truth).mean())
    assert report["graphs"]["int8"]["agreement"] == pytest.approx((fp32 == int8).mean())
    assert report["graphs"]["int8"]["disagreements"] == int((fp32 != int8).sum())
    # --limit spreads over the folder (all classes); folder names that are not labels give no accuracy.
    assert (
        agreement.main(["--model", str(entry.tag), "--images", str(root), "--limit", "6", "--json", str(report_path)])
        == 0
    )
    report = json.loads(report_path.read_text())
    assert report["images"] == 6 and report["graphs"]["fp32"]["top1_accuracy"] is not None
    unlabelled = checkpoint.parent / "unlabelled"
    unlabelled.mkdir()
    for path in every[:3]:
        shutil.copy(path, unlabelled / path.name)
    assert agreement.main(["--model", str(entry.tag), "--images", str(unlabelled), "--json", str(report_path)]) == 0
    report = json.loads(report_path.read_text())
    assert report["images"] == 3 and report["graphs"]["fp32"]["top1_accuracy"] is None
    assert agreement.main(["--model", str(entry.tag), "--images", str(root / "nowhere")]) == 2


@pytest.mark.slow
def test_int8_below_threshold_fails_and_registers_nothing(trained):
    checkpoint, _ = trained
    with pytest.raises(ExportError, match="below the required"):
        export_checkpoint(checkpoint, precision="int8", calibration_count=8, agreement_count=12, min_agreement=1.01)
    assert not store.has_model()


def test_int8_without_enough_images_fails(trained):
    checkpoint, _ = trained
    with pytest.raises(ExportError, match="int8 needs 500 calibration"):
        export_checkpoint(checkpoint, precision="int8", calibration_count=500)
    assert not store.has_model()


@pytest.mark.slow
def test_optional_int8_below_threshold_registers_fp32_and_says_why(trained, caplog):
    checkpoint, _ = trained
    result = export_checkpoint(
        checkpoint, precision="int8", calibration_count=8, agreement_count=12, min_agreement=1.01, int8_optional=True
    )
    entry = store.latest_model()
    assert str(entry.tag) == result.tag and set(store.model_files(entry)) == {"fp32"}
    assert entry.info.metadata["precisions"] == ["fp32"] and result.metadata["precisions"] == ["fp32"]
    assert "below the required 101%" in result.checks["int8_skipped"]
    warnings = [record.getMessage() for record in caplog.records if "int8 graph not added" in record.getMessage()]
    assert len(warnings) == 1 and "\n" not in warnings[0] and "below the required" in warnings[0]


def test_optional_int8_without_enough_images_registers_fp32(trained):
    checkpoint, _ = trained
    result = export_checkpoint(checkpoint, precision="int8", calibration_count=500, int8_optional=True)
    assert "int8 needs 500 calibration" in result.checks["int8_skipped"]
    assert set(store.model_files(store.latest_model())) == {"fp32"}
