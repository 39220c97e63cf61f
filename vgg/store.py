"""The BentoML model store entry ``vgg:<version>``: register it in one step, find it, read it.

Export writes entries, the service reads them; both use this module, and only BentoML's
public API (``bentoml.models.create``/``get``/``list``, ``Model.path_of``/``info``/``tag``).

An entry holds ``model.onnx`` (fp32, always), ``model.fp16.onnx`` / ``model.int8.onnx`` when
exported with that precision, and ``classes.json``; its ``metadata`` has cfg, batch_norm,
num_classes, test_scale (Q), crop, mean, std, tta, precisions, checkpoint_sha256 and val_top1.
The store is BentoML's, ``$BENTOML_HOME/models`` (default ``~/bentoml/models``); BentoML reads
``$BENTOML_HOME`` once per process, when the store is first used.

CLI: ``python -m vgg.store --check`` exits 0 if a ``vgg`` model is registered, else 1; without
``--check`` it prints the latest entry's tag and metadata.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from vgg.errors import OneLineArgumentParser

__all__ = [
    "MODEL_NAME",
    "CLASSES_FILE",
    "ONNX_FILES",
    "TEST_SCALE_KEY",
    "register",
    "latest_model",
    "has_model",
    "model_files",
    "model_classes",
    "test_scale_key",
    "main",
]

MODEL_NAME = "vgg"
CLASSES_FILE = "classes.json"
# precision -> file name inside the store entry
ONNX_FILES: dict[str, str] = {"fp32": "model.onnx", "fp16": "model.fp16.onnx", "int8": "model.int8.onnx"}
# The test scale Q in the entry's metadata and in the ONNX file's metadata_props; models
# exported before it was named so carry it as "scale".
TEST_SCALE_KEY = "test_scale"
_OLD_TEST_SCALE_KEY = "scale"


def _bentoml():
    # BentoML's usage tracking would try the network on every save; this project never wants it.
    os.environ.setdefault("BENTOML_DO_NOT_TRACK", "True")
    import bentoml

    return bentoml


def register(*, files: Mapping[str, Path], labels: Mapping[str, str], metadata: Mapping[str, Any]) -> str:
    """Save ``files`` (name in the entry -> existing file) as a new ``vgg`` model; return its tag.

    ``bentoml.models.create`` builds the entry aside and adds it to the store only when
    the ``with`` block ends without an exception, so a failed copy leaves nothing behind.
    """
    bentoml = _bentoml()
    with bentoml.models.create(name=MODEL_NAME, labels=dict(labels), metadata=dict(metadata)) as model:
        for name, source in files.items():
            shutil.copyfile(source, model.path_of(name))
    return str(model.tag)


def latest_model(tag: str = f"{MODEL_NAME}:latest"):
    """The ``bentoml.Model`` for ``tag`` (default ``vgg:latest``); raises ``bentoml.exceptions.NotFound``."""
    return _bentoml().models.get(tag)


def has_model() -> bool:
    """Whether any ``vgg`` model is in the store."""
    bentoml = _bentoml()
    try:
        return bool(bentoml.models.list(MODEL_NAME))
    except bentoml.exceptions.NotFound:
        return False


def model_files(model) -> dict[str, Path]:
    """``{precision: path}`` of the ONNX files present in a store entry (``fp32`` always)."""
    paths = {precision: Path(model.path_of(name)) for precision, name in ONNX_FILES.items()}
    return {precision: path for precision, path in paths.items() if path.is_file()}


def model_classes(model) -> list[str]:
    """Class names of a store entry, index order."""
    return json.loads(Path(model.path_of(CLASSES_FILE)).read_text(encoding="utf-8"))


def test_scale_key(metadata: Mapping[str, Any]) -> str:
    """The key that holds the test scale Q in ``metadata`` (:data:`TEST_SCALE_KEY`, or the
    older ``"scale"`` of a model exported before the rename)."""
    return TEST_SCALE_KEY if TEST_SCALE_KEY in metadata or _OLD_TEST_SCALE_KEY not in metadata else _OLD_TEST_SCALE_KEY


def main(argv: list[str] | None = None) -> int:
    parser = OneLineArgumentParser(prog="python -m vgg.store", description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 0 if a vgg model is registered, else 1")
    args = parser.parse_args(argv)
    if args.check:
        return 0 if has_model() else 1
    if not has_model():
        print(f"no {MODEL_NAME} model in the BentoML store", file=sys.stderr)
        return 1
    model = latest_model()
    print(model.tag)
    print(json.dumps(model.info.metadata, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
