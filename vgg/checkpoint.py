"""Training checkpoints: written atomically, read without unpickling code.

A checkpoint is a plain dict (tensors, numbers, strings, lists, dicts), loadable with
``torch.load(weights_only=True)``::

    format       "vgg-checkpoint/1"
    arch         {"cfg": "D", "batch_norm": False, "num_classes": 10, "dropout": 0.5, "fc_width": 4096}
    model        the model's state_dict
    classes      class names, index order
    preprocess   {"mean": [r, g, b], "std": [r, g, b], "pca_eigval": [3], "pca_eigvec": [[3]x3],
                  "crop": 224, "test_scale": 256}   (pixel units, 0..255)
    metrics      {"epoch": int, "val_top1": float, "val_top5": float, ...} (accuracies, 0..1)
    config       the resolved training configuration
    optimizer, lr_rule, epoch, rng   resume state (training only)
"""

from __future__ import annotations

import os
import pickle
import re
import tempfile
from pathlib import Path
from typing import Any

import torch

from vgg.errors import one_line
from vgg.model import FC_WIDTH, VGG, build

__all__ = ["CHECKPOINT_FORMAT", "CheckpointError", "save_checkpoint", "load_checkpoint", "model_from_checkpoint"]

CHECKPOINT_FORMAT = "vgg-checkpoint/1"
REQUIRED_KEYS = ("format", "arch", "model", "classes", "preprocess")


class CheckpointError(ValueError):
    """A file that is missing, truncated, foreign or unsafe to load as a checkpoint."""


def save_checkpoint(checkpoint: dict[str, Any], path: str | os.PathLike) -> None:
    """Write ``checkpoint`` to ``path`` atomically: temp file, fsync, rename, fsync dir."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as file:
            torch.save(checkpoint, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temp_name, path)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def _unsafe_reason(error: pickle.UnpicklingError) -> str:
    """Why ``torch.load(weights_only=True)`` refused a file, in this project's words (torch's
    own message suggests loading it unsafely, which must not be repeated as advice)."""
    named = re.search(r"(?:GLOBAL|global) '?([\w.]+)", str(error))
    found = f" (it references {named.group(1)})" if named else ""
    return (f"it holds Python objects other than tensors and plain data{found}, and unpickling them could run "
            "code; only checkpoints written by training.run are accepted")


def load_checkpoint(path: str | os.PathLike, *, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load and validate a checkpoint; raise :class:`CheckpointError` with a one-line reason."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file")
    if not path.is_file():
        raise CheckpointError(f"{path}: not a file")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        raise CheckpointError(f"{path}: refused to load: {_unsafe_reason(error)}") from None
    except Exception as error:  # torch.load raises many types on foreign bytes; all mean "not readable"
        raise CheckpointError(f"{path}: not a readable checkpoint ({one_line(error, with_type=True)})") from None
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: not a VGG checkpoint (expected format {CHECKPOINT_FORMAT!r})")
    missing = [key for key in REQUIRED_KEYS if key not in checkpoint]
    if missing:
        raise CheckpointError(f"{path}: checkpoint lacks {', '.join(missing)}")
    return checkpoint


def model_from_checkpoint(checkpoint: dict[str, Any]) -> VGG:
    """Rebuild the model of a loaded checkpoint (in eval mode, on the CPU).

    Raises :class:`CheckpointError` when ``arch`` lacks a key or holds an unusable value, or
    when the weights do not fit the architecture.
    """
    arch = checkpoint.get("arch")
    if not isinstance(arch, dict):
        raise CheckpointError("checkpoint 'arch' is not a dict")
    missing = [key for key in ("cfg", "num_classes", "batch_norm") if key not in arch]
    if missing:
        raise CheckpointError(f"checkpoint 'arch' lacks {', '.join(missing)}")
    try:
        model = build(
            arch["cfg"],
            num_classes=arch["num_classes"],
            batch_norm=arch["batch_norm"],
            dropout=arch.get("dropout", 0.5),
            fc_width=arch.get("fc_width", FC_WIDTH),
        )
    except (KeyError, TypeError, ValueError, RuntimeError) as error:
        raise CheckpointError(f"checkpoint 'arch' is not a buildable VGG ({one_line(error)})") from None
    try:
        model.load_state_dict(checkpoint["model"], strict=True)
    except (RuntimeError, TypeError, AttributeError, KeyError) as error:
        raise CheckpointError(f"checkpoint weights do not fit VGG-{arch['cfg']}: {one_line(error)}") from None
    return model.eval()
