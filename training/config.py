"""The training recipe as one dataclass; every default is the paper's (section 3.1 unless noted).

"The batch size was set to 256, momentum to 0.9. The training was regularised by weight
decay (the L2 penalty multiplier set to 5e-4) and dropout regularisation for the first two
fully-connected layers (dropout ratio set to 0.5). The learning rate was initially set to
1e-2, and then decreased by a factor of 10 when the validation set accuracy stopped
improving. In total, the learning rate was decreased 3 times, and the learning was stopped
after 370K iterations (74 epochs)."
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from vgg.model import FC_WIDTH
from vgg.preprocessing import MAX_SCALE, MIN_CROP

MAX_FC_WIDTH = 16384  # 4x the paper's 4096: the first FC layer alone is then 1.6 GB of fp32 weights
FLOAT_FLAGS = ("dropout", "momentum", "weight_decay", "lr", "lr_factor", "pca_std", "val_split")
# Configuration keys of runs saved before the test scale Q had one name.
_RENAMED_KEYS = {"eval_scale": "test_scale_override"}


class UsageError(ValueError):
    """A configuration that cannot run (a bad flag found after parsing); one line, exit code 2."""


@dataclass(frozen=True)
class TrainConfig:
    # -- model (Table 1) --
    cfg: str = "D"  # the paper's 16-layer configuration D
    batch_norm: bool = False  # the paper has no BatchNorm (it predates it)
    fc_width: int = FC_WIDTH  # section 2.1: FC layers of 4096 channels
    dropout: float = 0.5  # section 3.1: dropout 0.5 on the first two FC layers
    # None = the paper's choice: "paper" (N(0, 1e-2)) for A / A-LRN or with init_from (and for the
    # layers a fine-tune does not copy),
    # "glorot" for deeper nets from scratch (section 3.1, final paragraph on initialisation).
    init: str | None = None
    init_from: str | None = None  # section 3.1: deeper nets start from a trained net A
    # Fine-tune (training/finetune.py): start from a trained net's weights (checkpoint or state dict).
    finetune_from: str | None = None
    freeze_features: bool = False  # with finetune_from: train only the FC layers
    # -- optimiser (section 3.1) --
    batch_size: int = 256  # "the batch size was set to 256"
    momentum: float = 0.9  # "momentum to 0.9"
    weight_decay: float = 5e-4  # "L2 penalty multiplier set to 5e-4"
    # The paper does not say whether biases are decayed; by default every parameter is (biases
    # and BatchNorm's scale and shift too). False: those in a group without weight decay.
    decay_bias: bool = True
    lr: float = 1e-2  # "the learning rate was initially set to 1e-2"
    lr_factor: float = 0.1  # "decreased by a factor of 10"
    lr_patience: int = 2  # epochs without improvement before a decrease (the paper does not say)
    lr_max_decreases: int = 3  # "the learning rate was decreased 3 times"
    epochs: int = 74  # "stopped after 370K iterations (74 epochs)"
    # -- training images (section 3.1, "Training image size") --
    scale: tuple[int, ...] = (256,)  # S: fixed 256 (or 384), or jittered [Smin, Smax] = [256, 512]
    crop: int = 224  # "a fixed-size 224x224 RGB image"
    augment: bool = True  # random crop, horizontal flip and RGB colour shift (AlexNet's)
    pca_std: float = 0.1  # AlexNet's colour shift: alpha ~ N(0, 0.1) per image and component
    stats_images: int = 1000  # training images sampled for the mean/std/PCA statistics
    # -- evaluation (section 3.2) --
    # Single-scale test Q (section 4.1) as given by --test-scale; None: the paper's Q = S, or
    # (Smin + Smax) / 2 for jittered S (see test_scale). The served graph and the centre/FiveCrop
    # validation use it.
    test_scale_override: int | None = None
    eval_dense: bool = False  # dense multi-scale evaluation, Q in {S-32, S, S+32} with flips
    # -- data --
    data: str | None = None  # ImageNet-style folder with train/ and optional val/
    dataset: str | None = None  # cifar10 | stl10 | imagenette (torchvision downloaders)
    val_split: float = 0.1  # fraction of train/ held out when there is no val/
    # -- running --
    seed: int = 0
    amp: bool = False  # bf16 autocast (the paper trained in fp32)
    workers: int | None = None  # DataLoader workers; None: 0 on CPU, min(8, cores) on GPU
    device: str = "auto"  # CUDA if present, else CPU
    out: str | None = None  # run directory; default runs/<cfg>-<timestamp>
    log_every: int = 0  # also log every N training steps (0: only per epoch)
    export: bool = True  # export best.pt to ONNX and register it in BentoML at the end

    @property
    def scale_range(self) -> tuple[int, int]:
        """(Smin, Smax); equal for a fixed training scale."""
        return (self.scale[0], self.scale[-1])

    @property
    def test_scale(self) -> int:
        """Single-scale test Q (section 4.1): ``--test-scale`` if given, else Q = S, or
        0.5 (Smin + Smax) for jittered S."""
        if self.test_scale_override is not None:
            return self.test_scale_override
        smin, smax = self.scale_range
        return (smin + smax) // 2

    def resolved_init(self) -> str:
        """The paper's initialisation when none is asked for (section 3.1)."""
        if self.init is not None:
            return self.init
        if self.init_from is not None or self.finetune_from is not None or self.cfg in ("A", "A-LRN"):
            return "paper"
        return "glorot"

    def to_dict(self) -> dict[str, Any]:
        """Plain types only (lists, not tuples), for config.json and the checkpoint."""
        return {key: list(value) if isinstance(value, tuple) else value for key, value in asdict(self).items()}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        values = {_RENAMED_KEYS.get(key, key): value for key, value in values.items()}
        kwargs = {key: value for key, value in values.items() if key in known}
        if "scale" in kwargs:
            kwargs["scale"] = tuple(kwargs["scale"])
        return cls(**kwargs)


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
        raise UsageError(
            f"need {MIN_CROP} <= --crop <= S <= {MAX_SCALE}, got crop {config.crop} and S {list(config.scale)}"
        )
    if not config.crop <= config.test_scale <= MAX_SCALE:
        raise UsageError(
            f"need --crop <= --test-scale Q <= {MAX_SCALE}, got Q {config.test_scale} and crop {config.crop}"
        )
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
    for flag, value in (
        ("--momentum", config.momentum),
        ("--weight-decay", config.weight_decay),
        ("--pca-std", config.pca_std),
        ("--lr-patience", config.lr_patience),
        ("--lr-max-decreases", config.lr_max_decreases),
    ):
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
