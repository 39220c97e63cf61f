"""`python -m export` refuses bad checkpoints: one line, exit code 2, nothing registered."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from export.__main__ import main
from tests.export_helpers import peaky_model, write_checkpoint
from tests.helpers import repo_env
from vgg import store

pytestmark = pytest.mark.usefixtures("bentoml_home")  # a fresh model store per test


class RunsCode:
    """A pickle payload: unpickling it would run a shell command."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _truncated(tmp_path: Path) -> Path:
    path = write_checkpoint(tmp_path / "full.pt", peaky_model(num_classes=3), classes=["a", "b", "c"])
    data = path.read_bytes()
    (tmp_path / "truncated.pt").write_bytes(data[: len(data) // 2])
    return tmp_path / "truncated.pt"


def _foreign_text(tmp_path: Path) -> Path:
    (tmp_path / "notes.pt").write_text("this is not a checkpoint\n")
    return tmp_path / "notes.pt"


def _foreign_state_dict(tmp_path: Path) -> Path:
    torch.save({"state_dict": {"w": torch.zeros(2)}, "epoch": 3}, tmp_path / "other.pt")
    return tmp_path / "other.pt"


def _code_pickle(tmp_path: Path) -> Path:
    torch.save({"format": "vgg-checkpoint/1", "payload": RunsCode(tmp_path / "pwned")}, tmp_path / "evil.pt")
    return tmp_path / "evil.pt"


def _empty(tmp_path: Path) -> Path:
    (tmp_path / "empty.pt").write_bytes(b"")
    return tmp_path / "empty.pt"


def _wrong_weights(tmp_path: Path) -> Path:
    path = write_checkpoint(tmp_path / "wrong.pt", peaky_model(num_classes=3), classes=["a", "b", "c"])
    checkpoint = torch.load(path, weights_only=True)
    checkpoint["arch"]["num_classes"] = 7
    torch.save(checkpoint, path)
    return path


BAD_CHECKPOINTS = {
    "missing": (lambda tmp_path: tmp_path / "nope.pt", "no such file"),
    "directory": (lambda tmp_path: tmp_path, "not a file"),
    "empty": (_empty, "not a readable checkpoint"),
    "truncated": (_truncated, "not a readable checkpoint"),
    "text": (_foreign_text, "not a readable checkpoint"),
    "foreign_state_dict": (_foreign_state_dict, "not a VGG checkpoint"),
    "code_pickle": (_code_pickle, "refused to load"),
    "wrong_weights": (_wrong_weights, "do not fit VGG-A"),
}


@pytest.mark.parametrize("case", sorted(BAD_CHECKPOINTS))
def test_bad_checkpoint_one_line_exit_2_nothing_registered(tmp_path, capsys, case):
    make, reason = BAD_CHECKPOINTS[case]
    path = make(tmp_path)
    out = tmp_path / "out.onnx"
    assert main(["--checkpoint", str(path), "--out", str(out)]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and reason in lines[0], captured.err
    assert "Traceback" not in captured.err and captured.out == ""
    assert not store.has_model() and not out.exists()
    assert not (tmp_path / "pwned").exists()


@pytest.mark.slow
def test_code_pickle_refused_by_the_real_cli(tmp_path):
    path = _code_pickle(tmp_path)
    result = subprocess.run(
        [sys.executable, "-m", "export", "--checkpoint", str(path)],
        cwd=tmp_path,
        env=repo_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and "refused to load" in result.stderr
    assert not (tmp_path / "pwned").exists()
    assert not store.has_model()


@pytest.mark.parametrize(
    ("arguments", "reason"),
    [
        (["--tta", "twelve"], "argument --tta: invalid choice"),
        (["--calibration-images", "-5"], "must be at least 1, got -5"),
        (["--agreement-images", "10"], "must be at least 500, got 10"),
        (["--agreement-images", "many"], "'many' is not an integer"),
    ],
)
def test_bad_flags_one_line_exit_2(tmp_path, capsys, arguments, reason):
    with pytest.raises(SystemExit) as exit_info:
        main(["--checkpoint", str(tmp_path / "best.pt"), *arguments])
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and reason in lines[0], lines


@pytest.mark.parametrize("flag", ["--test-scale", "--scale"])
def test_test_scale_flag_and_its_earlier_name(tmp_path, capsys, flag):
    path = write_checkpoint(tmp_path / "best.pt", peaky_model(num_classes=3), classes=["a", "b", "c"])
    assert main(["--checkpoint", str(path), flag, "16", "--out", str(tmp_path / "m.onnx")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == ["error: --test-scale is 16; a test scale must be between the crop 32 and 1024"]
    assert not store.has_model()
