"""Preprocessing shared by training, export and the service: one implementation.

Pixel values are in 0..255 throughout. The paper's only preprocessing is "subtracting the
mean RGB value, computed on the training set" (section 2.1); we also divide by the
per-channel std computed on the training set (stored next to the mean in every
checkpoint), which keeps one initialisation scale valid for any data set.
"""

from __future__ import annotations

import io
import re
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps

from vgg.errors import one_line

__all__ = [
    "IMAGENET_MEAN_RGB",
    "IMAGENET_STD_RGB",
    "IMAGENET_PCA_EIGVAL",
    "IMAGENET_PCA_EIGVEC",
    "TEST_SCALE_RATIO",
    "DEFAULT_MAX_PIXELS",
    "IMAGE_EXTENSIONS",
    "ImageDecodeError",
    "ImageTooLarge",
    "MIN_CROP",
    "MAX_SCALE",
    "default_test_scale",
    "DRAFT_FACTOR",
    "header_pixels",
    "open_rgb",
    "load_graph_input",
    "resize_shortest_side",
    "shortest_side_size",
    "center_offset",
    "center_crop",
    "to_graph_input",
]

# torchvision's ImageNet statistics in pixel units: the constants that go with
# torchvision-trained weights. Our own runs compute theirs from the training data.
IMAGENET_MEAN_RGB = (0.485 * 255, 0.456 * 255, 0.406 * 255)
IMAGENET_STD_RGB = (0.229 * 255, 0.224 * 255, 0.225 * 255)
# AlexNet's RGB PCA on ImageNet (the constants of fb.resnet.torch and torchvision's references,
# for 0..1 pixels) in this project's units: eigenvalues x 255^2, eigenvectors as columns.
IMAGENET_PCA_EIGVAL = (0.2175 * 255**2, 0.0188 * 255**2, 0.0045 * 255**2)
IMAGENET_PCA_EIGVEC = (
    (-0.5675, 0.7192, 0.4009),
    (-0.5808, -0.0045, -0.8140),
    (-0.5836, -0.6948, 0.4203),
)

# Test scale Q for a crop: the paper's single-scale setting Q = 256 for a 224 crop
# (torchvision's "resize 256, crop 224" preset); smaller geometries scale with the crop.
TEST_SCALE_RATIO = 256 / 224

# Geometry bounds shared by training and export. VGG's five 2x2 max-pools need a crop of at
# least 32 pixels; training scale S, test scale Q and the crop are at most MAX_SCALE, which
# keeps the decoded and resized images (and the exported graph's input) of bounded size.
MIN_CROP = 32
MAX_SCALE = 1024

# A JPEG is decoded at 1/2, 1/4 or 1/8 size (Pillow's draft) when its shortest side stays at
# least DRAFT_FACTOR x Q; the bilinear antialiased resize to Q then sees enough pixels.
DRAFT_FACTOR = 2

# Pillow's own refusal: images over twice Image.MAX_IMAGE_PIXELS raise DecompressionBombError.
PILLOW_LIMIT = 2 * 89_478_485

# Decompression-bomb limit: 50 megapixels is far above any photo a classifier needs.
DEFAULT_MAX_PIXELS = 50_000_000

# File suffixes read as images from folders (training data, export's check and calibration).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm")

# to_graph_input resizes the whole image up to this aspect ratio, only the central box beyond.
MAX_ASPECT_FOR_FULL_RESIZE = 4

ImageSource = bytes | str | Path | BinaryIO


class ImageDecodeError(ValueError):
    """The input is not a readable image (empty, truncated, unknown format...)."""


class ImageTooLarge(ImageDecodeError):
    """The image header announces more pixels than allowed."""


def default_test_scale(crop: int) -> int:
    return round(crop * TEST_SCALE_RATIO)


def _high_bit_depth_to_8bit(image: Image.Image) -> Image.Image:
    array = np.asarray(image)
    if image.mode == "F":
        top = 1.0 if array.size and float(array.max()) <= 1.0 else 255.0
        return Image.fromarray(np.clip(array / top * 255.0, 0, 255).astype(np.uint8))
    top = 65535 if image.mode.startswith("I;16") or array.max(initial=0) > 255 else 255
    return Image.fromarray((array.astype(np.float64) * (255.0 / top)).round().astype(np.uint8))


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode == "RGB":
        return image
    if image.mode.startswith("I") or image.mode == "F":
        image = _high_bit_depth_to_8bit(image)
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))  # transparent -> white
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def _plan_decode(image: Image.Image, reduce_for: int | None) -> tuple[int, int]:
    """Ask a JPEG decoder for a reduced size (DCT scaling by 1/2, 1/4 or 1/8, Pillow's ``draft``)
    that keeps the shortest side at least ``DRAFT_FACTOR * reduce_for``; the size that will be
    decoded. Other formats decode at their declared size."""
    if reduce_for is not None and image.format in ("JPEG", "MPO"):
        image.draft(None, (DRAFT_FACTOR * reduce_for, DRAFT_FACTOR * reduce_for))
    return image.size


def _bomb_error(error: Image.DecompressionBombError, max_pixels: int | None) -> ImageTooLarge:
    """Pillow's own refusal (past its hard limit), worded with our limit."""
    found = re.search(r"\((\d+) pixels\)", str(error))
    pixels = found.group(1) if found else "more than 178956970"
    return ImageTooLarge(f"image is {pixels} pixels, limit is {max_pixels if max_pixels is not None else PILLOW_LIMIT}")


def header_pixels(source: ImageSource, *, reduce_for: int | None = None) -> tuple[int, int]:
    """``(declared, decoded)`` pixels of an image, read from its header only: the declared
    width x height, and what :func:`open_rgb` will decode (after JPEG draft reduction for
    ``reduce_for``). What a tiny file declaring a huge image costs. ``(0, 0)`` for a file that
    is not a readable image (decoding it reports why)."""
    if isinstance(source, (bytes, bytearray)):
        source = io.BytesIO(source)
    try:
        with Image.open(source) as image:
            width, height = image.size
            decoded_width, decoded_height = _plan_decode(image, reduce_for)
            return width * height, decoded_width * decoded_height
    except Image.DecompressionBombError as error:
        found = re.search(r"\((\d+) pixels\)", str(error))
        pixels = int(found.group(1)) if found else PILLOW_LIMIT + 1
        return pixels, pixels
    except Exception:  # noqa: BLE001 - unreadable: open_rgb names the problem
        return 0, 0


def open_rgb(
    source: ImageSource, *, max_pixels: int | None = DEFAULT_MAX_PIXELS, reduce_for: int | None = None
) -> Image.Image:
    """Decode an image (first frame), apply its EXIF orientation and return it as RGB.

    The pixel count is checked from the header before the image is decoded. ``reduce_for``
    (a test scale Q): a JPEG far larger than Q is decoded at a reduced size (shortest side at
    least ``DRAFT_FACTOR * Q``), much faster and in a fraction of the memory.
    Raises :class:`ImageTooLarge` or :class:`ImageDecodeError` with a one-line reason, also
    for unexpected decoder exceptions, so callers need to catch only ImageDecodeError.
    """
    if isinstance(source, (bytes, bytearray)):
        if not source:
            raise ImageDecodeError("empty file")
        source = io.BytesIO(source)
    try:
        with Image.open(source) as image:
            width, height = image.size
            if max_pixels is not None and width * height > max_pixels:
                raise ImageTooLarge(f"image is {width}x{height} = {width * height} pixels, limit is {max_pixels}")
            image.seek(0)
            _plan_decode(image, reduce_for)
            image.load()
            image = ImageOps.exif_transpose(image)
            return _to_rgb(image)
    except ImageDecodeError:
        raise
    except Image.DecompressionBombError as error:
        raise _bomb_error(error, max_pixels) from None
    except Image.UnidentifiedImageError:
        raise ImageDecodeError("not a recognised image format") from None
    except Exception as error:  # odd files make decoders raise struct.error, KeyError, ZeroDivisionError...
        raise ImageDecodeError(one_line(error)) from None


def load_graph_input(
    source: ImageSource, test_scale: int, *, max_pixels: int | None = DEFAULT_MAX_PIXELS
) -> np.ndarray:
    """The graph input ``[Q, Q, 3]`` (Q = ``test_scale``) for an image file, decoded as the
    service decodes uploads (JPEG draft reduction for Q): the one path for the service,
    export's checks and offline evaluation of a served model."""
    return to_graph_input(open_rgb(source, max_pixels=max_pixels, reduce_for=test_scale), test_scale)


def resize_shortest_side(image: Image.Image, size: int) -> Image.Image:
    """Isotropic rescale so the shortest side is ``size``: Pillow's antialiased bilinear filter
    and torchvision's output size (see :func:`shortest_side_size`), i.e. exactly torchvision's
    ``Resize(size)`` on a PIL image."""
    width, height = image.size
    if min(width, height) == size:
        return image
    return image.resize(shortest_side_size(width, height, size), Image.Resampling.BILINEAR)


def center_offset(size: int, crop: int) -> int:
    """Offset of a centred ``crop`` inside ``size`` pixels, rounded as torchvision's
    ``center_crop`` (``int(round((size - crop) / 2))``): the one rule for training,
    export and serving."""
    return int(round((size - crop) / 2.0))


def center_crop(image: Image.Image, size: int) -> Image.Image:
    width, height = image.size
    left, top = center_offset(width, size), center_offset(height, size)
    return image.crop((left, top, left + size, top + size))


def shortest_side_size(width: int, height: int, size: int) -> tuple[int, int]:
    """``(width, height)`` with the shortest side ``size`` and the long side
    ``int(size * long / short)``: truncated, not rounded, exactly as torchvision's ``Resize``
    (``_compute_resized_output_size``), so that a 300x199 image becomes 385x256 in both and
    accuracies published for torchvision's pipeline carry over."""
    if width <= height:
        return size, max(1, int(size * height / width))
    return max(1, int(size * width / height)), size


def to_graph_input(image: Image.Image, test_scale: int) -> np.ndarray:
    """The exported graph's input for one image: ``[Q, Q, 3]`` uint8 RGB (Q = ``test_scale``).

    Shortest side to ``test_scale``, then the central ``Q x Q`` square: exactly
    :func:`center_crop` of :func:`resize_shortest_side`. Beyond a 4:1 aspect ratio only the
    source box that maps onto the square is resampled (same filter taps, within one grey
    level), so memory stays bounded by ``test_scale`` even for a 1 x 8,000,000 image.
    """
    width, height = image.size
    resized_width, resized_height = shortest_side_size(width, height, test_scale)
    if max(resized_width, resized_height) <= MAX_ASPECT_FOR_FULL_RESIZE * test_scale:
        square = center_crop(resize_shortest_side(image, test_scale), test_scale)
    else:
        left, top = center_offset(resized_width, test_scale), center_offset(resized_height, test_scale)
        x_ratio, y_ratio = width / resized_width, height / resized_height
        box = (left * x_ratio, top * y_ratio, (left + test_scale) * x_ratio, (top + test_scale) * y_ratio)
        square = image.resize((test_scale, test_scale), Image.Resampling.BILINEAR, box=box)
    return np.asarray(square, dtype=np.uint8).reshape(test_scale, test_scale, 3)
