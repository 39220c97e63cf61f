"""Fine-tuning (``python -m training.run --finetune-from FILE``): which tensors are copied, the new
head, the fine-tune's defaults, ``--freeze-features``, and one-line errors for every mismatch."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import vgg
from tests.training_helpers import TINY_RUN
from training import finetune
from training.config import TrainConfig
from training.run import cli
from training.setup import build_model
from vgg.checkpoint import CHECKPOINT_FORMAT, load_checkpoint, save_checkpoint
from vgg.preprocessing import IMAGENET_MEAN_RGB, IMAGENET_STD_RGB

# A light VGG-A on 32x32 crops; the source state dicts below share its architecture.
TINY = [*TINY_RUN, "--stats-images", "20", "--no-amp", "--epochs", "1"]
FC_WIDTH = 32
HEAD = {"classifier.6.weight", "classifier.6.bias"}


def source_state(*, cfg: str = "A", batch_norm: bool = True, num_classes: int = 5, seed: int = 7):
    torch.manual_seed(seed)
    model = vgg.build(cfg, num_classes=num_classes, batch_norm=batch_norm, fc_width=FC_WIDTH, init="kaiming")
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
    return {key: value.clone().contiguous() for key, value in model.state_dict().items()}


def write_safetensors(state: dict, path: Path) -> Path:
    save_file(state, str(path))
    return path


def assert_one_line(capsys, words: str) -> None:
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: ") and "\n" not in error and "Traceback" not in error, error
    assert words in error, error


# ---------------------------------------------------------------- what is copied


@pytest.mark.parametrize("num_classes", [5, 3])
def test_copies_every_fitting_tensor_and_reports_exactly_those(tmp_path, caplog, num_classes):
    state = source_state(num_classes=num_classes)
    source = finetune.load_source(str(write_safetensors(state, tmp_path / "source.safetensors")))
    config = finetune.configure(TrainConfig(finetune_from=str(tmp_path / "source.safetensors")), source, given=set())
    with caplog.at_level(logging.INFO, logger="training.finetune"):
        model, init = build_model(config, num_classes=3, source=source)
    copied = {
        key
        for key, value in model.state_dict().items()
        if value.shape == state[key].shape and torch.equal(value, state[key])
    }
    expected_fresh = HEAD if num_classes != 3 else set()
    assert copied == set(state) - expected_fresh  # every conv, BatchNorm and hidden FC tensor; the head if it fits
    assert model.classifier[6].weight.shape == (3, FC_WIDTH)
    messages = [record.getMessage() for record in caplog.records]
    reported_copied = next(m for m in messages if " tensors: " in m).split(" tensors: ", 1)[1].split(", ")
    reported_fresh = next(m for m in messages if m.startswith("not copied")).split(": ", 1)[1]
    assert set(reported_copied) == copied and len(reported_copied) == len(copied)  # exactly what it copied
    assert reported_fresh == "none" if not expected_fresh else set(reported_fresh.split(", ")) == expected_fresh
    assert init.startswith(f"fine-tuned from {tmp_path / 'source.safetensors'}: {len(copied)} tensors copied")


def test_defaults_come_from_the_source_unless_given(tmp_path):
    source = finetune.load_source(str(write_safetensors(source_state(), tmp_path / "s.safetensors")))
    config = finetune.configure(TrainConfig(), source, given=set())
    assert (config.cfg, config.batch_norm, config.fc_width, config.lr) == ("A", True, FC_WIDTH, 1e-3)
    assert (source.mean, source.std) == (list(IMAGENET_MEAN_RGB), list(IMAGENET_STD_RGB))
    given = finetune.configure(
        TrainConfig(cfg="A", lr=0.02, batch_norm=True), source, given={"cfg", "lr", "batch_norm"}
    )
    assert (given.lr, given.cfg) == (0.02, "A")


def test_project_checkpoint_source_keeps_its_normalisation(tmp_path):
    checkpoint = {
        "format": CHECKPOINT_FORMAT,
        "arch": {"cfg": "A", "batch_norm": True, "num_classes": 5, "fc_width": FC_WIDTH},
        "model": source_state(),
        "classes": list("abcde"),
        "preprocess": {"mean": [10.0, 20.0, 30.0], "std": [40.0, 50.0, 60.0], "crop": 32, "test_scale": 36},
    }
    save_checkpoint(checkpoint, tmp_path / "best.pt")
    source = finetune.load_source(str(tmp_path / "best.pt"))
    assert (source.mean, source.std, source.arch["cfg"]) == ([10.0, 20.0, 30.0], [40.0, 50.0, 60.0], "A")


# ---------------------------------------------------------------- end to end


@pytest.mark.slow
def test_finetune_run_with_frozen_features_keeps_them_and_trains_a_new_head(tmp_path, tiny_data):
    state = source_state(num_classes=5)
    path = write_safetensors(state, tmp_path / "vgg_a.safetensors")
    out = tmp_path / "run"
    assert (
        cli([*TINY, "--data", str(tiny_data), "--finetune-from", str(path), "--freeze-features", "--out", str(out)])
        == 0
    )
    checkpoint = load_checkpoint(out / "best.pt")
    model = checkpoint["model"]
    for key, value in state.items():
        if key.startswith("features."):  # frozen: weights and BatchNorm statistics unchanged, bit for bit
            assert torch.equal(model[key], value), key
    assert model["classifier.6.weight"].shape == (3, FC_WIDTH)
    assert not torch.equal(model["classifier.0.weight"], state["classifier.0.weight"])  # the FC layers trained
    assert checkpoint["arch"] == {
        "cfg": "A",
        "batch_norm": True,
        "num_classes": 3,
        "dropout": 0.5,
        "fc_width": FC_WIDTH,
    }
    assert checkpoint["preprocess"]["mean"] == list(IMAGENET_MEAN_RGB)  # the source's normalisation
    assert checkpoint["preprocess"]["std"] == list(IMAGENET_STD_RGB)
    assert checkpoint["config"]["lr"] == 1e-3 and checkpoint["config"]["freeze_features"]
    assert checkpoint["config"]["init_used"].startswith(f"fine-tuned from {path}")


@pytest.mark.slow
def test_scale_finetune_from_a_run_checkpoint_trains_every_layer(tmp_path, tiny_data):
    """The paper's S = 384 fine-tune, small: a run's best.pt, a larger S, lr 1e-3."""
    first = tmp_path / "s36"
    assert cli(["--cfg", "A", "--fc-width", str(FC_WIDTH), *TINY, "--data", str(tiny_data), "--out", str(first)]) == 0
    second = tmp_path / "s44"
    assert (
        cli(
            [
                *TINY,
                "--data",
                str(tiny_data),
                "--finetune-from",
                str(first / "best.pt"),
                "--scale",
                "44",
                "--out",
                str(second),
            ]
        )
        == 0
    )
    before, after = load_checkpoint(first / "best.pt"), load_checkpoint(second / "best.pt")
    assert after["config"]["scale"] == [44] and after["config"]["lr"] == 1e-3
    assert after["preprocess"]["mean"] == before["preprocess"]["mean"]
    assert not torch.equal(after["model"]["features.0.weight"], before["model"]["features.0.weight"])
    assert after["model"]["classifier.6.weight"].shape == before["model"]["classifier.6.weight"].shape


# ---------------------------------------------------------------- one-line errors


@pytest.mark.parametrize(
    "case, words",
    [
        (
            "other_cfg",
            "is VGG-A with BatchNorm (fc width 32), which does not match --cfg D (to pre-initialise a deeper net "
            "from VGG-A, use --init-from)",
        ),
        ("other_batch_norm", "does not match --batch-norm False"),
        ("other_fc_width", "does not match --fc-width 64"),
        ("with_init_from", "give --finetune-from or --init-from, not both"),
        ("freeze_alone", "--freeze-features needs --finetune-from"),
        ("missing_file", "--finetune-from"),
        ("garbage_file", "not a readable checkpoint"),
        ("not_vgg", "matches no VGG configuration"),
    ],
)
def test_mismatches_give_one_line_and_exit_2(tmp_path, tiny_data, capsys, case, words):
    path = write_safetensors(source_state(), tmp_path / "a.safetensors")
    flags = {
        "other_cfg": ["--cfg", "D"],
        "other_batch_norm": ["--no-batch-norm"],
        "other_fc_width": ["--fc-width", "64"],
        "with_init_from": ["--init-from", str(path)],
    }.get(case, [])
    if case == "missing_file":
        path = tmp_path / "absent.pth"
    elif case == "garbage_file":
        path = tmp_path / "garbage.pth"
        path.write_bytes(b"not weights")
    elif case == "not_vgg":
        state = source_state()
        state["features.0.weight"] = torch.zeros(64, 3, 5, 5)
        path = write_safetensors(state, tmp_path / "b.safetensors")
    source = [] if case == "freeze_alone" else ["--finetune-from", str(path)]
    freeze = ["--freeze-features"] if case == "freeze_alone" else []
    assert cli([*TINY, "--data", str(tiny_data), *source, *freeze, *flags, "--out", str(tmp_path / "run")]) == 2
    assert_one_line(capsys, words)
    assert not (tmp_path / "run" / "best.pt").exists()
