"""The PyTorch reference the exported graph is checked against, built independently of it.

It follows the paper's test protocol (section 3.2) with torchvision's own transforms on the
same uint8 ``Q x Q`` image the graph receives: ``FiveCrop`` / ``TenCrop`` / ``CenterCrop``
(``transforms.v2``), per-channel normalisation, the model in eval mode, softmax, mean over
crops. ``dense`` uses :func:`vgg.to_dense` on the whole image and its horizontal flip.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torchvision.transforms import v2

from vgg import VGG, to_dense

__all__ = ["reference_probs"]


def _views(image: torch.Tensor, *, crop: int, tta: str) -> list[torch.Tensor]:
    if tta == "five":
        return list(v2.FiveCrop(crop)(image))
    if tta == "ten":
        return list(v2.TenCrop(crop)(image))
    if tta == "center":
        return [v2.CenterCrop(crop)(image)]
    if tta == "dense":
        return [image, v2.functional.horizontal_flip(image)]
    raise ValueError(f"unknown tta {tta!r}")


@torch.no_grad()
def reference_probs(
    model: VGG,
    images: np.ndarray,
    *,
    mean: Sequence[float],
    std: Sequence[float],
    crop: int,
    tta: str,
) -> np.ndarray:
    """Class probabilities ``[N, C]`` (float64) for uint8 ``images`` ``[N, Q, Q, 3]``."""
    model = model.eval()
    network = to_dense(model, crop=crop).eval() if tta == "dense" else model
    normalise = v2.Normalize(mean=list(mean), std=list(std))
    results = []
    for image in images:
        chw = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)  # uint8 [3, Q, Q]
        views = [normalise(view.to(torch.float32)) for view in _views(chw, crop=crop, tta=tta)]
        probs = torch.softmax(network(torch.stack(views)).double(), dim=1)
        results.append(probs.mean(dim=0))
    return torch.stack(results).numpy()
