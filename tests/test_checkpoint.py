"""Checkpoints: atomic writes, safe loads, clear refusals."""

from __future__ import annotations

import os
import pickle

import pytest
import torch

import vgg
from vgg.checkpoint import CHECKPOINT_FORMAT, CheckpointError, load_checkpoint, model_from_checkpoint, save_checkpoint

pytestmark = pytest.mark.filterwarnings("ignore:Detected pickle protocol")


def make_checkpoint(model: vgg.VGG) -> dict:
    return {
        "format": CHECKPOINT_FORMAT,
        "arch": {"cfg": "A", "batch_norm": False, "num_classes": 3, "dropout": 0.5, "fc_width": 32},
        "model": model.state_dict(),
        "classes": ["cat", "dog", "fish"],
        "preprocess": {"mean": [120.0, 110.0, 100.0], "std": [60.0, 60.0, 60.0], "crop": 32, "test_scale": 37},
        "metrics": {"epoch": 3, "val_top1": 0.5},
    }


@pytest.fixture
def model() -> vgg.VGG:
    torch.manual_seed(0)
    return vgg.build("A", num_classes=3, fc_width=32)


def test_round_trip_rebuilds_the_same_model(tmp_path, model):
    path = tmp_path / "runs" / "best.pt"
    save_checkpoint(make_checkpoint(model), path)
    assert sorted(p.name for p in path.parent.iterdir()) == ["best.pt"]  # no temp file left
    loaded = load_checkpoint(path)
    assert loaded["classes"] == ["cat", "dog", "fish"] and loaded["metrics"]["epoch"] == 3
    rebuilt = model_from_checkpoint(loaded)
    assert not rebuilt.training
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), model.eval()(x), rtol=0, atol=0)


def test_failed_write_keeps_the_previous_file(tmp_path, model, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint(make_checkpoint(model), path)
    before = path.read_bytes()

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(make_checkpoint(model), path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


class RunsCode:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


@pytest.mark.parametrize(
    "content, reason",
    [
        (b"", "not a readable checkpoint"),
        (b"hello, I am a text file\n", "not a readable checkpoint"),
        (pickle.dumps(RunsCode()), "refused to load|not a readable checkpoint"),
    ],
)
def test_refuses_foreign_and_malicious_files(tmp_path, content, reason):
    path = tmp_path / "bad.pt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=reason):
        load_checkpoint(path)


def test_refuses_a_torch_file_with_code(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"format": CHECKPOINT_FORMAT, "payload": RunsCode()}, path)
    with pytest.raises(CheckpointError, match="refused to load") as error:
        load_checkpoint(path)
    assert "\n" not in str(error.value)


def test_refuses_truncated_checkpoint(tmp_path, model):
    path = tmp_path / "best.pt"
    save_checkpoint(make_checkpoint(model), path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        load_checkpoint(path)


def test_refuses_other_torch_files_and_missing_paths(tmp_path, model):
    state_dict_only = tmp_path / "weights.pt"
    torch.save(model.state_dict(), state_dict_only)
    with pytest.raises(CheckpointError, match="not a VGG checkpoint"):
        load_checkpoint(state_dict_only)
    with pytest.raises(CheckpointError, match="no such file"):
        load_checkpoint(tmp_path / "missing.pt")
    with pytest.raises(CheckpointError, match="not a file"):
        load_checkpoint(tmp_path)


def test_refuses_weights_of_another_architecture(tmp_path, model):
    checkpoint = make_checkpoint(model)
    checkpoint["arch"]["cfg"] = "D"
    with pytest.raises(CheckpointError, match="do not fit VGG-D"):
        model_from_checkpoint(checkpoint)


def test_refuses_text_that_trips_the_unpickler(tmp_path):
    path = tmp_path / "notes.pt"
    path.write_text("just some text that is long enough to look like something\n" * 50)
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        load_checkpoint(path)
