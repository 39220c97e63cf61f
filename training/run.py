"""``python -m training.run --cfg D``: train a VGG with the paper's recipe (section 3.1),
validate every epoch (section 3.2), checkpoint, and export the best model for serving.

Without ``--data``/``--dataset`` it trains on the generated demo data set. Several
processes: ``torchrun --nproc-per-node N -m training.run ...`` (DDP; nccl on GPU, gloo on CPU).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import logging
import math
import os
import random
import sys
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler

import vgg
from training import data as datasets
from training import finetune
from training.config import TrainConfig
from training.demo import DEMO_OVERRIDES, demo_data_dir, ensure_demo_data
from training.engine import evaluate, evaluate_dense, make_optimizer, train_one_epoch
from training.lr import PlateauState, plateau_step
from training.transforms import DensePreset, EvalPreset, Stats, TrainPreset, pixel_stats
from vgg.checkpoint import CHECKPOINT_FORMAT, CheckpointError, load_checkpoint, save_checkpoint
from vgg.errors import OneLineArgumentParser, one_line
from vgg.preprocessing import MAX_SCALE, MIN_CROP
from vgg.protocols import multi_scale_test_scales

log = logging.getLogger("training")

INITS = ("paper", "glorot", "kaiming")
DEMO_HINT = (
    "trained on the built-in DEMO data (generated shapes, not real photos). To train on real data: "
    "python -m training.run --cfg D --data DIR  (DIR/train/<class>/*.jpg, optional DIR/val/<class>/)"
)


class UsageError(ValueError):
    """A bad argument found after parsing; one line, exit code 2."""


class ExportFailed(RuntimeError):
    """Training finished but exporting best.pt did not; one line, exit code 1."""


# Rank 0 evaluates (``--eval-dense`` can take long) while the others wait in a collective:
# far above the default 10 min (nccl) / 30 min (gloo) process-group timeout.
PROCESS_GROUP_TIMEOUT = timedelta(hours=6)
RESUME_KEYS = ("config", "optimizer", "lr_rule", "epoch", "rng", "history")
STATS_KEYS = ("mean", "std", "pca_eigval", "pca_eigvec")
MAX_FC_WIDTH = 16384  # 4x the paper's 4096: the first FC layer alone is then 1.6 GB of fp32 weights


# ----------------------------------------------------------------------------- arguments


def get_args_parser() -> argparse.ArgumentParser:
    """Flags map one to one onto :class:`TrainConfig` fields (defaults: the paper's values).

    Unset flags are absent from the namespace (``argparse.SUPPRESS``), so the demo's own
    geometry only fills in what the user did not choose.
    """
    d = TrainConfig()
    p = OneLineArgumentParser(prog="python -m training.run", description=__doc__.split("\n\n")[0],
                                argument_default=argparse.SUPPRESS,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    model = p.add_argument_group("model (paper, Table 1)")
    model.add_argument("--cfg", choices=vgg.CONFIG_NAMES, help=f"configuration (default {d.cfg})")
    model.add_argument("--batch-norm", action=argparse.BooleanOptionalAction, help="BatchNorm after each conv (not in the paper)")
    model.add_argument("--fc-width", type=int, help=f"width of the two hidden FC layers (default {d.fc_width})")
    model.add_argument("--dropout", type=float, help=f"dropout of the first two FC layers (default {d.dropout})")
    model.add_argument("--init", choices=INITS, help="weight init (default: paper for A/A-LRN or with --init-from, glorot otherwise)")
    model.add_argument("--init-from", metavar="CKPT", help="pre-initialise from a trained net A checkpoint (section 3.1)")
    model.add_argument("--finetune-from", metavar="FILE",
                       help="fine-tune: start from a checkpoint or torchvision-layout VGG state dict (.pth/.safetensors); "
                       "its configuration, normalisation and lr 1e-3 are the defaults")
    model.add_argument("--freeze-features", action="store_true", help="with --finetune-from: train only the FC layers")
    optim = p.add_argument_group("optimiser (paper, section 3.1)")
    optim.add_argument("--batch-size", type=int, help=f"global mini-batch (default {d.batch_size})")
    optim.add_argument("--momentum", type=float, help=f"(default {d.momentum})")
    optim.add_argument("--weight-decay", type=float, help=f"(default {d.weight_decay})")
    optim.add_argument("--decay-bias", action=argparse.BooleanOptionalAction,
                       help="weight decay on biases and BatchNorm parameters too (default on; --no-decay-bias: off)")
    optim.add_argument("--lr", type=float, help=f"initial learning rate (default {d.lr})")
    optim.add_argument("--lr-factor", type=float, help=f"LR multiplier on a plateau (default {d.lr_factor})")
    optim.add_argument("--lr-patience", type=int, help=f"epochs without val improvement before a decrease (default {d.lr_patience})")
    optim.add_argument("--lr-max-decreases", type=int, help=f"(default {d.lr_max_decreases})")
    optim.add_argument("--epochs", type=int, help=f"(default {d.epochs}; demo: {DEMO_OVERRIDES['epochs']})")
    images = p.add_argument_group("training images (paper, section 3.1)")
    images.add_argument("--scale", type=int, nargs="+", metavar="S",
                        help="training scale S: one value (fixed) or SMIN SMAX (jitter) (default 256)")
    images.add_argument("--crop", type=int, help=f"crop size (default {d.crop})")
    images.add_argument("--augment", action=argparse.BooleanOptionalAction, help="random crop, flip and colour shift (default on)")
    images.add_argument("--pca-std", type=float, help=f"std of the PCA colour shift alphas (default {d.pca_std})")
    images.add_argument("--stats-images", type=int, help=f"images sampled for mean/std/PCA (default {d.stats_images})")
    images.add_argument("--test-scale", dest="eval_scale", type=int, metavar="Q",
                        help="single test scale Q for validation and the served graph (default: S, or (Smin+Smax)/2)")
    images.add_argument("--eval-dense", action=argparse.BooleanOptionalAction, help="dense multi-scale evaluation (section 3.2)")
    source = p.add_argument_group("data")
    source.add_argument("--data", metavar="DIR", help="ImageNet-style folder: DIR/train/<class>/*, optional DIR/val/<class>/*")
    source.add_argument("--dataset", choices=datasets.DOWNLOADABLE, help="download with torchvision (needs internet)")
    source.add_argument("--val-split", type=float, help=f"held-out fraction of train/ without val/ (default {d.val_split})")
    running = p.add_argument_group("running")
    running.add_argument("--seed", type=int, help=f"(default {d.seed})")
    running.add_argument("--amp", action=argparse.BooleanOptionalAction, help="bf16 autocast (default off; demo: on where the CPU has bf16)")
    running.add_argument("--workers", type=int, help="DataLoader workers (default 0 on CPU, min(8, cores) on GPU)")
    running.add_argument("--device", help="auto, cpu, cuda, cuda:N (default auto)")
    running.add_argument("--out", metavar="DIR", help="run directory (default runs/<cfg>-<timestamp>)")
    running.add_argument("--resume", action="store_true", default=False, help="continue from DIR/last.pt of --out")
    running.add_argument("--log-every", type=int, help="also log every N steps")
    running.add_argument("--export", action=argparse.BooleanOptionalAction, help="export + register best.pt at the end (default on)")
    return p


def cpu_has_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def config_from_args(args: argparse.Namespace) -> tuple[TrainConfig, bool]:
    """The resolved configuration and whether it trains on the demo data."""
    given = {key: value for key, value in vars(args).items() if key != "resume"}
    if "scale" in given:
        given["scale"] = tuple(given["scale"])
    demo = given.get("data") is None and given.get("dataset") is None
    base = TrainConfig()
    if demo:
        base = dataclasses.replace(base, **DEMO_OVERRIDES, amp=cpu_has_bf16() or torch.cuda.is_available())
    return dataclasses.replace(base, **given), demo


RESUME_OVERRIDES = ("epochs", "export", "workers", "log_every", "device")


def resumed_config(saved: dict[str, Any], args: argparse.Namespace) -> TrainConfig:
    """The saved configuration of a run; only how long and where it runs may change. It
    continues in ``--out`` (where its last.pt was read), even if the run was moved there."""
    given = {key: value for key, value in vars(args).items() if key not in ("resume", "out")}
    ignored = sorted(set(given) - set(RESUME_OVERRIDES))
    if ignored:
        log.warning("--resume keeps the saved recipe; ignoring %s", ", ".join(f"--{k.replace('_', '-')}" for k in ignored))
    kept = {k: v for k, v in given.items() if k in RESUME_OVERRIDES}
    return dataclasses.replace(TrainConfig.from_dict(saved), **kept, out=str(args.out))


def check_resume_state(state: dict[str, Any], path: Path) -> None:
    """Raise :class:`CheckpointError` unless ``state`` carries everything a resume reads."""
    missing = [key for key in RESUME_KEYS if key not in state]
    if missing:
        raise CheckpointError(f"{path}: cannot resume, the checkpoint lacks {', '.join(missing)}")
    if not isinstance(state["config"], dict) or not isinstance(state["history"], list):
        raise CheckpointError(f"{path}: cannot resume, malformed config or history")
    stats = state["preprocess"] if isinstance(state["preprocess"], dict) else {}
    missing = [key for key in STATS_KEYS if key not in stats]
    if missing:
        raise CheckpointError(f"{path}: cannot resume, its preprocess lacks {', '.join(missing)}")
    if not isinstance(state["config"].get("data"), str):
        raise CheckpointError(f"{path}: cannot resume, the saved configuration names no data folder")
    try:
        TrainConfig.from_dict(state["config"])
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"{path}: cannot resume, malformed saved configuration ({error})") from None


def validate(config: TrainConfig, *, world_size: int) -> None:
    """Raise :class:`UsageError` (one line) for a configuration that cannot run."""
    _validate_geometry(config, world_size=world_size)
    _validate_optimiser(config)
    if config.freeze_features and config.finetune_from is None:
        raise UsageError("--freeze-features needs --finetune-from FILE (the trained features to keep)")
    _validate_running(config)


def _validate_geometry(config: TrainConfig, *, world_size: int) -> None:
    if len(config.scale) not in (1, 2) or config.scale_range[0] > config.scale_range[1]:
        raise UsageError(f"--scale takes S or SMIN SMAX with SMIN <= SMAX, got {list(config.scale)}")
    if not MIN_CROP <= config.crop <= config.scale_range[0] <= config.scale_range[1] <= MAX_SCALE:
        raise UsageError(f"need {MIN_CROP} <= --crop <= S <= {MAX_SCALE}, got crop {config.crop} and S {list(config.scale)}")
    if not config.crop <= config.test_scale <= MAX_SCALE:
        raise UsageError(f"need --crop <= --test-scale Q <= {MAX_SCALE}, got Q {config.test_scale} and crop {config.crop}")
    if config.batch_size < 1 or config.batch_size % world_size:
        raise UsageError(f"--batch-size {config.batch_size} must be a positive multiple of the {world_size} processes")
    if config.epochs < 1 or config.lr <= 0:
        raise UsageError("--epochs and --lr must be positive")
    if not 1 <= config.fc_width <= MAX_FC_WIDTH:
        raise UsageError(f"--fc-width must be between 1 and {MAX_FC_WIDTH}, got {config.fc_width}")
    if config.data is not None and config.dataset is not None:
        raise UsageError("give --data or --dataset, not both")
    if config.stats_images < 1:
        raise UsageError(f"--stats-images must be at least 1, got {config.stats_images}")


FLOAT_FLAGS = ("dropout", "momentum", "weight_decay", "lr", "lr_factor", "pca_std", "val_split")


def _validate_optimiser(config: TrainConfig) -> None:
    for name in FLOAT_FLAGS:
        value = getattr(config, name)
        if not math.isfinite(value):
            raise UsageError(f"--{name.replace('_', '-')} must be a finite number, got {value}")
    if not 0.0 <= config.dropout < 1.0:
        raise UsageError(f"--dropout must be in [0, 1), got {config.dropout}")
    for flag, value in (("--momentum", config.momentum), ("--weight-decay", config.weight_decay),
                        ("--pca-std", config.pca_std), ("--lr-patience", config.lr_patience),
                        ("--lr-max-decreases", config.lr_max_decreases)):
        if value < 0:
            raise UsageError(f"{flag} must not be negative, got {value}")
    if not 0.0 < config.lr_factor <= 1.0:
        raise UsageError(f"--lr-factor must be in (0, 1], got {config.lr_factor}")
    if not 0.0 < config.val_split < 1.0:
        raise UsageError(f"--val-split must be between 0 and 1, got {config.val_split}")


def _validate_running(config: TrainConfig) -> None:
    if config.workers is not None and config.workers < 0:
        raise UsageError(f"--workers must not be negative, got {config.workers}")
    if config.log_every < 0:
        raise UsageError(f"--log-every must not be negative, got {config.log_every}")
    if config.out is not None and Path(config.out).exists() and not Path(config.out).is_dir():
        raise UsageError(f"--out {config.out} is a file, not a directory")


# ----------------------------------------------------------------------------- setup


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    rank: int
    world_size: int
    launched: bool = False  # started by torchrun: a process group even for one process

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1 or self.launched

    @property
    def backend(self) -> str:
        return dist.get_backend() if dist.is_available() and dist.is_initialized() else "none"


def resolve_device(name: str) -> torch.device:
    """``auto`` (CUDA if present), ``cpu``, ``cuda`` or ``cuda:N``; :class:`UsageError` otherwise."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise UsageError(f"--device {name!r}: expected auto, cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise UsageError(f"--device {name!r}: expected auto, cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: no CUDA GPU is available (use --device cpu)")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise UsageError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s)")
    return device


def setup_runtime(device_name: str) -> Runtime:
    """Device auto-selection; process group from torchrun's environment variables."""
    launched = "WORLD_SIZE" in os.environ  # torchrun sets it, also for --nproc-per-node 1
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    device = resolve_device(device_name)
    if device.type == "cuda" and launched:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if local_rank >= torch.cuda.device_count():
            raise UsageError(
                f"process with LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} visible GPU(s): "
                "start at most one process per GPU (torchrun --nproc-per-node), or train with --device cpu"
            )
        device = torch.device("cuda", local_rank)
    if device.type == "cuda":
        if device.index is None:  # plain "cuda": the current device, by its index
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
    if launched and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", timeout=PROCESS_GROUP_TIMEOUT)
    return Runtime(device=device, rank=rank, world_size=world_size, launched=launched)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """RNG states as tensors and plain lists (loadable with ``weights_only=True``)."""
    kind, keys, position, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": [kind, keys.tolist(), int(position), int(has_gauss), float(gauss)],
        "python": [version, list(internal), gauss_next],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, position, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), position, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if "cuda" in state and torch.cuda.is_available():
        # A run may resume on fewer (or more) GPUs than it was saved on: restore what fits.
        for index, cuda_state in enumerate(state["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state, index)


def gather_rng_states(runtime: Runtime) -> list[dict[str, Any]]:
    """Every rank's RNG state in rank order, on rank 0 (the other ranks get ``[]``). Each rank
    draws its own augmentations, so a resume must give each its own state back."""
    state = rng_state()
    if not runtime.distributed:
        return [state]
    gathered: list[Any] | None = [None] * runtime.world_size if runtime.is_main else None
    dist.gather_object(state, gathered, dst=0)
    return list(gathered) if gathered is not None else []


def rank_rng_state(state: dict[str, Any], rank: int) -> dict[str, Any] | None:
    """``rank``'s saved RNG state in a resume state (``None`` if it was saved by fewer processes)."""
    ranks = state.get("rng_ranks")
    if isinstance(ranks, list) and ranks:
        return ranks[rank] if rank < len(ranks) else None
    return state["rng"] if rank == 0 else None  # saved before every rank's state was kept


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


def build_model(config: TrainConfig, *, num_classes: int,
                source: finetune.Source | None = None) -> tuple[nn.Module, str]:
    init = config.resolved_init()
    model = vgg.build(config.cfg, num_classes=num_classes, batch_norm=config.batch_norm,
                      dropout=config.dropout, init=init, fc_width=config.fc_width)
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


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    """Seed of the DataLoader workers' RNGs for one epoch: a function of (seed, epoch, rank)
    only, so a resumed run's workers draw the same augmentations as an uninterrupted run's."""
    return (seed * 1_000_003 + epoch) * 1_009 + rank


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
    train_set = datasets.ImageDataset(splits.train, TrainPreset(
        scale_range=config.scale_range, crop=config.crop, stats=stats, pca_std=config.pca_std, augment=config.augment))
    # The same sampler in one process or many: the global batch is the same set of images.
    sampler = DistributedSampler(train_set, num_replicas=runtime.world_size, rank=runtime.rank,
                                 shuffle=True, seed=config.seed)
    # Training workers start afresh each epoch from a generator seeded by (seed, epoch, rank).
    # With no workers the augmentations use the main process's RNG, saved in last.pt.
    generator = torch.Generator() if workers > 0 else None
    train_loader = DataLoader(train_set, batch_size=config.batch_size // runtime.world_size, sampler=sampler,
                              collate_fn=datasets.collate_skipping, num_workers=workers, pin_memory=pin,
                              generator=generator)
    val_set = datasets.ImageDataset(splits.val, EvalPreset(test_scale=config.test_scale, stats=stats))
    val_loader = DataLoader(val_set, batch_size=max(1, config.batch_size // 5), collate_fn=datasets.collate_skipping,
                            num_workers=workers, pin_memory=pin, persistent_workers=workers > 0)
    dense_loader = None
    if config.eval_dense:
        scales = multi_scale_test_scales(config.scale_range, config.crop)
        dense_set = datasets.ImageDataset(splits.val, DensePreset(scales=scales, stats=stats))
        dense_loader = datasets.ReportingLoader(
            DataLoader(dense_set, batch_size=8, collate_fn=datasets.collate_lists, num_workers=workers))
    return Loaders(sampler=sampler, train=datasets.ReportingLoader(train_loader), val=datasets.ReportingLoader(val_loader),
                   dense=dense_loader, worker_generator=generator)


# ----------------------------------------------------------------------------- run directory


METRIC_COLUMNS = ("epoch", "lr", "train_loss", "train_top1_err", "center_top1_err", "center_top5_err",
                  "five_top1_err", "five_top5_err", "dense_top1_err", "dense_top5_err", "seconds")


def write_metrics(history: list[dict[str, Any]], out: Path) -> None:
    with open(out / "metrics.csv", "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=METRIC_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(history)


def plot_history(history: list[dict[str, Any]], path: Path) -> None:
    """Loss, top-1 error and learning rate per epoch, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [row["epoch"] for row in history]
    figure, (loss_axis, error_axis, lr_axis) = plt.subplots(1, 3, figsize=(13, 3.6))
    loss_axis.plot(epochs, [row["train_loss"] for row in history], marker="o")
    loss_axis.set(title="training loss", xlabel="epoch")
    for key, label in (("train_top1_err", "train"), ("center_top1_err", "val centre crop"), ("five_top1_err", "val FiveCrop")):
        error_axis.plot(epochs, [row[key] for row in history], marker="o", label=label)
    if history and history[0].get("dense_top1_err") not in (None, ""):
        error_axis.plot(epochs, [row["dense_top1_err"] for row in history], marker="o", label="val dense")
    error_axis.set(title="top-1 error", xlabel="epoch")
    error_axis.legend()
    lr_axis.plot(epochs, [row["lr"] for row in history], marker="o")
    lr_axis.set(title="learning rate", xlabel="epoch", yscale="log")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def checkpoint_dict(*, config: TrainConfig, model: nn.Module, optimizer, rule: PlateauState, epoch: int,
                    classes: list[str], stats: Stats, history: list[dict[str, Any]], init: str,
                    rng_states: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """The schema of :mod:`vgg.checkpoint`, plus the resume state; ``rng_states``: every rank's
    RNG state in rank order (:func:`gather_rng_states`), default this process's."""
    last = history[-1]
    rng_states = rng_states or [rng_state()]
    return {
        "format": CHECKPOINT_FORMAT,
        "arch": {"cfg": config.cfg, "batch_norm": config.batch_norm, "num_classes": len(classes),
                 "dropout": config.dropout, "fc_width": config.fc_width},
        "model": {key: value.detach().cpu().contiguous() for key, value in model.state_dict().items()},
        "classes": list(classes),
        "preprocess": {**dataclasses.asdict(stats), "crop": config.crop, "test_scale": config.test_scale},
        "metrics": {"epoch": epoch, "val_top1": 1 - last["five_top1_err"], "val_top5": 1 - last["five_top5_err"],
                    "center_top1": 1 - last["center_top1_err"], "center_top5": 1 - last["center_top5_err"],
                    "train_loss": last["train_loss"]},
        "config": {**config.to_dict(), "init_used": init},
        "optimizer": optimizer.state_dict(),
        "lr_rule": rule.to_dict(),
        "epoch": epoch,
        "rng": rng_states[0],
        "rng_ranks": rng_states,
        "history": history,
    }


def default_out(cfg: str) -> Path:
    return Path("runs") / f"{cfg}-{time.strftime('%Y%m%d-%H%M%S')}"


# ----------------------------------------------------------------------------- main


def main(args: argparse.Namespace) -> int:
    runtime = setup_runtime(getattr(args, "device", "auto"))
    if not runtime.is_main:
        logging.getLogger().setLevel(logging.WARNING)
    resume_state = None
    if args.resume:
        if getattr(args, "out", None) is None:
            raise UsageError("--resume needs --out DIR (the run to continue)")
        resume_state = load_checkpoint(Path(args.out) / "last.pt")
        check_resume_state(resume_state, Path(args.out) / "last.pt")
        config = resumed_config(resume_state["config"], args)
        demo = config.data is not None and Path(config.data) == demo_data_dir()
        log.info("resuming %s after epoch %d with its saved configuration", args.out, resume_state["epoch"])
    else:
        config, demo = config_from_args(args)
        config = resolve_data(config)
    source = None
    if config.finetune_from is not None and resume_state is None:
        source = finetune.load_source(config.finetune_from)
        config = finetune.configure(config, source, given=set(vars(args)))
    validate(config, world_size=runtime.world_size)
    out = Path(config.out) if config.out else default_out(config.cfg)
    config = dataclasses.replace(config, out=str(out))

    splits = datasets.folder_splits(Path(config.data), val_split=config.val_split, seed=config.seed)
    if not splits.val:
        raise UsageError(f"{config.data}: no validation images (add val/ or more images per class)")
    if demo:
        log.info("DEMO: %s", DEMO_HINT)
    stats = Stats(**{k: resume_state["preprocess"][k] for k in STATS_KEYS}) \
        if resume_state else compute_stats(config, splits.train)
    if source is not None:
        stats = finetune.source_stats(stats, source)

    seed_everything(config.seed + runtime.rank)
    model, init = build_model(config, num_classes=len(splits.classes), source=source)
    model.to(runtime.device)
    channels_last = runtime.device.type == "cuda"
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(model, config)  # only the parameters that train (requires_grad)
    rule, start_epoch, history = PlateauState(lr=config.lr), 1, []
    if resume_state is not None:
        rule, start_epoch, history, init = restore(resume_state, model=model, optimizer=optimizer, init=init,
                                                   path=Path(config.out) / "last.pt", rank=runtime.rank)
    train_model = nn.parallel.DistributedDataParallel(model) if runtime.distributed else model

    log.info("VGG-%s%s, %d classes, %d train / %d val images from %s", config.cfg, "-BN" if config.batch_norm else "",
             len(splits.classes), len(splits.train), len(splits.val), config.data)
    log.info("init: %s | device %s x%d (process group: %s) | amp %s | S %s crop %d Q %d | batch %d lr %g momentum %g wd %g dropout %g",
             init, runtime.device, runtime.world_size, runtime.backend, "bf16" if config.amp else "off", list(config.scale), config.crop,
             config.test_scale, config.batch_size, rule.lr, config.momentum, config.weight_decay, config.dropout)
    if runtime.is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps({**config.to_dict(), "init_used": init}, indent=2) + "\n")

    loaders = make_loaders(config, splits, stats, runtime)
    best_top1 = max((1 - row["five_top1_err"] for row in history), default=-1.0)
    for epoch in range(start_epoch, config.epochs + 1):
        for group in optimizer.param_groups:
            group["lr"] = rule.lr
        loaders.start_epoch(epoch, seed=config.seed, rank=runtime.rank)
        train = train_one_epoch(train_model, loaders.train, optimizer, device=runtime.device, amp=config.amp,
                                channels_last=channels_last, epoch=epoch, show_progress=runtime.is_main,
                                log_every=config.log_every, crop=config.crop)
        row: dict[str, Any] = {"epoch": epoch, "lr": rule.lr, "train_loss": train.loss, "train_top1_err": 1 - train.top1}
        if runtime.is_main:
            row.update(evaluate_epoch(model, loaders.val, loaders.dense, config=config, runtime=runtime,
                                      channels_last=channels_last))
        val_top1 = broadcast_float(1 - row.get("five_top1_err", 0.0), runtime)
        row["seconds"] = round(train.seconds, 1)
        history.append(row)
        rule = plateau_step(rule, val_top1=val_top1, patience=config.lr_patience, factor=config.lr_factor,
                            max_decreases=config.lr_max_decreases)
        rng_states = gather_rng_states(runtime)  # a collective: every rank takes part
        if runtime.is_main:
            log_epoch(row, train, rule)
            ckpt = checkpoint_dict(config=config, model=model, optimizer=optimizer, rule=rule, epoch=epoch,
                                   classes=splits.classes, stats=stats, history=history, init=init,
                                   rng_states=rng_states)
            save_checkpoint(ckpt, out / "last.pt")
            if val_top1 > best_top1:
                best_top1 = val_top1
                save_checkpoint(ckpt, out / "best.pt")
            write_metrics(history, out)
            plot_history(history, out / "curves.png")
        if runtime.distributed:
            dist.barrier()

    if runtime.is_main:
        log.info("done: best val top-1 %.2f%% (FiveCrop); run directory %s", 100 * best_top1, out)
        if demo:
            log.info("DEMO: %s", DEMO_HINT)
        if config.export:
            export_best(out / "best.pt")
    if runtime.distributed:
        dist.destroy_process_group()
    return 0


def restore(state: dict[str, Any], *, model: nn.Module, optimizer, init: str,
            path: Path, rank: int = 0) -> tuple[PlateauState, int, list[dict[str, Any]], str]:
    """Load the resume state of ``last.pt`` into ``model``/``optimizer`` and this rank's RNGs;
    returns the LR rule, the first epoch to run, the history and the init description. A rank
    the run did not have before keeps its fresh seed (``seed + rank``)."""
    try:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        rule = PlateauState.from_dict(state["lr_rule"])
        own = rank_rng_state(state, rank)
        if own is None:
            log.warning("rank %d: %s holds no RNG state for it (saved by fewer processes); it starts from its seed",
                        rank, path)
        else:
            set_rng_state(own)
        start_epoch, history = int(state["epoch"]) + 1, list(state["history"])
    except (KeyError, TypeError, ValueError, RuntimeError, IndexError) as error:
        raise CheckpointError(f"{path}: cannot resume from it ({one_line(error)})") from None
    return rule, start_epoch, history, state["config"].get("init_used", init)


def evaluate_epoch(model, val_loader, dense_loader, *, config: TrainConfig, runtime: Runtime,
                   channels_last: bool) -> dict[str, float]:
    accuracy = evaluate(model, val_loader, crop=config.crop, device=runtime.device, amp=config.amp,
                        channels_last=channels_last)
    if dense_loader is not None:
        accuracy.update(evaluate_dense(model, dense_loader, crop=config.crop, device=runtime.device, amp=config.amp))
    return {f"{key}_err": 1 - value for key, value in accuracy.items()}


def broadcast_float(value: float, runtime: Runtime) -> float:
    """Rank 0's value on every rank (the LR rule must agree everywhere)."""
    if not runtime.distributed:
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return float(holder[0])


def log_epoch(row: dict[str, Any], train, rule: PlateauState) -> None:
    dense = f" dense {100 * row['dense_top1_err']:.2f}/{100 * row['dense_top5_err']:.2f}" if "dense_top1_err" in row else ""
    log.info("epoch %d | lr %.0e | train loss %.4f err %.2f%% | val top-1/top-5 err: centre %.2f/%.2f FiveCrop %.2f/%.2f%s"
             " | %.0f img/s%s", row["epoch"], row["lr"], row["train_loss"], 100 * row["train_top1_err"],
             100 * row["center_top1_err"], 100 * row["center_top5_err"], 100 * row["five_top1_err"],
             100 * row["five_top5_err"], dense, train.images / max(train.seconds, 1e-9),
             f" | next lr {rule.lr:.0e}" if rule.lr != row["lr"] else "")


def export_best(best: Path) -> None:
    """Export and register ``best`` as the served model (the export package's API).

    On a machine without a GPU the export adds the int8 graph (calibrated on training images,
    checked for >= 99% top-1 agreement with fp32 on others), which the service then serves on
    the CPU; when that cannot be done the fp32 model is registered and the log says why."""
    try:
        from export import ExportError, export_checkpoint
    except ImportError as error:
        raise ExportFailed(f"cannot export: {error}; rerun with --no-export, then python -m export") from None
    precision = "fp32" if torch.cuda.is_available() else "int8"
    try:
        result = export_checkpoint(best, register=True, precision=precision, int8_optional=True)
    except ExportError as error:
        raise ExportFailed(f"export of {best} failed: {error}") from None
    log.info("exported %s (%s) -> %s, registered in BentoML as %s", best, "+".join(result.metadata["precisions"]),
             result.onnx_path, result.tag)


def cli(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    args = get_args_parser().parse_args(argv)
    try:
        return main(args)
    except (UsageError, datasets.DataError, CheckpointError, finetune.FinetuneError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except ExportFailed as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except FloatingPointError as error:
        print(f"error: training diverged ({error}); try a lower --lr", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(cli())
