"""Uploaded file -> graph input, with every failure turned into an HTTP status and a message."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from vgg.errors import one_line
from vgg.preprocessing import ImageDecodeError, ImageTooLarge, load_graph_input

__all__ = ["ApiError", "SUPPORTED_FORMATS", "preprocess_upload"]

# PIL format names the API accepts (GIF: first frame).
SUPPORTED_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF", "MPO")  # MPO: multi-picture JPEG from cameras


class ApiError(Exception):
    """A request the service answers with ``status`` and a JSON ``{"error": message}``."""

    def __init__(self, status: int, message: str, *, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.retry_after = retry_after  # seconds, sent as Retry-After (503 answers)


def image_format(data: bytes) -> str | None:
    """The format named by the file's header, or None when PIL does not recognise it."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.format
    except Exception:  # unreadable: open_rgb names the problem
        return None


def preprocess_upload(path: Path, *, test_scale: int, max_pixels: int) -> np.ndarray:
    """Decode an uploaded image and make the graph's ``[Q, Q, 3]`` uint8 input (Q = ``test_scale``)
    (:func:`vgg.preprocessing.load_graph_input`: a large JPEG is decoded at reduced size).

    Raises :class:`ApiError`: 400 not an image / empty / truncated, 413 too many pixels,
    415 an image format the API does not take.
    """
    data = path.read_bytes()
    if not data:
        raise ApiError(400, "empty file: the upload has no bytes")
    found = image_format(data)
    if found is not None and found not in SUPPORTED_FORMATS:
        raise ApiError(415, f"unsupported image format {found}; send JPEG, PNG, WebP, BMP, GIF or TIFF")
    try:
        return load_graph_input(data, test_scale, max_pixels=max_pixels)
    except ImageTooLarge as error:
        raise ApiError(413, f"image too large: {error} (VGG_MAX_PIXELS)") from None
    except ImageDecodeError as error:
        raise ApiError(400, f"not a readable image: {error}") from None
    except Exception as error:  # any other decoder failure is still the input's fault
        raise ApiError(400, f"not a readable image: {one_line(error, with_type=True)}") from None
