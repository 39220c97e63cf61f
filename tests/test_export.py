"""Export: graph vs the torchvision reference, metadata, fp16, registration."""

from __future__ import annotations

import hashlib
import json
import shutil
import struct

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from torchvision.transforms import v2

from export import ExportError, export_checkpoint
from export.check import random_images, run_onnx, session
from export.graph import InferenceGraph, graph_scales
from export.onnx_io import OPSET, read_metadata, to_onnx
from export.reference import reference_probs
from tests.export_helpers import CROP, MEAN, SCALE, STD, peaky_model, write_checkpoint
from vgg import store, to_dense

pytestmark = pytest.mark.usefixtures("bentoml_home")  # a fresh model store per test

CLASSES = ["cat", "dog", "fish", "bird", "frog"]


@pytest.fixture(scope="module")
def model():
    return peaky_model(num_classes=len(CLASSES))


@pytest.fixture(scope="module")
def sessions(model):
    """tta/scale -> ORT session of the exported graph (exported once per module)."""
    cache = {}

    def get(tta: str, scale: int, batch_norm_model=None, test_scales=None):
        key = (tta, scale, batch_norm_model is not None, tuple(test_scales or ()))
        if key not in cache:
            graph = InferenceGraph(
                batch_norm_model or model,
                mean=MEAN,
                std=STD,
                crop=CROP,
                test_scale=scale,
                tta=tta,
                test_scales=test_scales,
            )
            proto = to_onnx(graph)
            onnx.checker.check_model(proto, full_check=True)
            cache[key] = session(proto)
        return cache[key]

    return get


@torch.no_grad()
def torchvision_probs(model, images: np.ndarray, *, tta: str, test_scales=None) -> np.ndarray:
    """An independent reference: torchvision's FiveCrop/TenCrop/CenterCrop (or the dense net on
    the image and its flip) on each test scale, resized with ``F.interpolate`` (antialiased
    bilinear); softmax per view, mean over views and scales."""
    network = to_dense(model, crop=CROP).eval() if tta == "dense" else model.eval()
    crops = {
        "five": v2.FiveCrop(CROP),
        "ten": v2.TenCrop(CROP),
        "center": lambda x: [v2.CenterCrop(CROP)(x)],
        "dense": lambda x: [x, v2.functional.horizontal_flip(x)],
    }[tta]
    normalise = v2.Normalize(mean=MEAN, std=STD)
    results = []
    for image in images:
        chw = normalise(torch.from_numpy(image.copy()).permute(2, 0, 1).float())
        per_scale = []
        for q in test_scales or [image.shape[0]]:
            resized = (
                chw
                if q == image.shape[0]
                else F.interpolate(chw[None], size=(q, q), mode="bilinear", antialias=True)[0]
            )
            views = torch.stack(list(crops(resized)))
            per_scale.append(torch.softmax(network(views).double(), dim=1).mean(dim=0))
        results.append(torch.stack(per_scale).mean(dim=0))
    return torch.stack(results).numpy()


def test_graph_scales_and_bad_geometry():
    assert graph_scales(test_scale=37, crop=32, tta="five") == [37]
    assert graph_scales(test_scale=37, crop=32, tta="dense", test_scales=[64, 40, 48]) == [40, 48, 64]
    with pytest.raises(ValueError, match="larger"):
        graph_scales(test_scale=30, crop=32, tta="five")
    with pytest.raises(ValueError, match="larger"):
        graph_scales(test_scale=37, crop=32, tta="dense", test_scales=[30, 48])
    with pytest.raises(ValueError, match="unknown tta"):
        graph_scales(test_scale=37, crop=32, tta="twelve")


@pytest.mark.slow
@pytest.mark.parametrize(
    ("tta", "scale"), [("five", SCALE), ("ten", SCALE), ("center", SCALE), ("dense", SCALE), ("dense", 64)]
)
@pytest.mark.parametrize("batch", [1, 3])
def test_graph_matches_torchvision_reference(sessions, model, tta, scale, batch):
    images = random_images(batch, test_scale=scale, seed=batch)
    probs = run_onnx(sessions(tta, scale), images)
    reference = torchvision_probs(model, images, tta=tta)
    assert probs.shape == (batch, len(CLASSES)) and probs.dtype == np.float32
    assert reference.max() > 0.5, "model too flat for the comparison to mean anything"
    assert np.abs(probs - reference).max() <= 1e-4
    assert np.abs(reference_probs(model, images, mean=MEAN, std=STD, crop=CROP, tta=tta) - reference).max() <= 1e-5
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize(("tta", "test_scales"), [("dense", [32, 48, 64]), ("five", [37, 64])])
def test_multi_scale_graph_resizes_inside_and_matches_the_reference(sessions, model, tta, test_scales):
    """Several Q: the input is the largest; ONNX Resize (antialiased bilinear) makes the others."""
    images = random_images(2, test_scale=max(test_scales), seed=11)
    probs = run_onnx(sessions(tta, max(test_scales), test_scales=test_scales), images)
    reference = torchvision_probs(model, images, tta=tta, test_scales=test_scales)
    assert np.abs(probs - reference).max() <= 1e-4
    ours = reference_probs(model, images, mean=MEAN, std=STD, crop=CROP, tta=tta, test_scales=test_scales)
    assert np.abs(ours - reference).max() <= 1e-5
    largest_only = torchvision_probs(model, images, tta=tta)
    assert np.abs(probs - largest_only).max() > 1e-3  # the smaller scales count


@pytest.mark.slow
def test_graph_with_batch_norm_matches_reference(sessions):
    bn_model = peaky_model(num_classes=len(CLASSES), batch_norm=True, seed=1)
    images = random_images(3, test_scale=SCALE, seed=7)
    probs = run_onnx(sessions("five", SCALE, bn_model), images)
    reference = reference_probs(bn_model, images, mean=MEAN, std=STD, crop=CROP, tta="five")
    assert np.abs(probs - reference).max() <= 1e-4


@pytest.mark.slow
def test_comparison_detects_a_different_crop_set(sessions, model):
    """The 1e-4 check is sensitive: five crops are not the centre crop, nor unnormalised input."""
    images = random_images(3, test_scale=SCALE, seed=3)
    probs = run_onnx(sessions("five", SCALE), images)
    centre_only = reference_probs(model, images, mean=MEAN, std=STD, crop=CROP, tta="center")
    unnormalised = reference_probs(model, images, mean=[0.0] * 3, std=[1.0] * 3, crop=CROP, tta="five")
    assert np.abs(probs - centre_only).max() > 1e-3
    assert np.abs(probs - unnormalised).max() > 1e-3


@pytest.mark.slow
def test_graph_interface_is_uint8_nhwc_to_float32_with_dynamic_batch(model):
    proto = to_onnx(InferenceGraph(model, mean=MEAN, std=STD, crop=CROP, test_scale=SCALE, tta="center"))
    (graph_input,), (graph_output,) = proto.graph.input, proto.graph.output
    assert graph_input.name == "images" and graph_output.name == "probs"
    assert graph_input.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert graph_output.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    in_dims = graph_input.type.tensor_type.shape.dim
    assert in_dims[0].dim_param and [d.dim_value for d in in_dims[1:]] == [SCALE, SCALE, 3]
    assert [d.dim_value for d in graph_output.type.tensor_type.shape.dim[1:]] == [len(CLASSES)]
    assert {o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")} == {OPSET}


@pytest.mark.slow
def test_export_registers_self_describing_model(tmp_path, model, bentoml_home):
    checkpoint = write_checkpoint(tmp_path / "best.pt", model, classes=CLASSES)
    out = tmp_path / "plain" / "vgg.onnx"
    result = export_checkpoint(checkpoint, tta="center", out=out)

    expected = {
        "cfg": "A",
        "batch_norm": False,
        "num_classes": 5,
        "test_scale": SCALE,
        "crop": CROP,
        "mean": MEAN,
        "std": STD,
        "tta": "center",
        "val_top1": 0.42,
    }
    sha = hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    props = read_metadata(out)
    assert props == {**expected, "labels": CLASSES, "precision": "fp32", "checkpoint_sha256": sha}
    assert result.checks["fp32_max_abs_diff"] <= 1e-4 and result.onnx_path == out

    assert store.has_model() and str(bentoml_home) in str(store.latest_model().path)
    entry = store.latest_model()
    assert str(entry.tag) == result.tag
    assert entry.info.metadata == {**expected, "precisions": ["fp32"], "checkpoint_sha256": sha}
    assert entry.info.labels["cfg"] == "A"
    assert store.model_classes(entry) == CLASSES
    assert set(store.model_files(entry)) == {"fp32"}
    assert read_metadata(store.model_files(entry)["fp32"]) == props

    images = random_images(2, test_scale=SCALE, seed=11)
    stored = run_onnx(session(store.model_files(entry)["fp32"]), images)
    reference = reference_probs(model, images, mean=MEAN, std=STD, crop=CROP, tta="center")
    assert np.abs(stored - reference).max() <= 1e-4


@pytest.mark.slow
def test_fp16_graph_keeps_uint8_in_float32_out(tmp_path, model):
    checkpoint = write_checkpoint(tmp_path / "best.pt", model, classes=CLASSES)
    result = export_checkpoint(checkpoint, precision="fp16", tta="center", test_scale=40)

    entry = store.latest_model()
    assert entry.info.metadata["precisions"] == ["fp32", "fp16"] and entry.info.metadata["test_scale"] == 40
    fp16_path = store.model_files(entry)["fp16"]
    assert result.onnx_path == fp16_path and result.checks["fp16_top1_agreement"] == 1.0
    proto = onnx.load(str(fp16_path))
    conv_weights = {node.input[1] for node in proto.graph.node if node.op_type == "Conv"}
    weight_types = {init.data_type for init in proto.graph.initializer if init.name in conv_weights}
    assert len(conv_weights) == 8 and weight_types == {onnx.TensorProto.FLOAT16}
    assert proto.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert proto.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert read_metadata(proto)["precision"] == "fp16"

    # The CPU provider of onnxruntime 1.31 runs fp16 Conv/Gemm: compare with fp32.
    images = random_images(3, test_scale=40, seed=5)
    fp16 = run_onnx(session(fp16_path), images)
    fp32 = run_onnx(session(store.model_files(entry)["fp32"]), images)
    assert fp16.dtype == np.float32
    assert (fp16.argmax(axis=1) == fp32.argmax(axis=1)).all()
    assert 0 < np.abs(fp16 - fp32).max() < 2e-2  # computed in float16, close to fp32


@pytest.mark.slow
def test_failed_check_registers_nothing(tmp_path, model, monkeypatch):
    checkpoint = write_checkpoint(tmp_path / "best.pt", model, classes=CLASSES)
    out = tmp_path / "vgg.onnx"

    def wrong_reference(*args, **kwargs):
        return np.full((len(args[1]), len(CLASSES)), 1.0 / len(CLASSES))

    monkeypatch.setattr("export.core.reference_probs", wrong_reference)
    with pytest.raises(ExportError, match=r"differs from the PyTorch reference: max abs diff .* > 0.0001"):
        export_checkpoint(checkpoint, tta="center", out=out)
    assert not store.has_model()
    assert not out.exists() and not list(tmp_path.glob(".*partial"))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"tta": "twelve"}, "unknown tta"),
        ({"precision": "int4"}, "unknown precision"),
        ({"register": False}, "nothing to do"),
        ({"test_scale": 16}, "must be between the crop"),
    ],
)
def test_bad_arguments_raise_export_error(tmp_path, model, kwargs, message):
    checkpoint = write_checkpoint(tmp_path / "best.pt", model, classes=CLASSES)
    with pytest.raises(ExportError, match=message):
        export_checkpoint(checkpoint, **kwargs)
    assert not store.has_model()


@pytest.mark.parametrize(
    ("make_out", "message"),
    [
        (lambda tmp_path: tmp_path, "is a directory"),
        (lambda tmp_path: tmp_path / "best.pt" / "vgg.onnx", "best.pt is not a directory"),
    ],
)
def test_unwritable_out_is_refused_before_any_work(tmp_path, model, monkeypatch, make_out, message):
    checkpoint = write_checkpoint(tmp_path / "best.pt", model, classes=CLASSES)
    monkeypatch.setattr("export.core._load_source", lambda *a, **k: pytest.fail("worked before checking out"))
    with pytest.raises(ExportError, match=message):
        export_checkpoint(checkpoint, out=make_out(tmp_path))
    assert not store.has_model()


@pytest.mark.parametrize("counts", [{"calibration_count": 0}, {"agreement_count": -5}])
def test_int8_image_counts_must_be_positive(tmp_path, model, counts):
    checkpoint = write_checkpoint(tmp_path / "best.pt", model, classes=CLASSES)
    with pytest.raises(ExportError, match="at least 1"):
        export_checkpoint(checkpoint, precision="int8", **counts)


@pytest.mark.slow
def test_failed_final_rename_is_one_export_error(tmp_path, model, monkeypatch):
    checkpoint = write_checkpoint(tmp_path / "best.pt", model, classes=CLASSES)
    out = tmp_path / "vgg.onnx"

    def failing_replace(source, target):
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr("export.core.os.replace", failing_replace)
    with pytest.raises(ExportError, match="cannot write .*vgg.onnx: Invalid cross-device link"):
        export_checkpoint(checkpoint, tta="center", out=out, register=False)
    assert not out.exists() and not list(tmp_path.glob(".*partial"))


def test_store_check_cli_reflects_the_store(tmp_path, model):
    assert store.main(["--check"]) == 1
    files = {"model.onnx": tmp_path / "m.onnx", "classes.json": tmp_path / "c.json"}
    files["model.onnx"].write_bytes(b"placeholder")
    files["classes.json"].write_text(json.dumps(CLASSES))
    tag = store.register(files=files, labels={"cfg": "A"}, metadata={"cfg": "A", "precisions": ["fp32"]})
    assert store.main(["--check"]) == 0
    assert str(store.latest_model().tag) == tag


@pytest.mark.slow
def test_registration_failing_midway_leaves_no_entry(tmp_path, model, monkeypatch, bentoml_home):
    """BentoML discards an entry whose ``create`` block raised: no half-copied model in the store."""
    checkpoint = write_checkpoint(tmp_path / "best.pt", model, classes=CLASSES)
    out = tmp_path / "vgg.onnx"
    copied = []

    class FailingSecondCopy:
        @staticmethod
        def copyfile(source, target):
            if copied:
                raise OSError(28, "No space left on device")
            copied.append(shutil.copyfile(source, target))

    monkeypatch.setattr(store, "shutil", FailingSecondCopy)
    with pytest.raises(ExportError, match="could not register in the BentoML store: .*No space left"):
        export_checkpoint(checkpoint, tta="center", out=out)
    assert len(copied) == 1  # the first file was in the entry when it failed
    assert not store.has_model()
    assert not list((bentoml_home / "models").rglob("*.onnx"))
    assert not out.exists() and not list(tmp_path.glob(".*partial"))


def test_check_images_skip_files_whose_decoder_fails_oddly(tmp_path, monkeypatch, caplog):
    from PIL import Image

    from export.check import load_graph_inputs
    from vgg import preprocessing

    Image.new("RGB", (50, 40), (200, 10, 10)).save(tmp_path / "good.png")
    Image.new("RGB", (41, 40), (10, 10, 200)).save(tmp_path / "odd.png")
    real_exif_transpose = preprocessing.ImageOps.exif_transpose

    def struct_error_for_odd_widths(image):
        if image.size[0] % 2:
            raise struct.error("unpack requires a buffer of 4 bytes")  # what a corrupt EXIF block raises
        return real_exif_transpose(image)

    monkeypatch.setattr(preprocessing.ImageOps, "exif_transpose", struct_error_for_odd_widths)
    images = load_graph_inputs([tmp_path / "good.png", tmp_path / "odd.png"], test_scale=SCALE)
    assert images.shape == (1, SCALE, SCALE, 3) and images[0, 0, 0, 0] == 200
    assert "skipping" in caplog.text and "odd.png" in caplog.text


def test_exporter_chatter_is_silent_unless_asked_for(model, caplog):
    """The exporter's and optimiser's INFO records reach the log only after show_exporter_logs (-v)."""
    import logging

    from export.onnx_io import EXPORTER_LOGGERS, show_exporter_logs

    def exporter_records() -> list[logging.LogRecord]:
        caplog.clear()
        with caplog.at_level(logging.INFO):
            to_onnx(InferenceGraph(model, mean=MEAN, std=STD, crop=CROP, test_scale=SCALE, tta="five"))
        return [r for r in caplog.records if r.name.split(".")[0] in {n.split(".")[0] for n in EXPORTER_LOGGERS}]

    assert [r for r in exporter_records() if r.levelno < logging.WARNING] == []
    try:
        show_exporter_logs()
        assert any(r.levelno == logging.INFO for r in exporter_records())
    finally:
        for name in EXPORTER_LOGGERS:
            logging.getLogger(name).setLevel(logging.NOTSET)


@pytest.mark.slow
def test_export_multi_scale_dense_is_self_checked_and_says_its_scales(tmp_path, model):
    checkpoint = write_checkpoint(tmp_path / "best.pt", model, classes=CLASSES)
    out = tmp_path / "dense.onnx"
    result = export_checkpoint(checkpoint, tta="dense", test_scales=[48, 32, 40], out=out, register=False)
    props = read_metadata(out)
    assert props["test_scale"] == 48 and props["test_scales"] == [32, 40, 48] and props["tta"] == "dense"
    assert result.checks["fp32_max_abs_diff"] <= 1e-4
    resize = [node for node in onnx.load(str(out)).graph.node if node.op_type == "Resize"]
    assert resize and all(any(a.name == "antialias" and a.i == 1 for a in node.attribute) for node in resize)
    with pytest.raises(ExportError, match="not both"):
        export_checkpoint(checkpoint, tta="dense", test_scale=48, test_scales=[32, 48], out=out, register=False)
    with pytest.raises(ExportError, match="--test-scales is 16; a test scale must be between the crop 32"):
        export_checkpoint(checkpoint, tta="dense", test_scales=[16, 48], out=out, register=False)
