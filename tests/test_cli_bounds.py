"""The training and export CLIs refuse what would explode, loop or fail late: one line, exit 2.

Each attack comes with variants (another flag, another size, another format of the same
mistake), so that a check written for one value only does not pass.
"""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path

import pytest
import torch

from export.__main__ import main as export_main
from tests.export_helpers import peaky_model, write_checkpoint
from tests.training_helpers import write_folder
from training import data as datasets
from training import run as training_run
from training.config import TrainConfig, UsageError, validate
from vgg import store
from vgg.preprocessing import MAX_SCALE, MIN_CROP

# ---------------------------------------------------------------- training: flags


@pytest.mark.parametrize(
    ("change", "flag"),
    [
        ({"test_scale_override": 100_000}, "--test-scale"),
        ({"test_scale_override": MAX_SCALE + 1}, "--test-scale"),
        ({"scale": (40, 100_000)}, "S <="),
        ({"scale": (100_000,), "crop": 224}, "S <="),
        ({"scale": (MAX_SCALE + 1,)}, "S <="),
        ({"crop": -5}, "--crop"),
        ({"crop": MIN_CROP - 1, "scale": (64,)}, "--crop"),
        ({"fc_width": 10**7}, "--fc-width"),
    ],
)
def test_geometry_bounds_are_enforced(change, flag):
    config = dataclasses.replace(TrainConfig(data="x"), **change)
    with pytest.raises(UsageError, match=flag) as error:
        validate(config, world_size=1)
    assert "\n" not in str(error.value)


def test_geometry_at_the_bounds_is_accepted():
    validate(
        dataclasses.replace(
            TrainConfig(data="x"), scale=(MIN_CROP, MAX_SCALE), crop=MIN_CROP, test_scale_override=MAX_SCALE
        ),
        world_size=1,
    )


FLOAT_FIELDS = ("dropout", "momentum", "weight_decay", "lr", "lr_factor", "pca_std", "val_split")


@pytest.mark.parametrize("name", FLOAT_FIELDS)
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_every_float_flag_must_be_finite(name, value):
    config = dataclasses.replace(TrainConfig(data="x"), **{name: value})
    with pytest.raises(UsageError, match=f"--{name.replace('_', '-')}") as error:
        validate(config, world_size=1)
    assert "\n" not in str(error.value)


def test_float_fields_list_covers_every_float_flag():
    floats = {field.name for field in dataclasses.fields(TrainConfig) if field.type in ("float", float)}
    assert floats == set(FLOAT_FIELDS)


@pytest.mark.parametrize(
    "argv",
    [
        ["--momentum", "nan"],
        ["--weight-decay", "inf"],
        ["--pca-std", "nan"],
        ["--lr=-inf"],
        ["--test-scale", "100000"],
        ["--scale", "40", "100000"],
        ["--crop=-3"],
    ],
)
def test_cli_refuses_in_one_line_with_exit_2(tmp_path, capsys, argv):
    write_folder(tmp_path / "data" / "train", {"a": 2, "b": 2})
    code = training_run.cli(
        ["--data", str(tmp_path / "data"), "--out", str(tmp_path / "run"), "--device", "cpu", *argv]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: ") and "\n" not in err, err
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------- training: data folders


def test_a_single_class_is_refused(tmp_path):
    write_folder(tmp_path / "train", {"only": 4})
    with pytest.raises(datasets.DataError, match="at least two") as error:
        datasets.folder_splits(tmp_path, val_split=0.1, seed=0)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("target", ["train", "root", "filesystem_root"])
def test_class_folder_linking_to_an_ancestor_is_refused(tmp_path, target):
    write_folder(tmp_path / "train", {"a": 2, "b": 2})
    destination = {"train": tmp_path / "train", "root": tmp_path, "filesystem_root": Path("/")}[target]
    os.symlink(destination, tmp_path / "train" / "c")
    with pytest.raises(datasets.DataError, match="symlink") as error:
        datasets.folder_splits(tmp_path, val_split=0.1, seed=0)
    assert "\n" not in str(error.value)


def test_link_inside_a_class_folder_to_the_class_folder_is_refused(tmp_path):
    write_folder(tmp_path / "train", {"a": 2, "b": 2})
    (tmp_path / "train" / "a" / "deep").mkdir()
    os.symlink(tmp_path / "train" / "a", tmp_path / "train" / "a" / "deep" / "again")
    with pytest.raises(datasets.DataError, match="symlink"):
        datasets.folder_splits(tmp_path, val_split=0.1, seed=0)


def test_symlink_loop_through_two_class_folders_is_refused(tmp_path):
    write_folder(tmp_path / "train", {"a": 2, "b": 2})
    os.symlink(tmp_path / "train" / "b", tmp_path / "train" / "a" / "to_b")
    os.symlink(tmp_path / "train" / "a", tmp_path / "train" / "b" / "to_a")
    with pytest.raises(datasets.DataError, match="symlink"):
        datasets.folder_splits(tmp_path, val_split=0.1, seed=0)


def test_symlinks_that_do_not_loop_are_followed(tmp_path):
    write_folder(tmp_path / "elsewhere", {"cats": 3})
    write_folder(tmp_path / "train", {"a": 2})
    os.symlink(tmp_path / "elsewhere" / "cats", tmp_path / "train" / "cats")
    os.symlink(tmp_path / "elsewhere" / "cats", tmp_path / "train" / "a" / "more")  # a shared folder, no loop
    classes, samples = datasets.list_image_folder(tmp_path / "train")
    assert classes == ["a", "cats"]
    assert sum(1 for _, label in samples if label == 0) == 2 + 3
    assert sum(1 for _, label in samples if label == 1) == 3


@pytest.mark.parametrize("junk", [b"", b"not an image at all", b"\x89PNG\r\n\x1a\n" + b"\0" * 40])
def test_all_unreadable_folder_is_one_line_exit_2(tmp_path, capsys, junk):
    for name in ("a", "b"):
        folder = tmp_path / "data" / "train" / name
        folder.mkdir(parents=True)
        for index in range(3):
            (folder / f"{index}.png").write_bytes(junk)
    code = training_run.cli(
        [
            "--data",
            str(tmp_path / "data"),
            "--out",
            str(tmp_path / "run"),
            "--device",
            "cpu",
            "--cfg",
            "A",
            "--scale",
            "40",
            "--crop",
            "32",
            "--epochs",
            "1",
            "--no-export",
        ]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.startswith("error: ") and "\n" not in err and "can be read" in err, err


# ---------------------------------------------------------------- export


def _edited_checkpoint(tmp_path: Path, edit) -> Path:
    path = write_checkpoint(tmp_path / "best.pt", peaky_model(num_classes=2), classes=["a", "b"])
    checkpoint = torch.load(path, weights_only=True)
    edit(checkpoint)
    torch.save(checkpoint, path)
    return path


def _set(*keys, value):
    def edit(checkpoint):
        target = checkpoint
        for key in keys[:-1]:
            target = target[key]
        target[keys[-1]] = value

    return edit


def _poison(name: str, value: float):
    def edit(checkpoint):
        checkpoint["model"][name].view(-1)[0] = value

    return edit


EXPORT_CASES = {
    "three_names_two_outputs": (_set("classes", value=["a", "b", "c"]), "3 class names"),
    "one_name_two_outputs": (_set("classes", value=["a"]), "1 class names"),
    "test_scale_zero": (_set("preprocess", "test_scale", value=0), "test_scale is 0"),
    "test_scale_negative": (_set("preprocess", "test_scale", value=-37), "test_scale is -37"),
    "test_scale_huge": (_set("preprocess", "test_scale", value=100_000), "test_scale is 100000"),
    "crop_negative": (_set("preprocess", "crop", value=-32), "crop is -32"),
    "crop_fraction": (_set("preprocess", "crop", value=32.5), "not a whole number"),
    "nan_weight": (_poison("features.0.weight", math.nan), "NaN or infinite"),
    "inf_bias": (_poison("classifier.6.bias", math.inf), "NaN or infinite"),
    "nan_mean": (_set("preprocess", "mean", value=[math.nan, 1.0, 2.0]), "finite"),
    "inf_std": (_set("preprocess", "std", value=[1.0, math.inf, 2.0]), "finite"),
}


@pytest.mark.parametrize("case", sorted(EXPORT_CASES))
def test_export_refuses_inconsistent_checkpoints(tmp_path, capsys, bentoml_home, case):
    edit, reason = EXPORT_CASES[case]
    path = _edited_checkpoint(tmp_path, edit)
    out = tmp_path / "out.onnx"
    assert export_main(["--checkpoint", str(path), "--out", str(out)]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and reason in lines[0], captured.err
    assert not store.has_model() and not out.exists()


@pytest.mark.parametrize("scale", ["0", "-256", "31", str(MAX_SCALE + 1)])
def test_export_refuses_a_test_scale_flag_out_of_bounds(tmp_path, capsys, bentoml_home, scale):
    path = write_checkpoint(tmp_path / "best.pt", peaky_model(num_classes=2), classes=["a", "b"])
    out = str(tmp_path / "o.onnx")
    assert export_main(["--checkpoint", str(path), "--test-scale", scale, "--no-register", "--out", out]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --test-scale is") and "\n" not in err, err


def test_unsafe_pickle_refusal_gives_no_advice_to_load_it_unsafely(tmp_path, capsys, bentoml_home):
    class RunsCode:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    torch.save({"format": "vgg-checkpoint/1", "payload": RunsCode()}, tmp_path / "evil.pt")
    assert (
        export_main(["--checkpoint", str(tmp_path / "evil.pt"), "--no-register", "--out", str(tmp_path / "o.onnx")])
        == 2
    )
    err = capsys.readouterr().err.strip()
    assert "refused to load" in err and "could run code" in err and "\n" not in err
    assert "weights_only" not in err and "Re-running" not in err
    assert not (tmp_path / "pwned").exists()
