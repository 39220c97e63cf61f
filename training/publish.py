"""Publishing a finished run: its ``best.pt`` exported to ONNX and registered as the served model."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

__all__ = ["ExportFailed", "export_best"]

log = logging.getLogger("training")


class ExportFailed(RuntimeError):
    """Training finished but exporting best.pt did not; one line, exit code 1."""


def export_best(best: Path) -> None:
    """Export and register ``best`` as the served model (the export package's API).

    On a machine without a GPU the export adds the int8 graph (calibrated on training images,
    checked for >= 99% top-1 agreement with fp32 on others), which the service then serves on
    the CPU; when that cannot be done the fp32 model is registered and the log says why."""
    try:
        from export import ExportError, export_checkpoint
    except ImportError as error:
        raise ExportFailed(f"cannot export: {error}; rerun with --no-export, then python -m export") from None
    precision = "fp32" if torch.cuda.is_available() else "int8"
    try:
        result = export_checkpoint(best, register=True, precision=precision, int8_optional=True)
    except ExportError as error:
        raise ExportFailed(f"export of {best} failed: {error}") from None
    log.info(
        "exported %s (%s) -> %s, registered in BentoML as %s",
        best,
        "+".join(result.metadata["precisions"]),
        result.onnx_path,
        result.tag,
    )
