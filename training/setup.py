"""Setting a run up: its data folder, the training-set statistics, the model (initialised,
pre-initialised from net A or fine-tuned from given weights), its optimizer and LR rule."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

import vgg
from training import data as datasets
from training import finetune
from training.config import TrainConfig, UsageError
from training.demo import ensure_demo_data
from training.distributed import Runtime
from training.epoch import make_optimizer
from training.lr import PlateauState
from training.resume import restore
from training.rng import seed_everything
from training.transforms import Stats, pixel_stats
from vgg.checkpoint import load_checkpoint

__all__ = ["Training", "build_model", "compute_stats", "resolve_data", "start_training"]


def resolve_data(config: TrainConfig) -> TrainConfig:
    """Materialise the demo set or a download as a folder; ``config.data`` points at it."""
    if config.data is not None:
        return dataclasses.replace(config, data=str(Path(config.data).resolve()))
    if config.dataset is not None:
        return dataclasses.replace(config, data=str(datasets.download_dataset(config.dataset)))
    return dataclasses.replace(config, data=str(ensure_demo_data()))


def compute_stats(config: TrainConfig, train: list[datasets.Sample]) -> Stats:
    images = datasets.sample_images(train, count=config.stats_images, scale=config.test_scale, seed=config.seed)
    return pixel_stats(images, seed=config.seed)


def build_model(
    config: TrainConfig, *, num_classes: int, source: finetune.Source | None = None
) -> tuple[nn.Module, str]:
    init = config.resolved_init()
    model = vgg.build(
        config.cfg,
        num_classes=num_classes,
        batch_norm=config.batch_norm,
        dropout=config.dropout,
        init=init,
        fc_width=config.fc_width,
    )
    if config.init_from is not None:
        shallower = vgg.checkpoint.model_from_checkpoint(load_checkpoint(config.init_from))
        try:
            vgg.init_from_shallower(model, shallower)
        except ValueError as error:
            raise UsageError(f"--init-from {config.init_from}: {error}") from None
        init = f"{init} + first 4 convs and 3 FC layers from {config.init_from}"
    if source is not None:
        copied, fresh = finetune.copy_weights(model, source)
        init = f"fine-tuned from {source.path}: {len(copied)} tensors copied; {init} for {', '.join(fresh) or 'none'}"
    if config.freeze_features:
        finetune.freeze_features(model)
    return model, init


# ----------------------------------------------------------------------------- run directory


@dataclass
class Training:
    """What the epoch loop works on."""

    config: TrainConfig
    runtime: Runtime
    model: nn.Module  # the bare model: evaluated and saved
    train_model: nn.Module  # the model, or its DistributedDataParallel wrapper
    optimizer: torch.optim.Optimizer
    rule: PlateauState
    history: list[dict[str, Any]]
    init: str
    classes: list[str]
    stats: Stats
    out: Path

    @property
    def channels_last(self) -> bool:
        return self.runtime.device.type == "cuda"


def start_training(
    config: TrainConfig,
    runtime: Runtime,
    splits: datasets.Splits,
    stats: Stats,
    resume_state: dict[str, Any] | None,
    source: finetune.Source | None,
) -> tuple[Training, int]:
    """The model (resumed from ``resume_state`` if given), its optimizer and LR rule; and the first epoch to run."""
    seed_everything(config.seed + runtime.rank)
    model, init = build_model(config, num_classes=len(splits.classes), source=source)
    model.to(runtime.device)
    if runtime.device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(model, config)  # only the parameters that train (requires_grad)
    rule, start_epoch, history = PlateauState(lr=config.lr), 1, []
    if resume_state is not None:
        rule, start_epoch, history, init = restore(
            resume_state,
            model=model,
            optimizer=optimizer,
            init=init,
            path=Path(config.out) / "last.pt",
            rank=runtime.rank,
        )
    train_model = nn.parallel.DistributedDataParallel(model) if runtime.distributed else model
    training = Training(
        config=config,
        runtime=runtime,
        model=model,
        train_model=train_model,
        optimizer=optimizer,
        rule=rule,
        history=history,
        init=init,
        classes=splits.classes,
        stats=stats,
        out=Path(config.out),
    )
    return training, start_epoch
