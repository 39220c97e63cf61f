"""Images for the export checks, and running an ONNX model on them.

Check images are real training images (decoded and resized exactly as the service does:
:func:`vgg.preprocessing.load_graph_input`) plus random
uint8 images, which exercise every pixel value.
"""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from vgg.preprocessing import IMAGE_EXTENSIONS, ImageDecodeError, load_graph_input

__all__ = [
    "image_files",
    "training_folder",
    "load_graph_inputs",
    "random_images",
    "session",
    "run_onnx",
    "top1_agreement",
]

logger = logging.getLogger(__name__)


def training_folder(data: str | os.PathLike | None) -> Path | None:
    """The ImageNet-style training folder of a checkpoint's ``config["data"]`` (``data/train``
    when it has one, else ``data``), or ``None`` if it is not there."""
    if not data:
        return None
    root = Path(data).expanduser()
    for folder in (root / "train", root):
        if folder.is_dir():
            return folder
    return None


def image_files(folder: str | os.PathLike, *, seed: int = 0) -> list[Path]:
    """All image files under ``folder``, in a fixed shuffled order (``seed``), so that any
    prefix samples all classes."""
    files = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    random.Random(seed).shuffle(files)
    return files


def load_graph_inputs(files: Sequence[Path], *, test_scale: int) -> np.ndarray:
    """``[N, Q, Q, 3]`` (Q = ``test_scale``) uint8 graph inputs; unreadable files are skipped with a warning."""
    images = []
    for path in files:
        try:
            images.append(load_graph_input(path, test_scale))
        except ImageDecodeError as error:
            logger.warning("skipping %s: %s", path, error)
    return np.stack(images) if images else np.zeros((0, test_scale, test_scale, 3), dtype=np.uint8)


def random_images(count: int, *, test_scale: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(count, test_scale, test_scale, 3), dtype=np.uint8)


def session(
    model: onnx.ModelProto | str | os.PathLike, *, providers: Sequence[str] | None = None
) -> ort.InferenceSession:
    """An ONNX Runtime session; the CPU provider unless ``providers`` says otherwise."""
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(source, providers=list(providers or ["CPUExecutionProvider"]))


def run_onnx(model: ort.InferenceSession, images: np.ndarray, *, batch: int = 8) -> np.ndarray:
    """``probs`` for ``images`` in batches of ``batch``."""
    outputs = [model.run(None, {"images": images[i : i + batch]})[0] for i in range(0, len(images), batch)]
    return np.concatenate(outputs) if outputs else np.zeros((0, 0), dtype=np.float32)


def top1_agreement(probs: np.ndarray, reference: np.ndarray) -> float:
    """Fraction of rows whose arg-max is the same in both."""
    return float(np.mean(probs.argmax(axis=1) == reference.argmax(axis=1)))
