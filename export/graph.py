"""The exported graph: uint8 pixels in, class probabilities out, test-time augmentation inside.

:class:`InferenceGraph` wraps a trained VGG so that the ONNX model needs no preprocessing
outside it (the service only decodes and resizes, with :func:`vgg.preprocessing.to_graph_input`):

1. ``images`` uint8 ``[N, Q, Q, 3]`` RGB -> float, minus the training-set mean, divided by its
   std (pixel units, paper section 2.1), NHWC -> NCHW.
2. Test-time views (paper, section 3.2 "multi-crop evaluation" and "dense evaluation"), as
   :mod:`vgg.protocols` defines them:

   - ``five``: torchvision ``FiveCrop`` order: top-left, top-right, bottom-left, bottom-right, centre.
   - ``ten``: the five crops, then the five crops of the horizontally flipped image
     (torchvision ``TenCrop`` order).
   - ``center``: one centre crop.
   - ``dense``: the fully-convolutional net (:func:`vgg.to_dense`) on the whole ``Q x Q``
     image and on its horizontal flip, each score map spatially averaged.
3. One batched forward of all views, softmax per view, mean over views -> ``probs`` float32
   ``[N, num_classes]``.
4. Several test scales (section 4.2, ``test_scales``): the input is the largest Q; the graph
   resizes it to each smaller Q (ONNX ``Resize``, bilinear, antialiased), runs steps 2-3 at
   every Q and averages the posteriors over the scales.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Literal

import torch
from torch import nn

from vgg import VGG, protocols, to_dense

__all__ = ["TTA_MODES", "Tta", "InferenceGraph", "graph_scales"]

Tta = Literal["five", "ten", "center", "dense"]
TTA_MODES: tuple[str, ...] = ("five", "ten", "center", "dense")


def graph_scales(*, test_scale: int, crop: int, tta: str, test_scales: Sequence[int] | None = None) -> list[int]:
    """The test scales Q a graph evaluates, sorted: ``test_scales`` or ``[test_scale]``; its
    input is the largest. Raises ``ValueError`` for an unknown ``tta`` or a Q below the crop."""
    if tta not in TTA_MODES:
        raise ValueError(f"unknown tta {tta!r}; choose one of {', '.join(TTA_MODES)}")
    scales = sorted(set(test_scales)) if test_scales else [test_scale]
    if scales[0] < crop:
        raise ValueError(f"crop {crop} is larger than the test scale {scales[0]}")
    return scales


class InferenceGraph(nn.Module):
    """``images`` uint8 ``[N, Q, Q, 3]`` -> ``probs`` float32 ``[N, num_classes]``.

    The views, flips and averaging are :mod:`vgg.protocols`'. With several ``test_scales`` the
    input is the ``Qmax x Qmax`` square; each smaller Q is resized from it inside the graph
    (:func:`vgg.protocols.resize_square`: ONNX ``Resize``, bilinear, antialiased) and the
    posteriors are averaged over the scales (section 4.2).

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
        test_scales: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        self.scales = graph_scales(test_scale=test_scale, crop=crop, tta=tta, test_scales=test_scales)
        self.tta, self.crop, self.test_scale, self.half = tta, crop, self.scales[-1], half
        model = copy.deepcopy(model)  # .half() and to_dense must not touch the caller's model
        network: nn.Module = to_dense(model, crop=crop) if tta == "dense" else model
        self.network = network.eval().half() if half else network.eval()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))

    def _logits(self, batch: torch.Tensor) -> torch.Tensor:
        if self.half:
            batch = batch.to(torch.float16)
        return self.network(batch).to(torch.float32)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        pixels = images.permute(0, 3, 1, 2).to(torch.float32)
        normalised = (pixels - self.mean) / self.std
        return protocols.mean_posterior([self._posterior(protocols.resize_square(normalised, q)) for q in self.scales])

    def _posterior(self, images: torch.Tensor) -> torch.Tensor:
        if self.tta == "dense":
            return protocols.dense_posterior(self._logits, images)
        return protocols.crop_posterior(self._logits, images, self.tta, self.crop)
