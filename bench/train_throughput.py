"""Training throughput: our loop (training.epoch.train_one_epoch on vgg.build) vs a plain
reference loop (torchvision vgg16, SGD, fp32, eager), same batch and input size, same run.

    python bench/train_throughput.py                    # small CPU setting, a couple of minutes
    python bench/train_throughput.py --batch 64 --size 224 --steps 20   # on a GPU

Prints images/s of each and the ratios: ours fp32 / reference, and on CPU the bf16 gain;
on a GPU ours runs with bf16 AMP and channels_last (target >= 2.0x the fp32 reference).
Synthetic in-memory batches (already on the device) measure the training step alone. With
``--data DIR`` (``DIR/<class>/*.jpg``) the same step is also fed by the training's own JPEG
loader (decode, rescale to S, random crop, flip, colour shift, normalise in ``--workers``
processes): the ratio loader / in-memory says how much image loading costs.

    python bench/train_throughput.py --batch 64 --size 224 --steps 20 --data DIR --workers 14
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import vgg  # noqa: E402
from training.epoch import train_one_epoch  # noqa: E402


def synthetic_batches(*, steps: int, batch: int, size: int, classes: int, device: torch.device):
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, size, size, generator=generator).to(device)
    labels = torch.randint(0, classes, (batch,), generator=generator).to(device)
    return [(images, labels)] * steps


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def sgd(model: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9, weight_decay=5e-4)  # paper, section 3.1


def reference_images_per_second(model, batches, device: torch.device) -> float:
    """The plain loop: forward, cross-entropy, backward, step, in fp32, eager."""
    optimizer = sgd(model)
    model.train()
    sync(device)
    start = time.perf_counter()
    for images, labels in batches:
        loss = F.cross_entropy(model(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    sync(device)
    return sum(len(labels) for _, labels in batches) / (time.perf_counter() - start)


def our_images_per_second(model, batches, device: torch.device, *, amp: bool, channels_last: bool) -> float:
    optimizer = sgd(model)
    sync(device)
    start = time.perf_counter()
    train_one_epoch(
        model, batches, optimizer, device=device, amp=amp, channels_last=channels_last, epoch=0, show_progress=False
    )
    sync(device)
    return sum(len(labels) for _, labels in batches) / (time.perf_counter() - start)


def jpeg_loader(folder: Path, *, batch: int, size: int, workers: int, device: torch.device):
    """The training's own input pipeline (section 3.1 preset at S = 256) over ``folder``."""
    from training.data import ImageDataset, collate_skipping, list_image_folder
    from training.transforms import Stats, TrainPreset
    from vgg.preprocessing import IMAGENET_MEAN_RGB, IMAGENET_STD_RGB

    _, samples = list_image_folder(folder)
    stats = Stats(
        mean=list(IMAGENET_MEAN_RGB),
        std=list(IMAGENET_STD_RGB),
        pca_eigval=[0.2, 0.02, 0.005],
        pca_eigvec=[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]],
    )
    preset = TrainPreset(
        scale_range=(round(size * 256 / 224), round(size * 256 / 224)),
        crop=size,
        stats=stats,
        pca_std=0.1,
        augment=True,
    )
    return torch.utils.data.DataLoader(
        ImageDataset(samples, preset),
        batch_size=batch,
        shuffle=True,
        num_workers=workers,
        drop_last=True,
        pin_memory=device.type == "cuda",
        collate_fn=collate_skipping,
        persistent_workers=workers > 0,
    ), len(samples)


class Batches:
    """``steps`` batches drawn from an endless iterator, with a length (for the progress bar)."""

    def __init__(self, batches, steps: int) -> None:
        self.batches, self.steps = batches, steps

    def __len__(self) -> int:
        return self.steps

    def __iter__(self):
        return itertools.islice(self.batches, self.steps)


def loader_images_per_second(
    model, loader, device: torch.device, *, steps: int, amp: bool, channels_last: bool
) -> float:
    """Our step fed by ``loader`` (cycled, batches fetched inside the timed loop), after two warm-up steps."""
    batches = (collated.batch for epoch in itertools.count() for collated in loader)
    optimizer = sgd(model)
    train_one_epoch(
        model,
        Batches(batches, 2),
        optimizer,
        device=device,
        amp=amp,
        channels_last=channels_last,
        epoch=0,
        show_progress=False,
    )
    sync(device)
    start = time.perf_counter()
    stats = train_one_epoch(
        model,
        Batches(batches, steps),
        optimizer,
        device=device,
        amp=amp,
        channels_last=channels_last,
        epoch=0,
        show_progress=False,
    )
    sync(device)
    return stats.images / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=64, help="input side (crop)")
    parser.add_argument("--steps", type=int, default=4, help="timed steps per measurement")
    parser.add_argument("--rounds", type=int, default=3, help="alternating measurements; the median is reported")
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--data", type=Path, default=None, help="also feed the step from this JPEG folder")
    parser.add_argument("--workers", type=int, default=min(16, os.cpu_count() or 1), help="loader processes")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures to this JSON file")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    on_gpu = device.type == "cuda"
    torch.manual_seed(0)
    reference = torchvision.models.vgg16(num_classes=args.classes).to(device)
    ours = vgg.build("D", num_classes=args.classes, init="kaiming").to(device)
    ours_fast = ours.to(memory_format=torch.channels_last) if on_gpu else ours
    batches = synthetic_batches(steps=args.steps, batch=args.batch, size=args.size, classes=args.classes, device=device)
    warmup = batches[:1]
    reference_images_per_second(reference, warmup, device)
    our_images_per_second(ours, warmup, device, amp=False, channels_last=False)
    our_images_per_second(ours_fast, warmup, device, amp=True, channels_last=on_gpu)

    results: dict[str, list[float]] = {"reference fp32": [], "ours fp32": [], "ours bf16": []}
    for _ in range(args.rounds):
        results["reference fp32"].append(reference_images_per_second(reference, batches, device))
        if not on_gpu:
            results["ours fp32"].append(our_images_per_second(ours, batches, device, amp=False, channels_last=False))
        results["ours bf16"].append(our_images_per_second(ours_fast, batches, device, amp=True, channels_last=on_gpu))
    median = {name: statistics.median(values) for name, values in results.items() if values}
    if args.data is not None:
        loader, count = jpeg_loader(args.data, batch=args.batch, size=args.size, workers=args.workers, device=device)
        median["ours bf16, JPEG loader"] = loader_images_per_second(
            ours_fast, loader, device, steps=args.steps * args.rounds, amp=True, channels_last=on_gpu
        )
        print(f"JPEG loader: {count} images from {args.data}, {args.workers} workers")

    print(
        f"device {device}, VGG-16 (D), batch {args.batch}, input {args.size}x{args.size}, "
        f"{args.steps} steps x {args.rounds} rounds (median)"
    )
    for name, value in median.items():
        print(f"  {name:16s} {value:8.1f} img/s")
    if on_gpu:
        print(
            "ratio ours (bf16 AMP + channels_last) / reference fp32: "
            f"{median['ours bf16'] / median['reference fp32']:.2f}"
            "  (target >= 2.0)"
        )
    else:
        print(
            f"ratio ours fp32 / reference fp32: {median['ours fp32'] / median['reference fp32']:.2f}  (target >= 1.0)"
        )
        print(f"bf16 autocast gain (ours bf16 / ours fp32): {median['ours bf16'] / median['ours fp32']:.2f}")
    if "ours bf16, JPEG loader" in median:
        print(
            "ratio JPEG loader / in-memory batches (ours bf16): "
            f"{median['ours bf16, JPEG loader'] / median['ours bf16']:.2f}"
            "  (1.0: the loader keeps up)"
        )
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "device": torch.cuda.get_device_name(0) if on_gpu else "cpu",
                    "batch": args.batch,
                    "size": args.size,
                    "steps": args.steps,
                    "rounds": args.rounds,
                    "workers": args.workers if args.data else None,
                    "torch": torch.__version__,
                    "images_per_s": {name: round(value, 1) for name, value in median.items()},
                },
                indent=2,
            )
            + "\n"
        )


if __name__ == "__main__":
    main()
