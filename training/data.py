"""Image data: ImageNet-style folders, torchvision downloads, the generated demo set.

Every source ends up as a folder ``ROOT/train/<class>/*`` (and optionally ``ROOT/val/``),
so export's calibration and any later run can read it back from ``config["data"]``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from PIL import Image

from vgg.errors import one_line
from vgg.preprocessing import IMAGE_EXTENSIONS, open_rgb

log = logging.getLogger(__name__)

DOWNLOADABLE = ("cifar10", "stl10", "imagenette")


class DataError(ValueError):
    """A data argument that cannot be used; the message is one line for the CLI."""


Sample = tuple[str, int]  # (path, class index)


@dataclass(frozen=True)
class Splits:
    root: Path
    classes: list[str]
    train: list[Sample]
    val: list[Sample]


def cache_dir() -> Path:
    """Where generated and downloaded data live: ``$VGG_CACHE`` or ``~/.cache/vggnet``."""
    return Path(os.environ.get("VGG_CACHE") or Path.home() / ".cache" / "vggnet")


def _loops_back(real: Path, chain: tuple[Path, ...]) -> bool:
    """Whether a folder resolving to ``real`` is one of the resolved folders in ``chain`` (the
    walk so far) or an ancestor of one: walking it would repeat or swallow the walk."""
    return any(real == seen or real in seen.parents for seen in chain)


def image_files(folder: Path) -> list[str]:
    """Image files under ``folder`` (following symlinks), sorted; :class:`DataError` for a
    symlinked folder that points back to a folder containing it (an endless or all-swallowing walk)."""
    found: list[str] = []
    pending = [(folder, (folder.parent.resolve(),))]
    while pending:
        directory, chain = pending.pop()
        real = directory.resolve()
        if _loops_back(real, chain):
            raise DataError(f"{directory}: a symlink back to {real}, which contains it; remove the link")
        try:
            entries = sorted(directory.iterdir())
        except OSError as error:
            raise DataError(f"{directory}: cannot list ({error.strerror or error})") from None
        for entry in entries:
            if entry.is_dir():
                pending.append((entry, (*chain, real)))
            elif entry.suffix.lower() in IMAGE_EXTENSIONS and entry.is_file():
                found.append(str(entry))
    return sorted(found)


def list_image_folder(folder: Path) -> tuple[list[str], list[Sample]]:
    """Class names (sorted sub-folder names) and samples of ``folder/<class>/<image>``."""
    if not folder.is_dir():
        raise DataError(f"{folder}: no such folder")
    classes = sorted(entry.name for entry in folder.iterdir() if entry.is_dir() and not entry.name.startswith("."))
    if not classes:
        raise DataError(f"{folder}: no class folders (expected {folder}/<class>/<image>)")
    samples: list[Sample] = []
    for index, name in enumerate(classes):
        files = image_files(folder / name)
        if not files:
            raise DataError(f"{folder / name}: class folder has no images ({', '.join(IMAGE_EXTENSIONS[:4])}, ...)")
        samples += [(path, index) for path in files]
    return classes, samples


def stratified_split(targets: list[int], *, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Indices (train, val): ``fraction`` of each class to val (at least one image of any
    class with two or more), drawn with a seeded generator. Both lists are sorted."""
    if not 0.0 < fraction < 1.0:
        raise DataError(f"--val-split must be between 0 and 1, got {fraction}")
    rng = np.random.default_rng(seed)
    targets_array = np.asarray(targets)
    train, val = [], []
    for label in np.unique(targets_array):
        members = np.flatnonzero(targets_array == label)
        rng.shuffle(members)
        count = round(len(members) * fraction)
        count = min(max(count, 1 if len(members) > 1 else 0), len(members) - 1)
        val += members[:count].tolist()
        train += members[count:].tolist()
    return sorted(train), sorted(val)


def folder_splits(root: Path, *, val_split: float, seed: int) -> Splits:
    """``root/train`` (at least two classes) and ``root/val`` if present, else a stratified split
    of ``root/train``."""
    if not root.is_dir():
        raise DataError(f"{root}: no such folder")
    classes, samples = list_image_folder(root / "train")
    if len(classes) < 2:
        raise DataError(f"{root / 'train'}: only one class folder ({classes[0]}); a classifier needs at least two")
    if (root / "val").is_dir():
        val_classes, val = list_image_folder(root / "val")
        if val_classes != classes:
            raise DataError(f"{root}: val/ classes differ from train/ classes")
        return Splits(root=root, classes=classes, train=samples, val=val)
    train_idx, val_idx = stratified_split([label for _, label in samples], fraction=val_split, seed=seed)
    return Splits(root=root, classes=classes, train=[samples[i] for i in train_idx], val=[samples[i] for i in val_idx])


def download_dataset(name: str) -> Path:
    """Download ``name`` with torchvision and write it as an image folder under the cache.

    Raises :class:`DataError` when the download fails (e.g. no internet access).
    """
    if name not in DOWNLOADABLE:
        raise DataError(f"unknown --dataset {name!r}; choose one of {', '.join(DOWNLOADABLE)}")
    destination = cache_dir() / "datasets" / name
    if (destination / ".complete").exists():
        return destination
    import torchvision.datasets as tvd

    raw = cache_dir() / "downloads" / name
    try:
        if name == "cifar10":
            train, val = tvd.CIFAR10(raw, train=True, download=True), tvd.CIFAR10(raw, train=False, download=True)
        elif name == "stl10":
            train, val = tvd.STL10(raw, split="train", download=True), tvd.STL10(raw, split="test", download=True)
        else:
            train = tvd.Imagenette(raw, split="train", size="320px", download=True)
            val = tvd.Imagenette(raw, split="val", size="320px", download=False)
    except Exception as error:  # noqa: BLE001 - any download failure becomes one line
        raise DataError(
            f"cannot download {name} ({one_line(error, limit=160)}): this machine has no internet access; "
            f"put the images in DIR/train/<class>/ (and optionally DIR/val/<class>/) and pass --data DIR"
        ) from None
    _write_image_folder({"train": train, "val": val}, destination)
    return destination


def _write_image_folder(splits: dict, destination: Path) -> None:
    temporary = destination.with_name(destination.name + f".tmp{os.getpid()}")
    for split, dataset in splits.items():
        classes = [str(c) if isinstance(c, str) else str(c[0]) for c in getattr(dataset, "classes", [])]
        for index in range(len(dataset)):
            image, label = dataset[index]
            name = classes[label] if classes else str(label)
            folder = temporary / split / name.replace("/", "_")
            folder.mkdir(parents=True, exist_ok=True)
            image.convert("RGB").save(folder / f"{index:06d}.png")
    (temporary / ".complete").touch()
    os.replace(temporary, destination)


class Unreadable(NamedTuple):
    """What :class:`ImageDataset` returns for a file it cannot decode."""

    path: str
    reason: str


class Collated(NamedTuple):
    """A collated batch (``None`` when every file was unreadable) and the unreadable files.

    A NamedTuple so that the DataLoader's pin-memory thread pins ``batch``.
    """

    batch: Any
    unreadable: list[Unreadable]


def load_rgb(path: str):
    """:func:`vgg.preprocessing.open_rgb`, or an :class:`Unreadable` for any failure: a
    strange file (struct.error, KeyError... from a decoder) must never stop an epoch."""
    try:
        return open_rgb(path)
    except Exception as error:  # noqa: BLE001 - per-file loading: report and skip, whatever the cause
        return Unreadable(path, one_line(error))


class ImageDataset(torch.utils.data.Dataset):
    """``(path, label)`` samples decoded with :func:`vgg.preprocessing.open_rgb` (any mode to RGB).

    An unreadable file yields an :class:`Unreadable`, which the collate functions drop from
    the batch and pass on; :class:`ReportingLoader` logs it once, in the main process.
    """

    def __init__(self, samples: list[Sample], transform: Callable[[Image.Image], object]) -> None:
        self.samples, self.transform = samples, transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, label = self.samples[index]
        image = load_rgb(path)
        if isinstance(image, Unreadable):
            return image
        return self.transform(image), label


def _split(items: list) -> tuple[list, list[Unreadable]]:
    readable = [item for item in items if not isinstance(item, Unreadable)]
    return readable, [item for item in items if isinstance(item, Unreadable)]


def collate_skipping(items: list) -> Collated:
    """Default collation of the readable samples (``batch`` is ``None`` when there are none)."""
    readable, unreadable = _split(items)
    return Collated(torch.utils.data.default_collate(readable) if readable else None, unreadable)


def collate_lists(items: list) -> Collated:
    """For dense evaluation: images of different sizes stay a list."""
    readable, unreadable = _split(items)
    return Collated(readable or None, unreadable)


class ReportingLoader:
    """Iterates a DataLoader built with the collate functions above and yields the batches
    (``None`` for an all-unreadable batch); logs each unreadable file once over all epochs
    and workers (the log happens here, in the main process)."""

    def __init__(self, loader) -> None:
        self.loader = loader
        self.reported: set[str] = set()

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[Any]:
        for collated in self.loader:
            for item in collated.unreadable:
                if item.path not in self.reported:
                    self.reported.add(item.path)
                    log.warning("skipping unreadable image %s: %s", item.path, item.reason)
            yield collated.batch


def sample_images(samples: list[Sample], *, count: int, scale: int, seed: int) -> list[Image.Image]:
    """Up to ``count`` readable training images, shortest side rescaled to ``scale``;
    :class:`DataError` when none of those drawn can be read."""
    from vgg.preprocessing import resize_shortest_side

    rng = np.random.default_rng(seed)
    chosen = rng.permutation(len(samples))[:count]
    images, unreadable = [], []
    for index in chosen:
        image = load_rgb(samples[index][0])
        if isinstance(image, Unreadable):
            log.warning("skipping unreadable image %s: %s", image.path, image.reason)
            unreadable.append(image)
        else:
            images.append(resize_shortest_side(image, scale))
    if not images:
        first = unreadable[0] if unreadable else Unreadable("(none)", "no images")
        raise DataError(
            f"none of the {len(chosen)} training images sampled can be read "
            f"(e.g. {first.path}: {first.reason}); check the data folder"
        )
    return images
