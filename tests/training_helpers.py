"""Shared helpers of the training tests."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from training.demo import CLASSES, make_image
from training.transforms import Stats

# The training tests' geometry and run (``python -m training.run`` flags): 32x32 crops from
# S = 36, batches of 16, no export; and their net, VGG-A with a 32-wide head. Flags given after
# these win.
TINY_RUN = [
    "--scale",
    "36",
    "--crop",
    "32",
    "--batch-size",
    "16",
    "--stats-images",
    "50",
    "--workers",
    "0",
    "--no-export",
]
TINY_TRAINING = ["--cfg", "A", "--fc-width", "32", *TINY_RUN]


def write_folder(root: Path, counts: dict[str, int], size: int = 40) -> None:
    """``root/<class>/<i>.png`` demo images, ``counts[class]`` of each."""
    for label, (name, count) in enumerate(counts.items()):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for index in range(count):
            make_image(label % len(CLASSES), index, size=size).save(folder / f"{index}.png")


def coordinate_image(width: int, height: int) -> Image.Image:
    """R = x, G = y: every pixel says where it came from."""
    yy, xx = np.mgrid[0:height, 0:width]
    return Image.fromarray(np.stack([xx, yy, np.zeros_like(xx)], axis=-1).astype(np.uint8))


def stats_identity() -> Stats:
    return Stats(mean=[0.0] * 3, std=[1.0] * 3, pca_eigval=[0.0] * 3, pca_eigvec=np.eye(3).tolist())


def tiny_net() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 2),
    )


def ddp_rank_with_unreadable_batch(rank: int, init_file: str, out_dir: str) -> None:
    """One of two gloo ranks running ``train_one_epoch`` on 2 batches; rank 1's first batch
    was all unreadable (``None``). Saves the final weights to ``out_dir/rank<r>.pt``."""
    import torch.distributed as dist

    from training.epoch import train_one_epoch

    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=2, timeout=timedelta(seconds=30)
    )
    torch.manual_seed(0)
    model = nn.parallel.DistributedDataParallel(tiny_net())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    generator = torch.Generator().manual_seed(rank)
    batches = [(torch.randn(4, 3, 8, 8, generator=generator), torch.tensor([0, 1, 0, 1])) for _ in range(2)]
    if rank == 1:
        batches[0] = None
    train_one_epoch(
        model,
        batches,
        optimizer,
        device=torch.device("cpu"),
        amp=False,
        channels_last=False,
        epoch=1,
        show_progress=False,
        crop=8,
    )
    torch.save(model.module.state_dict(), Path(out_dir) / f"rank{rank}.pt")
    dist.destroy_process_group()


def dense_probabilities_by_hand(model, image: torch.Tensor) -> torch.Tensor:
    """Section 3.2 without :func:`vgg.to_dense`: the FC layers applied as matrices at every
    position of the conv feature map (each position standing for a 32-crop window), the class
    score map averaged spatially, softmax; averaged with the mirrored image."""
    fc6, fc7, fc8 = (m for m in model.classifier if isinstance(m, torch.nn.Linear))
    probabilities = []
    for view in (image, image.flip(2)):
        features = model.features(view[None])[0]  # [C, h, w], one 32x32 window per position
        columns = features.flatten(1).T  # [h*w, C]; a 1x1 map pooled to 7x7 is C values repeated 49 times
        hidden = torch.relu(
            torch.relu(columns.repeat_interleave(49, dim=1) @ fc6.weight.T + fc6.bias) @ fc7.weight.T + fc7.bias
        )
        scores = (hidden @ fc8.weight.T + fc8.bias).mean(dim=0)
        probabilities.append(scores.softmax(dim=0))
    return torch.stack(probabilities).mean(dim=0)
