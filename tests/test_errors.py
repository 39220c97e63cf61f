"""One-line error text: the shared helper, and the callers that once indexed an empty message."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from vgg.errors import MESSAGE_LIMIT, OneLineArgumentParser, one_line


class Silent(Exception):
    """An exception whose message is empty, as many library errors are."""


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (ValueError("bad value"), "bad value"),
        (ValueError("first line\nsecond line"), "first line"),
        (ValueError("\n   \n  indented first\nnext"), "indented first"),
        (ValueError(""), "ValueError"),
        (Silent(), "Silent"),
        (RuntimeError("   \n\t\n"), "RuntimeError"),
        (KeyError("arch"), "'arch'"),
    ],
)
def test_one_line_is_the_first_non_blank_line_or_the_type_name(error, expected):
    assert one_line(error) == expected


def test_one_line_cuts_long_lines_and_can_name_the_type():
    long = ValueError("x" * (MESSAGE_LIMIT + 50))
    assert one_line(long) == "x" * MESSAGE_LIMIT
    assert one_line(long, limit=10) == "x" * 10
    assert one_line(KeyError("arch"), with_type=True) == "KeyError: 'arch'"
    assert one_line(Silent(), with_type=True) == "Silent"


def test_argument_errors_are_one_line_and_exit_2(capsys):
    parser = OneLineArgumentParser(prog="tool")
    parser.add_argument("--count", type=int)
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args(["--count", "many"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: argument --count") and err.count("\n") == 1


def test_checkpoint_errors_with_empty_messages(tmp_path, monkeypatch):
    import torch

    from vgg import checkpoint

    path = tmp_path / "x.pt"
    path.write_bytes(b"not a checkpoint")

    def raise_silent(*args, **kwargs):
        raise Silent()

    monkeypatch.setattr(torch, "load", raise_silent)
    with pytest.raises(checkpoint.CheckpointError, match=r"not a readable checkpoint \(Silent\)$"):
        checkpoint.load_checkpoint(path)
    monkeypatch.setattr(checkpoint, "build", lambda *a, **k: (_ for _ in ()).throw(ValueError()))
    arch = {"cfg": "A", "num_classes": 2, "batch_norm": False}
    with pytest.raises(checkpoint.CheckpointError, match=r"not a buildable VGG \(ValueError\)$"):
        checkpoint.model_from_checkpoint({"arch": arch, "model": {}})


def test_decoder_errors_with_empty_messages(tmp_path, monkeypatch):
    from PIL import Image

    from vgg.preprocessing import ImageDecodeError, open_rgb

    path = tmp_path / "a.png"
    Image.new("RGB", (4, 4)).save(path)

    def raise_silent(self):
        raise Silent()

    monkeypatch.setattr(Image.Image, "load", raise_silent)
    monkeypatch.setattr("PIL.ImageFile.ImageFile.load", raise_silent)
    with pytest.raises(ImageDecodeError, match=r"^Silent$"):
        open_rgb(path)


def test_engine_errors_with_empty_messages(tmp_path, monkeypatch):
    import onnxruntime as ort

    from serving.engine import EngineError, resolve_model

    path = tmp_path / "m.onnx"
    path.write_bytes(b"junk")

    def raise_silent(*args, **kwargs):
        raise Silent()

    monkeypatch.setattr(ort, "InferenceSession", raise_silent)
    with pytest.raises(EngineError, match=r"not a loadable ONNX model \(Silent\)$"):
        resolve_model(str(path))


def test_export_errors_with_empty_messages(monkeypatch):
    from export import core

    def raise_silent(*args, **kwargs):
        raise Silent()

    monkeypatch.setattr(core, "to_onnx", raise_silent)
    monkeypatch.setattr(core, "InferenceGraph", lambda *a, **k: None)
    with pytest.raises(core.ExportError, match=r"torch.onnx export failed: Silent$"):
        core._export_graph(
            SimpleNamespace(model=None, mean=None, std=None, crop=1, test_scale=1, test_scales=None),
            tta="five",
            half=False,
        )
