"""Test-time protocols (paper, sections 3.2 and 4) against independent computations: torchvision's
FiveCrop/TenCrop/CenterCrop, PIL crops one by one, and the grid's boxes by coordinates."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

from tests.training_helpers import coordinate_image
from vgg import protocols
from vgg.preprocessing import center_offset


class TinyNet(torch.nn.Module):
    """A fixed random conv net: any crop size in, 7 class scores out."""

    def __init__(self) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 8, 3)
        self.head = torch.nn.Linear(8, 7)
        with torch.no_grad():
            for parameter in self.parameters():
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.conv(images)).amax(dim=(2, 3)))


def by_hand(net, views: list[torch.Tensor]) -> torch.Tensor:
    """Softmax of each view on its own, averaged: ``[N, C]``."""
    with torch.no_grad():
        return torch.stack([torch.softmax(net(view), dim=1) for view in views]).mean(dim=0)


def random_images(count: int, size: int, seed: int = 0) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).normal(size=(count, 3, size, size)).astype(np.float32))


# ---------------------------------------------------------------- boxes by coordinates


def test_grid_boxes_are_a_5x5_evenly_spaced_grid_by_coordinates():
    boxes = protocols.grid_boxes(68, 68, 32)
    offsets = [0, 9, 18, 27, 36]  # (68 - 32) / 4 = 9
    assert boxes == [(x, y, x + 32, y + 32) for y in offsets for x in offsets]
    # (41 - 32) / 4 = 2.25: 0, 2.25, 4.5, 6.75, 9 rounded half to even; the middle is the centre crop's.
    assert protocols.grid_offsets(41, 32) == [0, 2, 4, 7, 9] == np.round(np.linspace(0, 9, 5)).astype(int).tolist()
    assert protocols.grid_offsets(41, 32)[2] == center_offset(41, 32)
    assert protocols.grid_boxes(32, 32, 32) == [(0, 0, 32, 32)] * 25
    wide = protocols.grid_boxes(100, 40, 32)
    assert {box[0] for box in wide} == {0, 17, 34, 51, 68} and {box[1] for box in wide} == {0, 2, 4, 6, 8}
    with pytest.raises(ValueError):
        protocols.grid_boxes(30, 30, 32)


def test_grid50_views_come_from_the_grid_and_the_flipped_image():
    """On an image whose pixels hold their own coordinates (R = x, G = y), the top-left pixel of
    each view says where it was cut; a flipped view's top-left pixel is the box's mirrored right edge."""
    image = torch.from_numpy(np.asarray(coordinate_image(68, 68), dtype=np.float32).copy()).permute(2, 0, 1)
    views = protocols.crop_views(image, "grid50", 32)
    assert len(views) == 50 == protocols.views_per_scale("grid50")
    corners = [(int(view[0, 0, 0]), int(view[1, 0, 0])) for view in views]
    offsets = [0, 9, 18, 27, 36]
    assert corners[:25] == [(x, y) for y in offsets for x in offsets]
    assert corners[25:] == [(67 - x, y) for y in offsets for x in offsets]  # flipped: x runs right to left
    assert all(view.shape == (3, 32, 32) for view in views)


def test_five_and_center_boxes_follow_torchvision():
    assert protocols.five_boxes(40, 40, 32) == [
        (0, 0, 32, 32),
        (8, 0, 40, 32),
        (0, 8, 32, 40),
        (8, 8, 40, 40),
        (4, 4, 36, 36),
    ]
    assert protocols.center_box(41, 41, 32) == (4, 4, 36, 36)  # torchvision's rounding: round(4.5) = 4
    assert [protocols.views_per_scale(name) for name in protocols.PROTOCOLS] == [1, 5, 10, 50, 2, 52]


@pytest.mark.parametrize(
    ("scale_range", "crop", "expected"),
    [((256, 256), 224, [224, 256, 288]), ((256, 512), 224, [256, 384, 512]), ((36, 36), 32, [32, 36, 68])],
)
def test_multi_scale_test_scales_follow_section_4_2(scale_range, crop, expected):
    assert protocols.multi_scale_test_scales(scale_range, crop) == expected


# ---------------------------------------------------------------- posteriors against independent crops


@pytest.mark.parametrize(
    ("protocol", "transform"), [("center", v2.CenterCrop(32)), ("five", v2.FiveCrop(32)), ("ten", v2.TenCrop(32))]
)
@pytest.mark.parametrize("size", [32, 41, 48])
def test_crop_protocols_equal_torchvision_crop_by_crop(protocol, transform, size):
    net, images = TinyNet().eval(), random_images(3, size)
    crops = transform(images)
    expected = by_hand(net, [crops] if protocol == "center" else list(crops))
    with torch.no_grad():
        got = protocols.crop_posterior(net, images, protocol, 32)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_grid50_equals_pil_crops_one_by_one():
    """50 PIL crops per image (grid positions from numpy's linspace, PIL's own mirror image)."""
    net, size, crop = TinyNet().eval(), 45, 32
    pixels = np.random.default_rng(1).integers(0, 256, size=(2, size, size, 3), dtype=np.uint8)
    positions = np.round(np.linspace(0, size - crop, 5)).astype(int)
    expected = []
    for array in pixels:
        image, views = Image.fromarray(array), []
        for source in (image, image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)):
            for top in positions:
                for left in positions:
                    piece = np.asarray(source.crop((left, top, left + crop, top + crop)), dtype=np.float32)
                    views.append(torch.from_numpy(piece.copy()).permute(2, 0, 1)[None] / 255)
        expected.append(by_hand(net, views)[0])
    images = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255
    with torch.no_grad():
        got = protocols.crop_posterior(net, images, "grid50", crop)
    torch.testing.assert_close(got, torch.stack(expected), rtol=1e-5, atol=1e-6)


def test_shared_forward_equals_each_protocol_on_its_own():
    net, images = TinyNet().eval(), random_images(4, 44, seed=2)
    with torch.no_grad():
        together = protocols.crop_posteriors(net, images, protocols.CROP_PROTOCOLS, 32)
        for protocol in protocols.CROP_PROTOCOLS:
            torch.testing.assert_close(together[protocol], protocols.crop_posterior(net, images, protocol, 32))


def test_dense_posterior_is_the_mean_softmax_of_the_image_and_its_mirror():
    net, images = TinyNet().eval(), random_images(2, 50, seed=3)
    mirrored = torch.from_numpy(images.numpy()[..., ::-1].copy())
    with torch.no_grad():
        expected = (torch.softmax(net(images), 1) + torch.softmax(net(mirrored), 1)) / 2
        torch.testing.assert_close(protocols.dense_posterior(net, images), expected)


def test_resize_square_matches_pil_bilinear_within_a_grey_level():
    pixels = np.random.default_rng(4).integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
    resized = protocols.resize_square(torch.from_numpy(pixels).permute(2, 0, 1)[None].float(), 40)[0]
    pil = np.asarray(Image.fromarray(pixels).resize((40, 40), Image.Resampling.BILINEAR), dtype=np.float32)
    assert np.abs(resized.permute(1, 2, 0).numpy() - pil).max() <= 1.0
