"""Dense evaluation (paper, section 3.2): the FC layers become convolutions.

"The first FC layer is converted to a 7x7 conv. layer, the last two FC layers to 1x1
conv. layers. The resulting fully-convolutional net is then applied to the whole
(uncropped) image. The result is a class score map ... spatially averaged (sum-pooled)
to obtain a fixed-size vector of class scores for the image."

Nets trained at a smaller crop than 224 (e.g. the 1/4-scale geometry of the reproduction
protocol) see an ``f x f`` conv feature map with ``f = crop // 32`` that ``avgpool``
stretches to 7x7 before the first FC layer. ``avgpool`` is linear, so the first FC layer
composed with it is an ``f x f`` convolution; :class:`DenseVGG` folds the pooling into the
kernel, and at ``f = 7`` (crop 224) the kernel is the FC weight reshaped to 7x7.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vgg.model import POOLED_SIZE, VGG

__all__ = ["DenseVGG", "to_dense", "feature_size"]

DOWNSAMPLING = 32  # five 2x2 max-pools


def feature_size(crop: int) -> int:
    """Side of the last conv feature map for a ``crop x crop`` input."""
    size = crop // DOWNSAMPLING
    if size < 1:
        raise ValueError(f"crop must be at least {DOWNSAMPLING} pixels, got {crop}")
    return size


def _pool_matrix(size: int, *, device: torch.device | None = None) -> torch.Tensor:
    """``P[i, j, p, q]`` = d avgpool(x)[p, q] / d x[i, j] for an ``size x size`` input."""
    basis = torch.eye(size * size, dtype=torch.float64, device=device).view(size * size, 1, size, size)
    pooled = F.adaptive_avg_pool2d(basis, POOLED_SIZE)
    return pooled.view(size, size, POOLED_SIZE, POOLED_SIZE)


def _conv_from_linear(linear: nn.Linear, in_channels: int, kernel: int) -> nn.Conv2d:
    conv = nn.Conv2d(in_channels, linear.out_features, kernel_size=kernel)
    conv.weight.copy_(linear.weight.view(linear.out_features, in_channels, kernel, kernel))
    conv.bias.copy_(linear.bias)
    return conv


class DenseVGG(nn.Module):
    """A fully-convolutional VGG equal to the FC net on a ``crop x crop`` input.

    ``score_map(x)`` returns ``[N, classes, H', W']`` class scores for an input of any
    size ``>= crop``; ``forward(x)`` their spatial average ``[N, classes]``.
    """

    def __init__(self, model: VGG, *, crop: int = 224) -> None:
        super().__init__()
        size = feature_size(crop)
        fc6, fc7, fc8 = (m for m in model.classifier if isinstance(m, nn.Linear))
        channels = fc6.in_features // (POOLED_SIZE * POOLED_SIZE)
        self.features = model.features
        with torch.no_grad():
            fc6_kernel = fc6.weight.view(fc6.out_features, channels, POOLED_SIZE, POOLED_SIZE)
            folded = torch.einsum("ocpq,ijpq->ocij", fc6_kernel.double(), _pool_matrix(size, device=fc6_kernel.device))
            self.fc6 = nn.Conv2d(channels, fc6.out_features, kernel_size=size)
            self.fc6.weight.copy_(folded.to(fc6.weight.dtype))
            self.fc6.bias.copy_(fc6.bias)
            self.fc7 = _conv_from_linear(fc7, fc7.in_features, 1)
            self.fc8 = _conv_from_linear(fc8, fc8.in_features, 1)
        self.crop = crop

    def score_map(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = F.relu(self.fc6(x))
        x = F.relu(self.fc7(x))  # dropout is the identity at test time
        return self.fc8(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.score_map(x).mean(dim=(2, 3))


def to_dense(model: VGG, *, crop: int = 224) -> DenseVGG:
    """Return the dense (fully-convolutional) form of ``model`` trained at ``crop``.

    The conv layers are shared with ``model``; the FC layers are converted copies.
    """
    return DenseVGG(model, crop=crop).to(next(model.parameters()).device)
