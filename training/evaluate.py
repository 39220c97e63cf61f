"""``python -m training.evaluate --checkpoint CKPT --data DIR``: the paper's test protocols
(sections 3.2 and 4) on a finished model, as a table like the paper's.

    python -m training.evaluate --checkpoint runs/D/best.pt --data DIR [--checkpoint runs/E/best.pt]
        [--protocol center five ten grid50 dense dense+grid50] [--test-scales Q ...]
        [--batch-size N] [--json FILE]

``DIR`` is ``DIR/val/<class>/*``, else the held-out split of ``DIR/train`` that training
validated on (the checkpoint's seed and --val-split), else ``DIR/<class>/*``. Classes are
matched by name to the model's. Several checkpoints: each model's rows, then the ensemble's
(posteriors averaged over the models, section 4.4). Exit codes: 0, 2 for bad input.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from training import data as datasets
from training.config import UsageError
from training.distributed import resolve_device
from training.epoch import network_fn, progress_bar, topk_correct
from vgg import protocols
from vgg.checkpoint import CheckpointError, load_any, model_from_checkpoint, read_labels
from vgg.dense import to_dense
from vgg.errors import OneLineArgumentParser
from vgg.preprocessing import MAX_SCALE, default_test_scale, resize_shortest_side, to_graph_input

log = logging.getLogger("training.evaluate")

SINGLE_SCALE = ("center", "five", "ten")  # default: the checkpoint's single test scale Q (section 4.1)
DEFAULT_PROTOCOLS = protocols.PROTOCOLS
DEFAULT_BATCH = 16
COMBINED = {"dense+grid50": ("dense", "grid50")}  # section 4.3: the two posteriors averaged


# ----------------------------------------------------------------------------- models


@dataclass
class LoadedModel:
    """A trained VGG and what evaluating it needs from its checkpoint."""

    name: str
    model: torch.nn.Module
    classes: list[str]
    mean: list[float]
    std: list[float]
    crop: int
    test_scale: int  # the single test scale Q of training's validation and the served graph
    scale_range: tuple[int, int]  # training scale S (Smin, Smax)
    amp: bool  # trained (and validated) under bf16 autocast
    config: dict[str, Any]


def load_model(path: str | os.PathLike, *, labels: list[str] | None = None) -> LoadedModel:
    """A project checkpoint, or a torchvision-layout VGG state dict (what export accepts:
    :func:`vgg.checkpoint.load_any`; ``labels`` name its classes), as a :class:`LoadedModel`;
    :class:`CheckpointError` otherwise. A state dict has torchvision's preprocessing (Q = 256,
    224 crops) and, knowing no training scale, is taken as trained at S = Q."""
    checkpoint = load_any(path, labels=labels)
    model = model_from_checkpoint(checkpoint)
    try:
        preprocess, config = checkpoint["preprocess"], checkpoint.get("config") or {}
        crop = int(preprocess["crop"])
        test_scale = int(preprocess.get("test_scale") or default_test_scale(crop))
        scale = config.get("scale") or [test_scale]
        mean, std = [float(v) for v in preprocess["mean"]], [float(v) for v in preprocess["std"]]
        loaded = LoadedModel(
            name=str(path),
            model=model,
            classes=[str(c) for c in checkpoint["classes"]],
            mean=mean,
            std=std,
            crop=crop,
            test_scale=test_scale,
            scale_range=(int(scale[0]), int(scale[-1])),
            amp=bool(config.get("amp", False)),
            config=dict(config),
        )
    except (KeyError, TypeError, ValueError, IndexError) as error:
        raise CheckpointError(f"{path}: malformed checkpoint ({type(error).__name__}: {error})") from None
    if len(loaded.mean) != 3 or len(loaded.std) != 3 or min(loaded.std) <= 0:
        raise CheckpointError(f"{path}: preprocess mean/std must be 3 values, std positive")
    if len(loaded.classes) != loaded.model.classifier[-1].out_features:
        raise CheckpointError(
            f"{path}: {len(loaded.classes)} class names for a {loaded.model.classifier[-1].out_features}-class model"
        )
    return loaded


def test_scales(protocol: str, model: LoadedModel, given: Sequence[int] | None) -> list[int]:
    """The Q of ``protocol`` for ``model``: ``given``, else the checkpoint's single Q for
    center/five/ten (as training validated) and section 4.2's three Q for the others."""
    scales = (
        sorted(set(given))
        if given
        else (
            [model.test_scale]
            if protocol in SINGLE_SCALE
            else protocols.multi_scale_test_scales(model.scale_range, model.crop)
        )
    )
    small = [q for q in scales if q < model.crop]
    if small:
        raise UsageError(f"test scale Q {small[0]} is below the {model.crop}-pixel crop of {model.name}")
    if scales[-1] > MAX_SCALE:
        raise UsageError(f"test scale Q {scales[-1]} is above {MAX_SCALE}")
    return scales


# ----------------------------------------------------------------------------- images


def image_samples(data: Path, model: LoadedModel) -> tuple[list[str], list[datasets.Sample], str]:
    """Class names and ``(path, class index in model.classes)`` of the evaluation images."""
    if not data.is_dir():
        raise datasets.DataError(f"{data}: no such folder")
    if (data / "val").is_dir():
        classes, samples = datasets.list_image_folder(data / "val")
        where = str(data / "val")
    elif (data / "train").is_dir():
        seed, fraction = int(model.config.get("seed", 0)), float(model.config.get("val_split", 0.1))
        splits = datasets.folder_splits(data, val_split=fraction, seed=seed)
        classes, samples = splits.classes, splits.val
        where = f"the held-out {fraction:g} of {data / 'train'} (seed {seed})"
    else:
        classes, samples = datasets.list_image_folder(data)
        where = str(data)
    unknown = [name for name in classes if name not in model.classes]
    if unknown:
        raise datasets.DataError(
            f"{data}: class {unknown[0]!r} is not one of the {len(model.classes)} classes of "
            f"{model.name} ({', '.join(model.classes[:5])}{', ...' if len(model.classes) > 5 else ''})"
        )
    if not samples:
        raise datasets.DataError(f"{where}: no images")
    index = {name: model.classes.index(name) for name in classes}
    return classes, [(path, index[classes[label]]) for path, label in samples], where


def to_uint8_tensor(array) -> torch.Tensor:
    return torch.from_numpy(array.copy()).permute(2, 0, 1)


class ProtocolInput:
    """One image's inputs for a protocol: the ``Q x Q`` squares (crop protocols) or the whole
    rescaled images (dense), uint8 ``[3, h, w]``, one per test scale Q."""

    def __init__(self, *, scales: Sequence[int], dense: bool) -> None:
        self.scales, self.dense = list(scales), dense

    def __call__(self, image) -> list[torch.Tensor]:
        if self.dense:
            return [to_uint8_tensor(_rgb_array(resize_shortest_side(image, q))) for q in self.scales]
        return [to_uint8_tensor(to_graph_input(image, q)) for q in self.scales]


def _rgb_array(image):
    import numpy as np

    return np.asarray(image, dtype=np.uint8).reshape(image.size[1], image.size[0], 3)


# ----------------------------------------------------------------------------- evaluation


@dataclass
class Posteriors:
    """A protocol's posteriors ``[N, C]`` over the readable images (``indices`` into the samples)."""

    probs: torch.Tensor
    indices: list[int]
    seconds: float
    scales: list[int]


@dataclass(frozen=True)
class Settings:
    batch_size: int
    device: torch.device
    amp: bool | None  # None: as the checkpoint was trained
    workers: int
    progress: bool


def normalise(pixels: torch.Tensor, model: LoadedModel, device: torch.device) -> torch.Tensor:
    mean = torch.tensor(model.mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(model.std, device=device).view(1, 3, 1, 1)
    return (pixels.to(device).float() - mean) / std


def _chunked(network, views_per_pass: int):
    def forward(images: torch.Tensor) -> torch.Tensor:
        return torch.cat([network(chunk) for chunk in images.split(views_per_pass)])

    return forward


def _crop_batch(
    network, model: LoadedModel, per_scale: list[list[torch.Tensor]], protocol: str, device
) -> torch.Tensor:
    """A crop protocol on one batch: ``per_scale[s]`` holds the images' uint8 squares at scale s."""
    posteriors = [
        protocols.crop_posterior(network, normalise(torch.stack(squares), model, device), protocol, model.crop)
        for squares in per_scale
    ]
    return protocols.mean_posterior(posteriors).cpu()


def _dense_batch(network, model: LoadedModel, per_scale: list[list[torch.Tensor]], device) -> torch.Tensor:
    """Dense evaluation of one batch, image by image (the rescaled images differ in size)."""
    rows = []
    for images in zip(*per_scale, strict=True):  # one image at every scale
        views = [protocols.dense_posterior(network, normalise(image[None], model, device)) for image in images]
        rows.append(protocols.mean_posterior(views).cpu())
    return torch.cat(rows)


def _loader(samples: Sequence[datasets.Sample], scales: Sequence[int], *, dense: bool, settings: Settings):
    """Batches of ``(per-scale uint8 inputs, sample position)``; unreadable files are skipped and logged."""
    indexed = [(path, position) for position, (path, _) in enumerate(samples)]
    dataset = datasets.ImageDataset(indexed, ProtocolInput(scales=scales, dense=dense))
    return datasets.ReportingLoader(
        DataLoader(
            dataset, batch_size=settings.batch_size, collate_fn=datasets.collate_lists, num_workers=settings.workers
        )
    )


@torch.no_grad()
def evaluate_protocol(
    model: LoadedModel, samples: Sequence[datasets.Sample], protocol: str, scales: Sequence[int], settings: Settings
) -> Posteriors:
    """``protocol`` (one of :data:`vgg.protocols.PROTOCOLS` but ``dense+grid50``) of ``model`` on
    ``samples``, posteriors averaged over ``scales`` (section 4.2)."""
    start = time.perf_counter()
    dense, device = protocol == "dense", settings.device
    amp = model.amp if settings.amp is None else settings.amp
    net = model.model.to(device).eval()
    net = to_dense(net, crop=model.crop).eval() if dense else net
    channels_last = device.type == "cuda" and not dense
    network = _chunked(network_fn(net, device=device, amp=amp, channels_last=channels_last), settings.batch_size * 5)
    loader = _loader(samples, scales, dense=dense, settings=settings)
    description = f"{Path(model.name).name} {protocol}"
    chunks, indices = [], []
    for batch in progress_bar(loader, total=len(loader), description=description, enabled=settings.progress):
        if batch is None:
            continue
        per_scale = [list(pixels) for pixels in zip(*(views for views, _ in batch), strict=True)]
        if dense:
            chunks.append(_dense_batch(network, model, per_scale, device))
        else:
            chunks.append(_crop_batch(network, model, per_scale, protocol, device))
        indices += [position for _, position in batch]
    if not indices:
        raise datasets.DataError("no readable images to evaluate")
    return Posteriors(torch.cat(chunks), indices, time.perf_counter() - start, list(scales))


def protocol_posteriors(
    model: LoadedModel,
    samples: Sequence[datasets.Sample],
    protocol: str,
    given_scales: Sequence[int] | None,
    settings: Settings,
    cache: dict[str, Posteriors] | None = None,
) -> Posteriors:
    """``protocol`` for ``model``; ``dense+grid50`` averages the dense and grid50 posteriors
    (reusing them from ``cache``, which this fills)."""
    cache = {} if cache is None else cache
    if protocol in cache:
        return cache[protocol]
    if protocol in COMBINED:
        parts = [
            protocol_posteriors(model, samples, part, given_scales, settings, cache) for part in COMBINED[protocol]
        ]
        _check_same_images(parts)
        result = Posteriors(
            protocols.mean_posterior([part.probs for part in parts]),
            parts[0].indices,
            sum(part.seconds for part in parts),
            sorted({q for part in parts for q in part.scales}),
        )
    else:
        result = evaluate_protocol(model, samples, protocol, test_scales(protocol, model, given_scales), settings)
    cache[protocol] = result
    return result


def _check_same_images(parts: Sequence[Posteriors]) -> None:
    if any(part.indices != parts[0].indices for part in parts):
        raise datasets.DataError("images became unreadable between two passes; evaluate again")


def ensemble(parts: Sequence[Posteriors], permutations: Sequence[list[int]]) -> Posteriors:
    """Section 4.4: the models' posteriors (columns put in one class order) averaged."""
    _check_same_images(parts)
    probs = protocols.mean_posterior([part.probs[:, order] for part, order in zip(parts, permutations, strict=True)])
    return Posteriors(
        probs, parts[0].indices, sum(part.seconds for part in parts), sorted({q for part in parts for q in part.scales})
    )


def errors(result: Posteriors, labels: Sequence[int]) -> tuple[float, float]:
    """Top-1 and top-5 error of the posteriors (fractions, as training's validation computes them)."""
    target = torch.tensor([labels[i] for i in result.indices])
    total = len(target)
    return (1 - topk_correct(result.probs, target, 1) / total, 1 - topk_correct(result.probs, target, 5) / total)


# ----------------------------------------------------------------------------- the command


def get_args_parser() -> argparse.ArgumentParser:
    p = OneLineArgumentParser(
        prog="python -m training.evaluate",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--checkpoint",
        action="append",
        required=True,
        metavar="CKPT",
        help="a trained model (repeat for an ensemble: posteriors averaged, section 4.4)",
    )
    p.add_argument(
        "--data", required=True, metavar="DIR", help="DIR/val/<class>/*, DIR/train (held-out split) or DIR/<class>/*"
    )
    p.add_argument(
        "--protocol",
        nargs="+",
        choices=protocols.PROTOCOLS,
        metavar="NAME",
        help=f"any of {', '.join(protocols.PROTOCOLS)} (default: all)",
    )
    p.add_argument(
        "--test-scales",
        type=int,
        nargs="+",
        metavar="Q",
        help="test scales Q for every protocol (default: the checkpoint's Q for center/five/ten; "
        "S-32, S, S+32, or Smin, (Smin+Smax)/2, Smax for the others)",
    )
    p.add_argument(
        "--batch-size",
        type=int,
        default=DEFAULT_BATCH,
        help=f"images per batch; at most 5x as many views per forward pass (default {DEFAULT_BATCH})",
    )
    p.add_argument("--json", metavar="FILE", help="write every figure to FILE")
    p.add_argument(
        "--labels",
        metavar="FILE",
        help="class names, one per line in index order, for every --checkpoint (as python -m export's; "
        "default: the checkpoint's, ImageNet-1k's for a 1,000-class state dict)",
    )
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    p.add_argument(
        "--amp",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="bf16 autocast (default: as each checkpoint was trained and validated)",
    )
    p.add_argument(
        "--workers", type=int, default=None, help="image decoding workers (default 0 on CPU, min(8, cores) on GPU)"
    )
    return p


def check_args(args: argparse.Namespace) -> None:
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.workers is not None and args.workers < 0:
        raise UsageError(f"--workers must not be negative, got {args.workers}")
    if args.test_scales and min(args.test_scales) < 1:
        raise UsageError(f"--test-scales must be positive, got {args.test_scales}")
    if args.json:
        target = Path(args.json)
        if target.is_dir():
            raise UsageError(f"--json {target} is a directory")
        if not target.parent.is_dir():
            raise UsageError(f"--json {target}: no folder {target.parent}")


def class_orders(models: Sequence[LoadedModel]) -> list[list[int]]:
    """For each model, its posterior columns in the first model's class order."""
    reference = models[0].classes
    orders = []
    for model in models:
        if sorted(model.classes) != sorted(reference):
            raise UsageError(
                f"{model.name} and {models[0].name} know different classes; an ensemble needs the same ones"
            )
        orders.append([model.classes.index(name) for name in reference])
    return orders


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Evaluate; returns the report (rows of figures) that the CLI prints and writes."""
    check_args(args)
    labels = read_labels(args.labels) if args.labels else None
    models = [load_model(path, labels=labels) for path in args.checkpoint]
    orders = class_orders(models)
    requested = args.protocol or list(DEFAULT_PROTOCOLS)
    for model in models:  # bad scales fail before any work
        for protocol in requested:
            for part in COMBINED.get(protocol, (protocol,)):
                test_scales(part, model, args.test_scales)
    classes, samples, where = image_samples(Path(args.data), models[0])
    device = resolve_device(args.device)
    workers = (
        args.workers if args.workers is not None else (min(8, os.cpu_count() or 1) if device.type == "cuda" else 0)
    )
    settings = Settings(
        batch_size=args.batch_size, device=device, amp=args.amp, workers=workers, progress=sys.stderr.isatty()
    )
    labels = [label for _, label in samples]
    log.info(
        "evaluating %d model(s) on %d images of %d classes from %s", len(models), len(samples), len(classes), where
    )
    caches: list[dict[str, Posteriors]] = [{} for _ in models]
    rows = []
    for protocol in requested:
        results = [
            protocol_posteriors(model, samples, protocol, args.test_scales, settings, cache)
            for model, cache in zip(models, caches, strict=True)
        ]
        named = [(model.name, result) for model, result in zip(models, results, strict=True)]
        if len(models) > 1:
            named.append(("ensemble", ensemble(results, orders)))
        for name, result in named:
            top1, top5 = errors(result, labels)
            rows.append(
                {
                    "model": name,
                    "protocol": protocol,
                    "test_scales": result.scales,
                    "top1_err": top1,
                    "top5_err": top5,
                    "images": len(result.indices),
                    "wall_s": round(result.seconds, 2),
                }
            )
    return {
        "checkpoints": list(args.checkpoint),
        "data": str(args.data),
        "images_from": where,
        "classes": classes,
        "images": len(samples),
        "device": str(device),
        "rows": rows,
    }


def table(report: dict[str, Any]) -> str:
    """The report as a paper-like table: one row per model and protocol."""
    width = max(len(row["model"]) for row in report["rows"])
    lines = [f"{'model':<{width}}  {'protocol':<12}  {'test scales Q':<16}  top-1 err  top-5 err  images     wall"]
    for row in report["rows"]:
        scales = ",".join(map(str, row["test_scales"]))
        lines.append(
            f"{row['model']:<{width}}  {row['protocol']:<12}  {scales:<16}  {100 * row['top1_err']:8.2f}%"
            f"  {100 * row['top5_err']:8.2f}%  {row['images']:6d}  {row['wall_s']:6.1f} s"
        )
    return "\n".join(lines)


def cli(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    args = get_args_parser().parse_args(argv)
    try:
        report = run(args)
    except (UsageError, datasets.DataError, CheckpointError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(table(report))
    if args.json:
        try:
            Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
        except OSError as error:
            print(f"error: cannot write {args.json}: {error.strerror or error}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(cli())
