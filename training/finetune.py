"""Fine-tuning from trained weights: ``python -m training.run --finetune-from FILE``.

FILE is a checkpoint of this project or a VGG state dict in torchvision's layout (``.pth``/``.pt``
or ``.safetensors``, see :func:`vgg.checkpoint.load_any`). The new net starts from every tensor
of the source whose key and shape fit: all conv layers (and their BatchNorm) and the two hidden
FC layers; the last FC layer too when the class count is the same, else it is initialised afresh.

Defaults of a fine-tune (each overridden by its flag):

- the source's configuration, BatchNorm and FC width (a different ``--cfg`` is an error: the
  paper's pre-initialisation of a deeper net from A is ``--init-from``);
- learning rate 1e-3, the paper's value for the S = 384 net initialised from the S = 256 net
  (section 3.1);
- the source's normalisation mean and std (its first conv was trained on them); the colour
  shift's PCA is computed on the new training data.

``--freeze-features`` trains only the FC layers: the conv stack keeps the source's weights and,
with BatchNorm, its running statistics.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from training.config import TrainConfig
from training.transforms import Stats
from vgg.checkpoint import CheckpointError, load_any

__all__ = [
    "FINETUNE_LR",
    "FinetuneError",
    "Source",
    "load_source",
    "configure",
    "copy_weights",
    "freeze_features",
    "source_stats",
]

log = logging.getLogger(__name__)

FINETUNE_LR = 1e-3  # section 3.1: the S = 384 net, initialised from S = 256, "with lr 1e-3"
# (TrainConfig field, flag, arch key): what the fine-tuned net inherits from the source.
INHERITED = (
    ("cfg", "--cfg", "cfg"),
    ("batch_norm", "--batch-norm", "batch_norm"),
    ("fc_width", "--fc-width", "fc_width"),
)


class FinetuneError(ValueError):
    """A fine-tune that cannot start (one line, exit code 2)."""


@dataclass(frozen=True)
class Source:
    """The weights a fine-tune starts from."""

    path: str
    arch: dict[str, Any]
    state: dict[str, torch.Tensor]
    mean: list[float]
    std: list[float]

    @property
    def name(self) -> str:
        return f"VGG-{self.arch['cfg']}{' with BatchNorm' if self.arch['batch_norm'] else ''}"


def load_source(path: str) -> Source:
    """Read ``path`` (checkpoint or state dict); :class:`FinetuneError` with a one-line reason if unusable."""
    try:
        checkpoint = load_any(path, need_names=False)
    except CheckpointError as error:
        raise FinetuneError(f"--finetune-from {error}") from None
    arch, preprocess = checkpoint["arch"], checkpoint["preprocess"]
    try:
        return Source(
            path=str(path),
            arch=dict(arch),
            state=checkpoint["model"],
            mean=[float(v) for v in preprocess["mean"]],
            std=[float(v) for v in preprocess["std"]],
        )
    except (KeyError, TypeError, ValueError) as error:
        raise FinetuneError(f"--finetune-from {path}: malformed checkpoint ({type(error).__name__}: {error})") from None


def configure(config: TrainConfig, source: Source, *, given: set[str]) -> TrainConfig:
    """``config`` with the fine-tune's defaults for everything not in ``given`` (flags set by the user).

    Raises :class:`FinetuneError` when a given architecture flag contradicts the source.
    """
    if config.init_from is not None:
        raise FinetuneError("give --finetune-from or --init-from, not both")
    changes: dict[str, Any] = {}
    for field, flag, key in INHERITED:
        value = source.arch.get(key)
        if field in given and getattr(config, field) != value:
            hint = " (to pre-initialise a deeper net from VGG-A, use --init-from)" if field == "cfg" else ""
            raise FinetuneError(
                f"--finetune-from {source.path} is {source.name} (fc width {source.arch.get('fc_width')}), "
                f"which does not match {flag} {getattr(config, field)}{hint}"
            )
        changes[field] = value
    if "lr" not in given:
        changes["lr"] = FINETUNE_LR
    return dataclasses.replace(config, **changes)


def source_stats(stats: Stats, source: Source) -> Stats:
    """``stats`` of the new data with the source's mean and std (the first conv was trained on them)."""
    return dataclasses.replace(stats, mean=list(source.mean), std=list(source.std))


@torch.no_grad()
def copy_weights(model: nn.Module, source: Source) -> tuple[list[str], list[str]]:
    """Copy every tensor of ``source`` whose key and shape fit into ``model``, in place.

    Returns ``(copied, not_copied)`` state-dict keys of ``model``; the keys not copied keep
    ``model``'s own initialisation. Both lists are logged.
    """
    copied, not_copied = [], []
    for key, tensor in model.state_dict().items():
        value = source.state.get(key)
        if isinstance(value, torch.Tensor) and value.shape == tensor.shape:
            tensor.copy_(value)
            copied.append(key)
        else:
            not_copied.append(key)
    log.info("fine-tune from %s (%s): copied %d tensors: %s", source.path, source.name, len(copied), ", ".join(copied))
    log.info("not copied (initialised afresh): %s", ", ".join(not_copied) if not_copied else "none")
    return copied, not_copied


def _stay_in_eval(module: nn.Module, mode: bool = True) -> nn.Module:
    return nn.Module.train(module, False)


def freeze_features(model: nn.Module) -> None:
    """Train only the FC layers: the conv stack's parameters get no gradient and its
    BatchNorm layers stay in eval mode (running statistics fixed) even under ``model.train()``."""
    features = model.features
    for parameter in features.parameters():
        parameter.requires_grad_(False)
    features.train = _stay_in_eval.__get__(features)  # model.train() calls each child's train()
    features.eval()
    log.info(
        "--freeze-features: training only the FC layers (%d conv-stack tensors frozen)",
        sum(1 for _ in features.parameters()),
    )
