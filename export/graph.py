"""The exported graph: uint8 pixels in, class probabilities out, test-time augmentation inside.

:class:`InferenceGraph` wraps a trained VGG so that the ONNX model needs no preprocessing
outside it (the service only decodes and resizes, with :func:`vgg.preprocessing.to_graph_input`):

1. ``images`` uint8 ``[N, Q, Q, 3]`` RGB -> float, minus the training-set mean, divided by its
   std (pixel units, paper section 2.1), NHWC -> NCHW.
2. Test-time views (paper, section 3.2 "multi-crop evaluation" and "dense evaluation"):

   - ``five``: torchvision ``FiveCrop`` order: top-left, top-right, bottom-left, bottom-right, centre.
   - ``ten``: the five crops, then the five crops of the horizontally flipped image
     (torchvision ``TenCrop`` order).
   - ``center``: one centre crop.
   - ``dense``: the fully-convolutional net (:func:`vgg.to_dense`) on the whole ``Q x Q``
     image and on its horizontal flip, each score map spatially averaged.
3. One batched forward of all views, softmax per view, mean over views -> ``probs`` float32
   ``[N, num_classes]``.
"""

from __future__ import annotations

import copy
from typing import Literal, Sequence

import torch
from torch import nn

from vgg import VGG, to_dense
from vgg.preprocessing import center_offset

__all__ = ["TTA_MODES", "Tta", "crop_offsets", "InferenceGraph"]

Tta = Literal["five", "ten", "center", "dense"]
TTA_MODES: tuple[str, ...] = ("five", "ten", "center", "dense")


def crop_offsets(*, test_scale: int, crop: int, tta: Tta) -> list[tuple[int, int]]:
    """``(top, left)`` of each crop cut from one (possibly flipped) ``Q x Q`` image (Q = ``test_scale``).

    ``five``/``ten`` give torchvision's FiveCrop order (TL, TR, BL, BR, centre); ``center``
    the centre crop only; ``dense`` no crops (the whole image is the view).
    """
    if crop > test_scale:
        raise ValueError(f"crop {crop} is larger than the test scale {test_scale}")
    far = test_scale - crop
    middle = center_offset(test_scale, crop)
    if tta in ("five", "ten"):
        return [(0, 0), (0, far), (far, 0), (far, far), (middle, middle)]
    if tta == "center":
        return [(middle, middle)]
    if tta == "dense":
        return []
    raise ValueError(f"unknown tta {tta!r}; choose one of {', '.join(TTA_MODES)}")


class InferenceGraph(nn.Module):
    """``images`` uint8 ``[N, Q, Q, 3]`` -> ``probs`` float32 ``[N, num_classes]``.

    ``half=True`` runs the network in float16 (for GPUs); normalisation, softmax and the
    average over views stay in float32, so inputs and outputs keep their dtypes.
    """

    def __init__(
        self,
        model: VGG,
        *,
        mean: Sequence[float],
        std: Sequence[float],
        crop: int,
        test_scale: int,
        tta: Tta = "five",
        half: bool = False,
    ) -> None:
        super().__init__()
        self.offsets = crop_offsets(test_scale=test_scale, crop=crop, tta=tta)
        self.tta, self.crop, self.test_scale, self.half = tta, crop, test_scale, half
        model = copy.deepcopy(model)  # .half() and to_dense must not touch the caller's model
        network: nn.Module = to_dense(model, crop=crop) if tta == "dense" else model
        self.network = network.eval().half() if half else network.eval()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))

    def _views(self, image: torch.Tensor) -> list[torch.Tensor]:
        if self.tta == "dense":
            return [image, image.flip(3)]
        images = [image, image.flip(3)] if self.tta == "ten" else [image]
        size = self.crop
        return [
            one[:, :, top : top + size, left : left + size] for one in images for top, left in self.offsets
        ]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        pixels = images.permute(0, 3, 1, 2).to(torch.float32)
        normalised = (pixels - self.mean) / self.std
        views = self._views(normalised)
        batch = torch.cat(views, dim=0)  # view-major: [V * N, 3, h, w]
        if self.half:
            batch = batch.to(torch.float16)
        logits = self.network(batch).to(torch.float32)
        probs = torch.softmax(logits, dim=1)
        return probs.view(len(views), images.shape[0], -1).mean(dim=0)
