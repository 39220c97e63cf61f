"""Image decoding and geometry shared by training, export and the service."""

from __future__ import annotations

import io
import struct

import numpy as np
import pytest
from PIL import Image

from vgg import preprocessing
from vgg.preprocessing import (
    ImageDecodeError,
    ImageTooLarge,
    center_crop,
    center_offset,
    default_test_scale,
    open_rgb,
    resize_shortest_side,
    shortest_side_size,
    to_graph_input,
)


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def gradient(width: int = 40, height: int = 30) -> Image.Image:
    x = np.linspace(0, 255, width, dtype=np.uint8)[None, :].repeat(height, 0)
    y = np.linspace(0, 255, height, dtype=np.uint8)[:, None].repeat(width, 1)
    return Image.fromarray(np.stack([x, y, 255 - x], axis=-1), "RGB")


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF"])
def test_every_format_decodes_to_rgb(fmt):
    image = open_rgb(encode(gradient(), fmt))
    assert image.mode == "RGB" and image.size == (40, 30)


@pytest.mark.parametrize("mode", ["L", "LA", "RGBA", "P", "CMYK", "I;16", "I", "F", "1"])
def test_every_mode_converts_to_rgb(mode):
    source = gradient().convert("L") if mode in ("I;16", "I", "F") else gradient()
    if mode == "I;16":
        image = Image.fromarray(np.asarray(source, dtype=np.uint16) * 257)
        assert image.mode == "I;16"
    elif mode == "I":
        image = Image.fromarray(np.asarray(source, dtype=np.int32) * 257)
    elif mode == "F":
        image = Image.fromarray(np.asarray(source, dtype=np.float32) / 255.0)
    else:
        image = source.convert(mode)
    rgb = open_rgb(encode(image, "TIFF"))
    assert rgb.mode == "RGB" and rgb.size == (40, 30)
    array = np.asarray(rgb)
    if mode in ("I;16", "I", "F"):  # 16-bit and float ranges are rescaled, not clipped
        expected = np.asarray(source)
        assert np.abs(array[..., 0].astype(int) - expected).max() <= 1


def test_transparent_pixels_become_white():
    image = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    assert np.asarray(open_rgb(encode(image, "PNG"))).min() == 255


def test_16_bit_png_is_rescaled():
    array = np.full((8, 8), 65535, dtype=np.uint16)
    array[:4] = 0
    rgb = np.asarray(open_rgb(encode(Image.fromarray(array), "PNG")))
    assert rgb[:4].max() == 0 and rgb[4:].min() == 255


def test_exif_orientation_is_applied():
    image = gradient(40, 30)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    rotated = open_rgb(encode(image, "JPEG", exif=exif.tobytes()))
    assert rotated.size == (30, 40)


def test_gif_first_frame():
    frames = [Image.new("RGB", (8, 8), colour) for colour in ((255, 0, 0), (0, 0, 255))]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:])
    array = np.asarray(open_rgb(buffer.getvalue()))
    assert array[..., 0].mean() > 200 and array[..., 2].mean() < 50


@pytest.mark.parametrize(
    "data, reason",
    [
        (b"", "empty file"),
        (b"definitely not an image", "not a recognised image format"),
    ],
)
def test_bad_bytes_are_refused_with_a_reason(data, reason):
    with pytest.raises(ImageDecodeError, match=reason):
        open_rgb(data)


def test_truncated_image_is_refused():
    data = encode(gradient(200, 200), "PNG")
    with pytest.raises(ImageDecodeError) as error:
        open_rgb(data[: len(data) // 2])
    assert "\n" not in str(error.value)


@pytest.mark.parametrize(
    "exception", [struct.error("unpack requires a buffer of 4 bytes"), KeyError(274), ZeroDivisionError()]
)
def test_unexpected_decoder_exceptions_become_decode_errors(monkeypatch, exception):
    def broken_exif(image):
        raise exception

    monkeypatch.setattr(preprocessing.ImageOps, "exif_transpose", broken_exif)
    with pytest.raises(ImageDecodeError) as error:
        open_rgb(encode(gradient(), "JPEG"))
    assert "\n" not in str(error.value) and str(error.value)


def test_decompression_bomb_is_refused_from_the_header():
    # A 1-bit PNG of 8000 x 8000 pixels is only a few kB compressed.
    data = encode(Image.new("1", (8_000, 8_000)), "PNG")
    assert len(data) < 100_000
    with pytest.raises(ImageTooLarge, match="8000x8000"):
        open_rgb(data, max_pixels=10_000_000)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_pillow_own_bomb_limit_is_reported_as_too_large():
    data = encode(Image.new("1", (20_000, 20_000)), "PNG")  # 400 Mpx: over Pillow's hard limit too
    with pytest.raises(ImageTooLarge, match="^image is 400000000 pixels, limit is 178956970$"):
        open_rgb(data, max_pixels=None)
    with pytest.raises(ImageTooLarge, match="^image is 400000000 pixels, limit is 50000000$"):
        open_rgb(data)  # our limit, not Pillow's, in the message


@pytest.mark.parametrize(
    "size, expected",
    [
        ((400, 300), (341, 256)),
        ((300, 400), (256, 341)),
        ((256, 256), (256, 256)),
        ((300, 199), (385, 256)),
        ((451, 300), (384, 256)),
    ],
)
def test_resize_shortest_side(size, expected):
    # 300x199 -> 385.9 and 451x300 -> 384.9: truncated like torchvision's Resize, not rounded
    assert resize_shortest_side(Image.new("RGB", size), 256).size == expected


def test_shortest_side_size_is_torchvision_s_for_every_shape():
    from torchvision.transforms.functional import _compute_resized_output_size

    for width in range(1, 700, 7):
        for height in range(1, 700, 11):
            for size in (224, 256, 384):
                expected_height, expected_width = _compute_resized_output_size((height, width), [size])
                assert shortest_side_size(width, height, size) == (expected_width, expected_height)


@pytest.mark.parametrize("size", [(300, 199), (199, 300), (451, 300), (1000, 872), (640, 427), (256, 300), (256, 256)])
def test_resize_shortest_side_is_torchvision_resize_pixel_for_pixel(size):
    from torchvision import transforms

    image = Image.fromarray(np.random.default_rng(2).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    expected = np.asarray(transforms.Resize(256)(image))  # PIL path: antialiased bilinear
    np.testing.assert_array_equal(np.asarray(resize_shortest_side(image, 256)), expected)


def test_center_crop_takes_the_middle():
    array = np.zeros((10, 12, 3), dtype=np.uint8)
    array[3:7, 4:8] = 255
    cropped = np.asarray(center_crop(Image.fromarray(array), 4))
    assert cropped.min() == 255


@pytest.mark.parametrize("width, height, size", [(12, 10, 4), (11, 7, 4), (7, 11, 4), (40, 37, 30), (37, 37, 32)])
def test_center_crop_matches_torchvision_rounding(width, height, size):
    from torchvision.transforms import v2

    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8))
    expected = np.asarray(v2.CenterCrop(size)(image))
    np.testing.assert_array_equal(np.asarray(center_crop(image, size)), expected)


@pytest.mark.parametrize("size, crop, offset", [(37, 32, 2), (13, 4, 4), (11, 4, 4), (10, 4, 3), (4, 4, 0)])
def test_center_offset_rounds_like_torchvision(size, crop, offset):
    assert center_offset(size, crop) == offset


@pytest.mark.parametrize("size", [(1, 8_000_000), (8_000_000, 1)])
def test_graph_input_of_a_thin_image_has_bounded_memory(size):
    # About 30 kB of PNG; resizing all of it would ask for 256 x 2e9 pixels.
    image = open_rgb(encode(Image.new("L", size, 77), "PNG"))
    array = to_graph_input(image, 256)
    assert array.shape == (256, 256, 3) and np.all(array == 77)


@pytest.mark.parametrize("size", [(40, 300), (300, 40), (120, 100), (100, 100)])
def test_graph_input_is_resize_then_centre_crop(size):
    from torchvision.transforms import v2

    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    expected = np.asarray(v2.CenterCrop(64)(resize_shortest_side(image, 64))).astype(int)
    tolerance = 0 if max(size) <= 4 * min(size) else 1  # past 4:1 only the central box is resampled
    assert np.abs(to_graph_input(image, 64).astype(int) - expected).max() <= tolerance


def test_graph_input_shape_and_type():
    array = to_graph_input(gradient(100, 60), 37)
    assert array.shape == (37, 37, 3) and array.dtype == np.uint8


def test_default_test_scale_follows_the_paper_ratio():
    assert default_test_scale(224) == 256
    assert default_test_scale(56) == 64
