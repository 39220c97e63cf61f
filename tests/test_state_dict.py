"""VGG state dicts in torchvision's layout: configuration inferred from keys and shapes, both file
formats, the converter (library and ``python -m vgg.checkpoint``), and a one-line error for every
malformed file or mismatch."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from safetensors.torch import save_file

import vgg
from tests.helpers import run_module
from vgg.checkpoint import (
    CHECKPOINT_FORMAT,
    CheckpointError,
    checkpoint_from_state_dict,
    infer_arch,
    load_any,
    load_checkpoint,
    model_from_checkpoint,
    read_labels,
    read_state_dict,
)
from vgg.preprocessing import IMAGENET_MEAN_RGB, IMAGENET_STD_RGB

TORCHVISION_CFG = {"vgg11": "A", "vgg13": "B", "vgg16": "D", "vgg19": "E"}


def small_state(cfg: str = "A", *, batch_norm: bool = False, num_classes: int = 10, fc_width: int = 16, seed: int = 0):
    """A random VGG's state dict (torchvision's layout) with a light head, and the model."""
    torch.manual_seed(seed)
    model = vgg.build(cfg, num_classes=num_classes, batch_norm=batch_norm, fc_width=fc_width, init="kaiming").eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 2.0)
    return {key: value.clone() for key, value in model.state_dict().items()}, model


def write_state(state: dict, path: Path) -> Path:
    if path.suffix == ".safetensors":
        save_file({key: value.contiguous() for key, value in state.items()}, str(path))
    else:
        torch.save(state, path)
    return path


def convert_cli(*args: str) -> subprocess.CompletedProcess:
    return run_module("vgg.checkpoint", *args)


# ---------------------------------------------------------------- inference of the configuration


@pytest.mark.parametrize("name", ["vgg11", "vgg13", "vgg16", "vgg19", "vgg11_bn", "vgg13_bn", "vgg16_bn", "vgg19_bn"])
def test_every_torchvision_vgg_is_recognised(name):
    with torch.device("meta"):  # shapes only: no memory, no init time
        state = getattr(torchvision.models, name)().state_dict()
    arch = infer_arch(state)
    assert arch == {
        "cfg": TORCHVISION_CFG[name.removesuffix("_bn")],
        "batch_norm": name.endswith("_bn"),
        "num_classes": 1000,
        "dropout": 0.5,
        "fc_width": 4096,
    }


@pytest.mark.parametrize("cfg", vgg.CONFIG_NAMES)
@pytest.mark.parametrize("batch_norm", [False, True])
def test_every_configuration_with_any_head_is_recognised(cfg, batch_norm):
    with torch.device("meta"):
        state = vgg.build(cfg, num_classes=7, batch_norm=batch_norm, fc_width=24).state_dict()
    assert infer_arch(state) == {"cfg": cfg, "batch_norm": batch_norm, "num_classes": 7, "dropout": 0.5, "fc_width": 24}


def test_batch_norm_files_without_batch_counters_are_accepted(tmp_path):
    state, model = small_state("B", batch_norm=True)
    old_style = {key: value for key, value in state.items() if not key.endswith("num_batches_tracked")}
    checkpoint = load_any(write_state(old_style, tmp_path / "old.pth"), labels=[str(i) for i in range(10)])
    assert checkpoint["arch"]["cfg"] == "B" and checkpoint["arch"]["batch_norm"]
    rebuilt = model_from_checkpoint(checkpoint)
    image = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(rebuilt(image), model(image), rtol=0, atol=0)


# ---------------------------------------------------------------- both formats, the converter


@pytest.mark.parametrize(
    "suffix, cfg, batch_norm", [(".pth", "A", False), (".safetensors", "C", True), (".pt", "A-LRN", False)]
)
def test_converted_checkpoint_computes_what_the_state_dict_computes(tmp_path, suffix, cfg, batch_norm):
    state, model = small_state(cfg, batch_norm=batch_norm)
    labels = [f"kind {i}" for i in range(10)]
    checkpoint = load_any(write_state(state, tmp_path / f"weights{suffix}"), labels=labels)
    assert checkpoint["format"] == CHECKPOINT_FORMAT and checkpoint["classes"] == labels
    assert checkpoint["arch"] == {
        "cfg": cfg,
        "batch_norm": batch_norm,
        "num_classes": 10,
        "dropout": 0.5,
        "fc_width": 16,
    }
    assert checkpoint["preprocess"]["mean"] == pytest.approx([0.485 * 255, 0.456 * 255, 0.406 * 255])
    assert checkpoint["preprocess"]["std"] == pytest.approx([0.229 * 255, 0.224 * 255, 0.225 * 255])
    assert (checkpoint["preprocess"]["crop"], checkpoint["preprocess"]["test_scale"]) == (224, 256)
    assert checkpoint["config"]["converted_from"] == str((tmp_path / f"weights{suffix}").resolve())
    image = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(model_from_checkpoint(checkpoint)(image), model(image), rtol=0, atol=0)


def test_thousand_classes_get_imagenet_names_in_index_order(tmp_path):
    state, _ = small_state(num_classes=1000)
    classes = load_any(write_state(state, tmp_path / "in1k.safetensors"))["classes"]
    assert len(classes) == 1000
    assert (classes[0], classes[1], classes[207], classes[999]) == (
        "tench",
        "goldfish",
        "golden retriever",
        "toilet tissue",
    )


def test_wrapped_half_precision_and_ddp_prefixed_state_dicts_are_read(tmp_path):
    state, model = small_state()
    wrapped = {
        "epoch": 3,
        "state_dict": {
            f"module.{key}": value.half() if value.is_floating_point() else value for key, value in state.items()
        },
    }
    checkpoint = load_any(write_state(wrapped, tmp_path / "wrapped.pth"), labels=[str(i) for i in range(10)])
    assert all(value.dtype == torch.float32 for key, value in checkpoint["model"].items() if "num_batches" not in key)
    torch.testing.assert_close(checkpoint["model"]["features.0.weight"], state["features.0.weight"].half().float())


def test_converter_cli_round_trips(tmp_path):
    state, model = small_state("D", batch_norm=True, num_classes=3)
    labels = tmp_path / "labels.txt"
    labels.write_text("cat\ndog\nbird\n\n")
    source = write_state(state, tmp_path / "d.safetensors")
    result = convert_cli("--from-state-dict", str(source), "--out", str(tmp_path / "d.pt"), "--labels", str(labels))
    assert result.returncode == 0, result.stderr
    assert "VGG-D with BatchNorm, 3 classes" in result.stdout
    checkpoint = load_checkpoint(tmp_path / "d.pt")  # the strict loader of every other command
    assert checkpoint["classes"] == ["cat", "dog", "bird"]
    assert set(checkpoint["model"]) == set(state)
    for key, value in state.items():
        torch.testing.assert_close(checkpoint["model"][key], value, rtol=0, atol=0)
    again = checkpoint_from_state_dict(checkpoint["model"], labels=checkpoint["classes"])
    assert again["arch"] == checkpoint["arch"] and again["preprocess"] == checkpoint["preprocess"]
    assert load_any(tmp_path / "d.pt")["classes"] == ["cat", "dog", "bird"]  # a checkpoint stays itself


def test_project_checkpoint_is_read_unchanged_and_relabelled(tmp_path):
    state, _ = small_state(num_classes=2)
    checkpoint = checkpoint_from_state_dict(state, labels=["a", "b"])
    torch.save(checkpoint, tmp_path / "c.pt")
    assert load_any(tmp_path / "c.pt", labels=["x", "y"])["classes"] == ["x", "y"]
    with pytest.raises(CheckpointError, match="--labels has 3 names but the weights have 2 classes"):
        load_any(tmp_path / "c.pt", labels=["x", "y", "z"])


def test_labels_file_rules(tmp_path):
    path = tmp_path / "labels.txt"
    path.write_text(" crane \ncrane\n")  # ImageNet itself has duplicate names: allowed
    assert read_labels(path) == ["crane", "crane"]
    path.write_text("a\n\nb\n")
    with pytest.raises(CheckpointError, match="line 2 is empty"):
        read_labels(path)
    path.write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(CheckpointError, match="UTF-8"):
        read_labels(path)


# ---------------------------------------------------------------- every malformed file: one line


class Evil:
    def __reduce__(self):
        return (print, ("executed",))


def bad_file(tmp_path: Path, case: str) -> tuple[list[str], str]:
    """(converter arguments, words the one-line error must contain) for one malformed input."""
    state, _ = small_state()
    labels = tmp_path / "labels.txt"
    labels.write_text("\n".join(f"c{i}" for i in range(10)))
    path = tmp_path / "weights.pth"
    words = ""
    if case == "missing":
        path = tmp_path / "nowhere.pth"
        words = "no such file"
    elif case == "directory":
        path = tmp_path
        words = "not a file"
    elif case == "garbage":
        path.write_bytes(b"this is not a state dict at all")
        words = "not a readable checkpoint"
    elif case == "truncated_safetensors":
        good = write_state(state, tmp_path / "good.safetensors").read_bytes()
        path = tmp_path / "weights.safetensors"
        path.write_bytes(good[: len(good) // 2])
        words = "not a readable .safetensors file"
    elif case == "code_in_pickle":
        torch.save({"features.0.weight": Evil()}, path)
        words = "refused to load: it holds Python objects other than tensors and plain data (it references print)"
    elif case == "not_tensors":
        torch.save({"weights": [1, 2, 3]}, path)
        words = "nor a state dict of tensors"
    elif case == "resnet":
        torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7), "fc.weight": torch.zeros(1000, 512)}, path)
        words = "no 'features.N' keys (first key 'conv1.weight')"
    elif case == "wrong_shape":
        state["features.3.weight"] = torch.zeros(128, 64, 5, 5)
        write_state(state, path)
        words = "key 'features.3.weight' has shape (128, 64, 5, 5), VGG-A expects (128, 64, 3, 3)"
    elif case == "missing_key":
        del state["classifier.3.bias"]
        write_state(state, path)
        words = "lacks key 'classifier.3.bias'"
    elif case == "extra_key":
        state["features.99.weight"] = torch.zeros(3)
        write_state(state, path)
        words = "unexpected key 'features.99.weight'"
    elif case == "no_labels":
        write_state(state, path)
        return ["--from-state-dict", str(path)], "10 classes, not ImageNet's 1000: give --labels FILE"
    elif case == "label_count":
        write_state(state, path)
        labels.write_text("a\nb\n")
        words = "--labels has 2 names but the weights have 10 classes"
    elif case == "labels_missing":
        write_state(state, path)
        labels = tmp_path / "absent.txt"
        words = "no such file"
    return ["--from-state-dict", str(path), "--labels", str(labels)], words


BAD_CASES = [
    "missing",
    "directory",
    "garbage",
    "truncated_safetensors",
    "code_in_pickle",
    "not_tensors",
    "resnet",
    "wrong_shape",
    "missing_key",
    "extra_key",
    "no_labels",
    "label_count",
    "labels_missing",
]


def assert_one_line(stderr: str, words: str) -> None:
    error = stderr.strip()
    assert error.startswith("error: ") and "\n" not in error and "Traceback" not in error, error
    assert words in error, error


@pytest.mark.parametrize("case", BAD_CASES)
def test_converter_gives_one_line_and_exit_2(tmp_path, capfd, case):
    from vgg.checkpoint import main

    args, words = bad_file(tmp_path, case)
    assert main([*args, "--out", str(tmp_path / "out" / "c.pt")]) == 2
    captured = capfd.readouterr()
    assert_one_line(captured.err, words)
    assert "executed" not in captured.out
    assert not (tmp_path / "out" / "c.pt").exists()


def test_converter_cli_process_gives_one_line(tmp_path):
    args, words = bad_file(tmp_path, "code_in_pickle")
    result = convert_cli(*args, "--out", str(tmp_path / "c.pt"))
    assert result.returncode == 2 and "executed" not in result.stdout
    assert_one_line(result.stderr, "refused to load")


@pytest.mark.parametrize("case", ["garbage", "resnet", "wrong_shape", "no_labels", "label_count"])
def test_export_gives_one_line_and_exit_2(tmp_path, capfd, case):
    from export.__main__ import main

    args, words = bad_file(tmp_path, case)
    checkpoint = args[args.index("--from-state-dict") + 1]
    labels = args[args.index("--labels") + 1 :] if "--labels" in args else []
    command = [
        "--checkpoint",
        checkpoint,
        *(["--labels", *labels] if labels else []),
        "--out",
        str(tmp_path / "m.onnx"),
        "--no-register",
    ]
    assert main(command) == 2
    assert_one_line(capfd.readouterr().err, words)


def test_read_state_dict_keeps_keys_and_values(tmp_path):
    state, _ = small_state()
    for suffix in (".pth", ".safetensors"):
        loaded = read_state_dict(write_state(state, tmp_path / f"s{suffix}"))
        assert list(loaded) == list(state) or set(loaded) == set(state)
        for key, value in state.items():
            assert np.array_equal(loaded[key].numpy(), value.numpy())


def test_constants_are_torchvision_s():
    weights = torchvision.models.VGG16_Weights.IMAGENET1K_V1
    preset = weights.transforms()
    assert list(IMAGENET_MEAN_RGB) == pytest.approx([m * 255 for m in preset.mean])
    assert list(IMAGENET_STD_RGB) == pytest.approx([s * 255 for s in preset.std])
    assert (preset.resize_size, preset.crop_size) == ([256], [224])


# ---------------------------------------------------------------- export of a state dict, int8 included


@pytest.mark.slow
@pytest.mark.usefixtures("bentoml_home")
def test_state_dict_exports_int8_with_calibration_and_registers(tmp_path):
    from PIL import Image

    from export import export_checkpoint
    from vgg import store

    state, _ = small_state(num_classes=4)
    weights = write_state(state, tmp_path / "four.safetensors")
    (tmp_path / "labels.txt").write_text("ant\nbee\ncat\ndog\n")
    calibration = tmp_path / "calibration"
    calibration.mkdir()
    rng = np.random.default_rng(0)
    for index in range(6):
        size = (int(rng.integers(250, 400)), int(rng.integers(250, 400)))
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(calibration / f"{index}.png")
    result = export_checkpoint(
        weights,
        tta="center",
        precision="int8",
        labels=tmp_path / "labels.txt",
        calibration=calibration,
        calibration_count=3,
        agreement_count=3,
        min_agreement=0.0,
    )
    assert result.checks["fp32_max_abs_diff"] <= 1e-4 and result.checks["int8_agreement_images"] == 3
    entry = store.latest_model()
    assert store.model_classes(entry) == ["ant", "bee", "cat", "dog"]
    metadata = entry.info.metadata
    assert (metadata["cfg"], metadata["test_scale"], metadata["crop"], metadata["precisions"]) == (
        "A",
        256,
        224,
        ["fp32", "int8"],
    )
    assert metadata["mean"] == pytest.approx(list(IMAGENET_MEAN_RGB)) and "val_top1" not in metadata
