"""One training epoch and the validation passes (paper, sections 3.1 and 3.2)."""

from __future__ import annotations

import contextlib
import logging
import math
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from vgg import protocols, to_dense

log = logging.getLogger(__name__)

SYNC_EVERY = 10  # steps between reading the running loss back from the device
VALIDATION_PROTOCOLS = ("center", "five")  # per-epoch validation; "five" picks the best epoch


@dataclass(frozen=True)
class EpochStats:
    loss: float
    top1: float  # training accuracy on the augmented crops
    images: int
    seconds: float


def autocast(device: torch.device, enabled: bool):
    """bf16 autocast on CUDA or CPU, or nothing."""
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def progress_bar(iterable, *, total: int, description: str, enabled: bool):
    return tqdm(
        iterable,
        total=total,
        desc=description,
        leave=False,
        dynamic_ncols=True,
        disable=not (enabled and sys.stderr.isatty()),
    )


def parameter_groups(model: nn.Module, *, weight_decay: float, decay_bias: bool) -> list[dict]:
    """SGD parameter groups: one with ``weight_decay`` on every parameter, or (``decay_bias``
    False) the weights in it and the biases and normalisation parameters (1-D tensors) in a
    second group without weight decay."""
    parameters = [parameter for parameter in model.parameters() if parameter.requires_grad]
    if decay_bias:
        return [{"params": parameters, "weight_decay": weight_decay}]
    return [
        {"params": [p for p in parameters if p.ndim > 1], "weight_decay": weight_decay},
        {"params": [p for p in parameters if p.ndim <= 1], "weight_decay": 0.0},
    ]


def make_optimizer(model: nn.Module, config) -> torch.optim.SGD:
    """Section 3.1's optimiser: SGD with momentum and weight decay (a :class:`TrainConfig`'s)."""
    groups = parameter_groups(model, weight_decay=config.weight_decay, decay_bias=config.decay_bias)
    return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)


def train_one_epoch(
    model: nn.Module,
    loader,
    optimizer: torch.optim.Optimizer,
    *,
    device: torch.device,
    amp: bool,
    channels_last: bool,
    epoch: int,
    show_progress: bool = True,
    log_every: int = 0,
    crop: int | None = None,
) -> EpochStats:
    """One pass over ``loader`` with mini-batch SGD; returns the mean loss and accuracy
    (summed over all ranks when distributed).

    Under DDP, a batch whose files were all unreadable (``None``) still takes part in the
    gradient all-reduce with a zero-loss step (:func:`_zero_step`, needs ``crop``), so the
    other ranks do not wait for it forever and every rank applies the same update.
    """
    model.train()
    start = time.perf_counter()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.float64, device=device)
    seen = torch.zeros((), dtype=torch.float64, device=device)
    bar = progress_bar(loader, total=len(loader), description=f"epoch {epoch}", enabled=show_progress)
    distributed = isinstance(model, nn.parallel.DistributedDataParallel)
    for step, batch in enumerate(bar, start=1):
        if batch is None:
            if distributed:
                _zero_step(model, optimizer, device=device, crop=crop)
            continue
        images, labels = batch
        images = images.to(device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        labels = labels.to(device, non_blocking=True)
        with autocast(device, amp):
            logits = model(images)
            loss = F.cross_entropy(logits, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss_sum += loss.detach().double() * len(labels)
        correct += (logits.argmax(1) == labels).sum().double()
        seen += len(labels)
        if step % SYNC_EVERY == 0 or step == len(loader) or (log_every and step % log_every == 0):
            running_loss = (loss_sum / seen).item()  # a device sync: not every step
            if not math.isfinite(running_loss):
                raise FloatingPointError(f"training loss is {running_loss} at epoch {epoch} step {step}")
            bar.set_postfix(loss=f"{running_loss:.4f}", acc=f"{(correct / seen).item():.3f}")
            if log_every and step % log_every == 0:
                log.info("epoch %d step %d/%d loss %.4f", epoch, step, len(loader), running_loss)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        for total in (loss_sum, correct, seen):
            torch.distributed.all_reduce(total)
    images_seen = int(seen.item())
    return EpochStats(
        loss=(loss_sum / max(images_seen, 1)).item(),
        top1=(correct / max(images_seen, 1)).item(),
        images=images_seen,
        seconds=time.perf_counter() - start,
    )


def _zero_step(model: nn.Module, optimizer: torch.optim.Optimizer, *, device: torch.device, crop: int | None) -> None:
    """A DDP step contributing zero gradients: one black image through the model in eval mode
    (no BatchNorm statistics or dropout draws), ``0 * output`` backward (the all-reduce runs),
    then the optimizer step every rank takes with the averaged gradients."""
    if crop is None:
        raise RuntimeError(
            "a DDP rank got a batch of only unreadable images; train_one_epoch needs crop= to join the step"
        )
    model.eval()
    try:
        dummy = torch.zeros(1, 3, crop, crop, device=device)
        optimizer.zero_grad(set_to_none=True)
        (model(dummy).float().sum() * 0.0).backward()
        optimizer.step()
    finally:
        model.train()


def topk_correct(probabilities: torch.Tensor, labels: torch.Tensor, k: int) -> int:
    k = min(k, probabilities.shape[1])
    return int((probabilities.topk(k, dim=1).indices == labels[:, None]).any(dim=1).sum())


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader,
    *,
    crop: int,
    device: torch.device,
    amp: bool,
    channels_last: bool,
    show_progress: bool = True,
) -> dict[str, float]:
    """Top-1/top-5 accuracy of the ``center`` and ``five`` protocols (:mod:`vgg.protocols`;
    ``five`` is the TTA the service runs) from one forward pass of the five crops. The loader
    yields normalised ``Q x Q`` squares ``[N, 3, Q, Q]`` and labels."""
    model.eval()
    network = network_fn(model, device=device, amp=amp, channels_last=channels_last)
    counts = {f"{name}_top{k}": 0 for name in VALIDATION_PROTOCOLS for k in (1, 5)}
    total = 0
    for batch in progress_bar(loader, total=len(loader), description="val", enabled=show_progress):
        if batch is None:
            continue
        squares, labels = batch
        posteriors = protocols.crop_posteriors(network, squares.to(device), VALIDATION_PROTOCOLS, crop)
        for name, probs in posteriors.items():
            counts[f"{name}_top1"] += topk_correct(probs.cpu(), labels, 1)
            counts[f"{name}_top5"] += topk_correct(probs.cpu(), labels, 5)
        total += len(labels)
    return {key: value / max(total, 1) for key, value in counts.items()}


def network_fn(model: nn.Module, *, device: torch.device, amp: bool, channels_last: bool):
    """``model`` as a function of a batch of views: channels-last and bf16 autocast as asked."""

    def forward(images: torch.Tensor) -> torch.Tensor:
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast(device, amp):
            return model(images).float()

    return forward


@torch.no_grad()
def dense_probabilities(
    dense: nn.Module, views: list[torch.Tensor], *, device: torch.device, amp: bool
) -> torch.Tensor:
    """Section 3.2 for one image: the ``dense`` protocol (:mod:`vgg.protocols`) at each
    scale's whole image ``[3, H, W]``, averaged over the scales: ``[1, classes]``."""
    network = network_fn(dense, device=device, amp=amp, channels_last=False)
    return protocols.mean_posterior(
        [protocols.dense_posterior(network, image.unsqueeze(0).to(device)).cpu() for image in views]
    )


@torch.no_grad()
def evaluate_dense(model: nn.Module, loader, *, crop: int, device: torch.device, amp: bool) -> dict[str, float]:
    """Section 3.2: the FC layers as convolutions on the whole image at each scale Q, class
    scores averaged spatially, softmax averaged over scales and horizontal flips."""
    dense = to_dense(model, crop=crop).eval()
    correct1 = correct5 = total = 0
    for batch in loader:
        if batch is None:
            continue
        for views, label in batch:
            mean = dense_probabilities(dense, views, device=device, amp=amp)
            correct1 += topk_correct(mean, torch.tensor([label]), 1)
            correct5 += topk_correct(mean, torch.tensor([label]), 5)
            total += 1
    return {"dense_top1": correct1 / max(total, 1), "dense_top5": correct5 / max(total, 1)}
