"""Export a training checkpoint to the ONNX model the service runs, check it, register it.

``from export import export_checkpoint``; CLI: ``python -m export --checkpoint runs/D/best.pt``.
See :mod:`export.core` for the steps and :mod:`export.graph` for what the graph computes.
The names are loaded on first use, so importing :mod:`export` alone does not import torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = ["ExportError", "ExportResult", "export_checkpoint"]

if TYPE_CHECKING:
    from export.core import ExportError, ExportResult, export_checkpoint


def __getattr__(name: str) -> Any:
    if name in __all__:
        from export import core

        return getattr(core, name)
    raise AttributeError(f"module 'export' has no attribute {name!r}")
