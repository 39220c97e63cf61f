"""The PyTorch reference the exported graph is checked against: the eager evaluation of
:mod:`vgg.protocols` (the code training's validation and ``python -m training.evaluate``
run), image by image, on the same uint8 ``Q x Q`` input the graph receives.

Per-channel normalisation, each test scale resized from the input
(:func:`vgg.protocols.resize_square`), the protocol's views through the model in eval mode
(``dense``: :func:`vgg.to_dense`), softmax per view, mean over views and scales.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from vgg import VGG, protocols, to_dense

__all__ = ["reference_probs"]


@torch.no_grad()
def reference_probs(
    model: VGG,
    images: np.ndarray,
    *,
    mean: Sequence[float],
    std: Sequence[float],
    crop: int,
    tta: str,
    test_scales: Sequence[int] | None = None,
) -> np.ndarray:
    """Class probabilities ``[N, C]`` (float64) for uint8 ``images`` ``[N, Q, Q, 3]``;
    ``test_scales`` (default: ``[Q]``) are resized from the ``Q x Q`` input."""
    model = model.eval()
    network = to_dense(model, crop=crop).eval() if tta == "dense" else model
    mean_t = torch.tensor(list(mean), dtype=torch.float32).view(1, 3, 1, 1)
    std_t = torch.tensor(list(std), dtype=torch.float32).view(1, 3, 1, 1)
    scales = sorted(set(test_scales)) if test_scales else [images.shape[1]]
    results = []
    for image in images:
        pixels = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].to(torch.float32)
        normalised = (pixels - mean_t) / std_t
        posteriors = []
        for q in scales:
            resized = protocols.resize_square(normalised, q)
            if tta == "dense":
                posteriors.append(protocols.dense_posterior(network, resized))
            else:
                posteriors.append(protocols.crop_posterior(network, resized, tta, crop))
        results.append(protocols.mean_posterior(posteriors)[0].double())
    return torch.stack(results).numpy()
