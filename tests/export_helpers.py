"""Small checkpoints and image folders for the export tests (not a test module)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

import vgg
from vgg.checkpoint import CHECKPOINT_FORMAT, save_checkpoint
from vgg.preprocessing import open_rgb, to_graph_input

CROP = 32
SCALE = 37  # default_test_scale(32): an odd margin, so the centre crop is not symmetric
MEAN = [124.0, 116.0, 104.0]
STD = [58.0, 57.0, 57.5]
# Three well separated synthetic classes: a dominant colour each.
CLASS_COLOURS = {"red": (200, 40, 40), "green": (40, 190, 60), "blue": (40, 60, 200)}


def write_checkpoint(
    path: Path,
    model: vgg.VGG,
    *,
    classes: list[str],
    data: Path | None = None,
    mean: list[float] = MEAN,
    std: list[float] = STD,
    val_top1: float = 0.42,
) -> Path:
    """Save ``model`` as a training checkpoint with a realistic ``preprocess``."""
    checkpoint = {
        "format": CHECKPOINT_FORMAT,
        "arch": {
            "cfg": "A",
            "batch_norm": any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules()),
            "num_classes": len(classes),
            "dropout": 0.5,
            "fc_width": model.classifier[0].out_features,
        },
        "model": model.state_dict(),
        "classes": classes,
        "preprocess": {
            "mean": mean,
            "std": std,
            "pca_eigval": [1.0, 0.5, 0.1],
            "pca_eigvec": np.eye(3).tolist(),
            "crop": CROP,
            "test_scale": SCALE,
        },
        "metrics": {"epoch": 1, "val_top1": val_top1, "val_top5": 1.0},
        "config": {"data": str(data) if data else None, "cfg": "A"},
    }
    save_checkpoint(checkpoint, path)
    return path


def peaky_model(*, num_classes: int = 5, batch_norm: bool = False, seed: int = 0) -> vgg.VGG:
    """A random VGG-A whose probabilities are far from uniform (so differences show)."""
    torch.manual_seed(seed)
    model = vgg.build("A", num_classes=num_classes, batch_norm=batch_norm, fc_width=64, init="kaiming")
    with torch.no_grad():
        for layer in model.classifier:
            if isinstance(layer, torch.nn.Linear):
                torch.nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")
        model.classifier[-1].weight.mul_(10.0)
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
    return model.eval()


def write_colour_folder(root: Path, *, per_class: int, seed: int = 0) -> Path:
    """An ImageNet-style folder ``root/train/<class>/*.png`` of noisy single-colour images."""
    rng = np.random.default_rng(seed)
    for name, colour in CLASS_COLOURS.items():
        folder = root / "train" / name
        folder.mkdir(parents=True, exist_ok=True)
        for index in range(per_class):
            size = (int(rng.integers(40, 56)), int(rng.integers(40, 56)))
            pixels = np.array(colour) + rng.normal(0, 45, size=(size[1], size[0], 3))
            Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(folder / f"{index:03d}.png")
    return root


def train_on_folder(root: Path, *, steps: int = 40, seed: int = 0) -> vgg.VGG:
    """A VGG-A with BatchNorm (light head) trained a few steps on ``write_colour_folder`` images.

    BatchNorm (cumulative running statistics) and Adam make a few dozen steps enough to
    separate the colour classes; plain VGG-A would need hundreds.
    """
    torch.manual_seed(seed)
    images, labels = [], []
    for label, name in enumerate(CLASS_COLOURS):
        for path in sorted((root / "train" / name).glob("*.png")):
            images.append(to_graph_input(open_rgb(path), SCALE))
            labels.append(label)
    pixels = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float()
    pixels = (pixels - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    targets = torch.tensor(labels)
    model = vgg.build("A", num_classes=len(CLASS_COLOURS), batch_norm=True, fc_width=64, init="kaiming", dropout=0.0)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = None  # running statistics = plain average over the steps
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        batch = torch.randint(0, len(targets), (16,), generator=generator)
        top, left = (int(v) for v in torch.randint(0, SCALE - CROP + 1, (2,), generator=generator))
        logits = model(pixels[batch, :, top : top + CROP, left : left + CROP])
        loss = torch.nn.functional.cross_entropy(logits, targets[batch])
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    return model.eval()
