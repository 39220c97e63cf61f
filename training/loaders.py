"""The DataLoaders of a training run: augmented training crops, validation crops, dense views.

One :class:`~torch.utils.data.distributed.DistributedSampler` in one process or many, so the
global batch is the same set of images whatever the number of processes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler

from training import data as datasets
from training.config import TrainConfig
from training.distributed import Runtime
from training.rng import epoch_seed
from training.transforms import DensePreset, EvalPreset, Stats, TrainPreset
from vgg.protocols import multi_scale_test_scales

__all__ = ["Loaders", "make_loaders"]


@dataclass(frozen=True)
class Loaders:
    sampler: DistributedSampler
    train: datasets.ReportingLoader
    val: datasets.ReportingLoader
    dense: datasets.ReportingLoader | None
    worker_generator: torch.Generator | None  # only with workers: reseeded every epoch

    def start_epoch(self, epoch: int, *, seed: int, rank: int) -> None:
        self.sampler.set_epoch(epoch)
        if self.worker_generator is not None:
            self.worker_generator.manual_seed(epoch_seed(seed, epoch, rank))


def make_loaders(config: TrainConfig, splits: datasets.Splits, stats: Stats, runtime: Runtime) -> Loaders:
    workers = config.workers
    if workers is None:
        workers = min(8, os.cpu_count() or 1) if runtime.device.type == "cuda" else 0
    pin = runtime.device.type == "cuda"
    train_set = datasets.ImageDataset(
        splits.train,
        TrainPreset(
            scale_range=config.scale_range,
            crop=config.crop,
            stats=stats,
            pca_std=config.pca_std,
            augment=config.augment,
        ),
    )
    # The same sampler in one process or many: the global batch is the same set of images.
    sampler = DistributedSampler(
        train_set, num_replicas=runtime.world_size, rank=runtime.rank, shuffle=True, seed=config.seed
    )
    # Training workers start afresh each epoch from a generator seeded by (seed, epoch, rank).
    # With no workers the augmentations use the main process's RNG, saved in last.pt.
    generator = torch.Generator() if workers > 0 else None
    train_loader = DataLoader(
        train_set,
        batch_size=config.batch_size // runtime.world_size,
        sampler=sampler,
        collate_fn=datasets.collate_skipping,
        num_workers=workers,
        pin_memory=pin,
        generator=generator,
    )
    val_set = datasets.ImageDataset(splits.val, EvalPreset(test_scale=config.test_scale, stats=stats))
    val_loader = DataLoader(
        val_set,
        batch_size=max(1, config.batch_size // 5),
        collate_fn=datasets.collate_skipping,
        num_workers=workers,
        pin_memory=pin,
        persistent_workers=workers > 0,
    )
    dense_loader = None
    if config.eval_dense:
        scales = multi_scale_test_scales(config.scale_range, config.crop)
        dense_set = datasets.ImageDataset(splits.val, DensePreset(scales=scales, stats=stats))
        dense_loader = datasets.ReportingLoader(
            DataLoader(dense_set, batch_size=8, collate_fn=datasets.collate_lists, num_workers=workers)
        )
    return Loaders(
        sampler=sampler,
        train=datasets.ReportingLoader(train_loader),
        val=datasets.ReportingLoader(val_loader),
        dense=dense_loader,
        worker_generator=generator,
    )
