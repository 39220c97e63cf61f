"""Test-time protocols (paper, sections 3.2 and 4): the one place that says which views of an
image a protocol classifies and how their posteriors are combined.

Every evaluation path (training's per-epoch validation, ``python -m training.evaluate``,
the exported graph and its reference check, ``bench/reproduce.py``) takes its crop boxes,
flips and averaging from here.

Protocols, each on an image rescaled isotropically to test scale Q:

- ``center``: the central ``crop x crop`` square of the ``Q x Q`` image.
- ``five``: torchvision's FiveCrop of the ``Q x Q`` image (top-left, top-right, bottom-left,
  bottom-right, centre).
- ``ten``: the five crops and the five crops of the horizontally flipped image (TenCrop).
- ``grid50``: section 3.2's multi-crop evaluation: a 5 x 5 grid of evenly spaced crops of the
  ``Q x Q`` image and of its flip, 50 views.
- ``dense``: section 3.2's dense evaluation: the fully-convolutional net on the whole rescaled
  image and on its flip, each class score map spatially averaged.
- ``dense+grid50``: section 4.3: the dense and the multi-crop posteriors averaged.

A protocol's posterior is the softmax of each view's class scores averaged over its views
(section 3.2: "the soft-max class posteriors"), then over the test scales Q (section 4.2),
then over the models of an ensemble (section 4.4).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from vgg.preprocessing import center_offset

__all__ = [
    "PROTOCOLS",
    "CROP_PROTOCOLS",
    "GRID_SIDE",
    "Box",
    "center_box",
    "five_boxes",
    "grid_offsets",
    "grid_boxes",
    "crop_boxes",
    "flips",
    "views_per_scale",
    "multi_scale_test_scales",
    "crop_views",
    "dense_views",
    "posterior",
    "mean_posterior",
    "crop_posterior",
    "crop_posteriors",
    "dense_posterior",
    "resize_square",
]

PROTOCOLS: tuple[str, ...] = ("center", "five", "ten", "grid50", "dense", "dense+grid50")
CROP_PROTOCOLS: tuple[str, ...] = ("center", "five", "ten", "grid50")
GRID_SIDE = 5  # section 3.2: "a 5 x 5 regular grid with 2 flips", 50 crops per scale
SCALE_STEP = 32  # section 4.2: Q in {S - 32, S, S + 32} for a fixed S

Box = tuple[int, int, int, int]  # (left, top, right, bottom), PIL's order


def _check(size: int, crop: int) -> None:
    if crop > size:
        raise ValueError(f"crop {crop} is larger than the image side {size}")


def center_box(width: int, height: int, crop: int) -> Box:
    _check(min(width, height), crop)
    left, top = center_offset(width, crop), center_offset(height, crop)
    return (left, top, left + crop, top + crop)


def five_boxes(width: int, height: int, crop: int) -> list[Box]:
    """torchvision's FiveCrop order: top-left, top-right, bottom-left, bottom-right, centre."""
    _check(min(width, height), crop)
    return [
        (0, 0, crop, crop),
        (width - crop, 0, width, crop),
        (0, height - crop, crop, height),
        (width - crop, height - crop, width, height),
        center_box(width, height, crop),
    ]


def grid_offsets(size: int, crop: int, side: int = GRID_SIDE) -> list[int]:
    """``side`` evenly spaced crop offsets from 0 to ``size - crop`` (rounded as
    :func:`vgg.preprocessing.center_offset`, so the middle one of an odd ``side`` is the centre crop's)."""
    _check(size, crop)
    return [int(round(index * (size - crop) / (side - 1))) for index in range(side)]


def grid_boxes(width: int, height: int, crop: int, side: int = GRID_SIDE) -> list[Box]:
    """The ``side x side`` grid of crops, row by row (top to bottom, left to right)."""
    return [
        (left, top, left + crop, top + crop)
        for top in grid_offsets(height, crop, side)
        for left in grid_offsets(width, crop, side)
    ]


def crop_boxes(protocol: str, width: int, height: int, crop: int) -> list[Box]:
    """The crop boxes a crop protocol takes from the (unflipped) image."""
    if protocol == "center":
        return [center_box(width, height, crop)]
    if protocol in ("five", "ten"):
        return five_boxes(width, height, crop)
    if protocol == "grid50":
        return grid_boxes(width, height, crop)
    raise ValueError(f"{protocol!r} is not a crop protocol ({', '.join(CROP_PROTOCOLS)})")


def flips(protocol: str) -> bool:
    """Whether the protocol also classifies the horizontally flipped image."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; choose from {', '.join(PROTOCOLS)}")
    return protocol in ("ten", "grid50", "dense", "dense+grid50")


def views_per_scale(protocol: str) -> int:
    """Views one image contributes at one test scale."""
    if protocol == "dense":
        return 2
    if protocol == "dense+grid50":
        return 2 + views_per_scale("grid50")
    return len(crop_boxes(protocol, 1, 1, 1)) * (2 if flips(protocol) else 1)


def multi_scale_test_scales(scale_range: Sequence[int], crop: int) -> list[int]:
    """Section 4.2: Q in {S-32, S, S+32} for a fixed S, {Smin, (Smin+Smax)/2, Smax} for a
    jittered S; never below the crop."""
    smin, smax = scale_range[0], scale_range[-1]
    if smin == smax:
        scales = [smin - SCALE_STEP, smin, smin + SCALE_STEP]
    else:
        scales = [smin, (smin + smax) // 2, smax]
    return sorted({max(crop, q) for q in scales})


# ----------------------------------------------------------------------------- views


def _flip(images: torch.Tensor) -> torch.Tensor:
    return images.flip(-1)


def crop_views(images: torch.Tensor, protocol: str, crop: int) -> list[torch.Tensor]:
    """The protocol's views of ``images`` ``[..., 3, H, W]``: one ``[..., 3, crop, crop]``
    tensor per view; the crops of the image, then (if the protocol flips) the same boxes'
    crops of the flipped image (torchvision's TenCrop order)."""
    height, width = images.shape[-2], images.shape[-1]
    boxes = crop_boxes(protocol, int(width), int(height), crop)
    sources = [images, _flip(images)] if flips(protocol) else [images]
    return [source[..., top:bottom, left:right] for source in sources for left, top, right, bottom in boxes]


def dense_views(images: torch.Tensor) -> list[torch.Tensor]:
    """Dense evaluation's views: the whole image and its horizontal flip."""
    return [images, _flip(images)]


def posterior(logits: torch.Tensor, views: int) -> torch.Tensor:
    """Mean softmax over views of view-major logits ``[views * N, C]`` -> ``[N, C]`` (float32)."""
    probabilities = torch.softmax(logits.to(torch.float32), dim=1)
    return probabilities.view(views, -1, probabilities.shape[1]).mean(dim=0)


def mean_posterior(posteriors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Posteriors of several scales, protocols or models averaged with equal weight."""
    if not posteriors:
        raise ValueError("nothing to average")
    return torch.stack(list(posteriors)).mean(dim=0)


Network = Callable[[torch.Tensor], torch.Tensor]


def crop_posterior(network: Network, images: torch.Tensor, protocol: str, crop: int) -> torch.Tensor:
    """A crop protocol on normalised ``images`` ``[N, 3, Q, Q]`` -> ``[N, C]``: all views in one
    view-major batch through ``network``, softmax per view, mean over views."""
    views = crop_views(images, protocol, crop)
    return posterior(network(torch.cat(views)), len(views))


def crop_posteriors(
    network: Network, images: torch.Tensor, protocols: Sequence[str], crop: int
) -> dict[str, torch.Tensor]:
    """Several crop protocols from one forward pass: the union of their views (``center`` is
    ``five``'s last view, ``five`` ``ten``'s first five...) through ``network`` once, then
    each protocol's own views averaged. Equal to :func:`crop_posterior` per protocol."""
    height, width = int(images.shape[-2]), int(images.shape[-1])
    keys: dict[tuple[bool, Box], int] = {}
    for protocol in protocols:
        for flipped in (False, True) if flips(protocol) else (False,):
            for box in crop_boxes(protocol, width, height, crop):
                keys.setdefault((flipped, box), len(keys))
    flipped_images = _flip(images) if any(flipped for flipped, _ in keys) else images
    views = [
        (flipped_images if flipped else images)[..., top:bottom, left:right]
        for flipped, (left, top, right, bottom) in keys
    ]
    probabilities = torch.softmax(network(torch.cat(views)).to(torch.float32), dim=1)
    probabilities = probabilities.view(len(views), -1, probabilities.shape[1])
    result = {}
    for protocol in protocols:
        chosen = [
            keys[(flipped, box)]
            for flipped in ((False, True) if flips(protocol) else (False,))
            for box in crop_boxes(protocol, width, height, crop)
        ]
        result[protocol] = probabilities[chosen].mean(dim=0)
    return result


def dense_posterior(dense_network: Network, images: torch.Tensor) -> torch.Tensor:
    """Dense evaluation of normalised ``images`` ``[N, 3, H, W]`` (all of one size) with the
    fully-convolutional net (spatially averaged scores) -> ``[N, C]``."""
    views = dense_views(images)
    return posterior(dense_network(torch.cat(views)), len(views))


def resize_square(images: torch.Tensor, size: int) -> torch.Tensor:
    """``[N, 3, Q, Q]`` -> ``[N, 3, size, size]``: bilinear, antialiased when shrinking (the
    filter of :func:`vgg.preprocessing.resize_shortest_side`, PIL's, within a grey level);
    ONNX ``Resize`` with ``antialias=1`` in an exported graph."""
    if images.shape[-1] == size:
        return images
    return torch.nn.functional.interpolate(
        images, size=(size, size), mode="bilinear", align_corners=False, antialias=True
    )
