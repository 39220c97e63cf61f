"""PyTorch -> ONNX, and the model's self-description in ONNX ``metadata_props``.

Exporter: ``torch.onnx.export(..., dynamo=True)``, the ``torch.export``-based exporter that
torch 2.14 recommends (the TorchScript exporter is deprecated), at its default opset
(:data:`OPSET`, 20 with torch 2.14), with its ONNX-level optimisation pass. No fallback to
the TorchScript exporter: a graph it cannot export is an export failure.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import onnx
import torch

from export.graph import InferenceGraph

__all__ = [
    "INPUT_NAME",
    "OUTPUT_NAME",
    "OPSET",
    "STRING_KEYS",
    "to_onnx",
    "set_metadata",
    "read_metadata",
    "save_onnx",
    "EXPORTER_LOGGERS",
    "quiet_exporter_logs",
    "show_exporter_logs",
]

logger = logging.getLogger(__name__)

INPUT_NAME = "images"
OUTPUT_NAME = "probs"
OPSET = 20  # torch 2.14's default for the dynamo exporter; pinned so exports are reproducible

# metadata_props values are strings: these keys are stored as they are, every other key as JSON.
STRING_KEYS = frozenset({"cfg", "tta", "precision", "checkpoint_sha256"})

# Loggers of the exporter, its ONNX optimiser and ONNX Runtime's quantizer. Their INFO records
# ("The value 'start' is not 0", "Replaced initializer ...") mean nothing to a user.
EXPORTER_LOGGERS = ("torch.onnx", "torch.export", "onnxscript", "onnx_ir", "onnxruntime")


@contextlib.contextmanager
def quiet_exporter_logs() -> Iterator[None]:
    """Within the block, :data:`EXPORTER_LOGGERS` drop records below WARNING, unless a logger's
    level was set explicitly (:func:`show_exporter_logs`, the command lines' ``-v``)."""
    quieted = [logging.getLogger(name) for name in EXPORTER_LOGGERS]
    quieted = [logger for logger in quieted if logger.level == logging.NOTSET]
    for logger in quieted:
        logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for logger in quieted:
            logger.setLevel(logging.NOTSET)


def show_exporter_logs(level: int = logging.INFO) -> None:
    """Let :data:`EXPORTER_LOGGERS` log from ``level`` on (a command line's ``-v``)."""
    for name in EXPORTER_LOGGERS:
        logging.getLogger(name).setLevel(level)


def to_onnx(graph: InferenceGraph) -> onnx.ModelProto:
    """Export ``graph`` with a dynamic batch dimension ``N``; returns the checked model."""
    example = torch.zeros(2, graph.test_scale, graph.test_scale, 3, dtype=torch.uint8)
    with quiet_exporter_logs():
        program = _export_program(graph, example)
    return program.model_proto


def _export_program(graph: InferenceGraph, example: torch.Tensor):
    return torch.onnx.export(
        graph.eval(),
        (example,),
        dynamo=True,
        opset_version=OPSET,
        input_names=[INPUT_NAME],
        output_names=[OUTPUT_NAME],
        dynamic_shapes={"images": {0: torch.export.Dim("N")}},
        external_data=False,
        optimize=True,
        verbose=False,
    )


def set_metadata(model: onnx.ModelProto, metadata: dict[str, Any]) -> None:
    """Replace ``model.metadata_props`` with ``metadata`` (see :data:`STRING_KEYS`)."""
    del model.metadata_props[:]
    for key, value in metadata.items():
        text = value if key in STRING_KEYS and isinstance(value, str) else json.dumps(value)
        model.metadata_props.add(key=key, value=text)


def read_metadata(model: onnx.ModelProto | str | os.PathLike) -> dict[str, Any]:
    """The decoded ``metadata_props`` of a model or ``.onnx`` file (weights are not loaded)."""
    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model), load_external_data=False)
    return {
        prop.key: prop.value if prop.key in STRING_KEYS else json.loads(prop.value) for prop in model.metadata_props
    }


def save_onnx(model: onnx.ModelProto, path: str | os.PathLike, *, full_check: bool = True) -> Path:
    """Check (``onnx.checker`` full check, i.e. with shape inference) and write ``path``."""
    if full_check:
        onnx.checker.check_model(model, full_check=True)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    logger.info("wrote %s (%.1f MB)", path, path.stat().st_size / 1e6)
    return path
