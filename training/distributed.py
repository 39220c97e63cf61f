"""Where a training process runs: its device, and the DDP process group torchrun asks for.

``torchrun --nproc-per-node N -m training.run ...`` sets ``WORLD_SIZE``, ``RANK`` and
``LOCAL_RANK``; each process then trains on ``cuda:LOCAL_RANK`` (nccl) or the CPU (gloo).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from training.config import UsageError

__all__ = ["PROCESS_GROUP_TIMEOUT", "Runtime", "broadcast_float", "resolve_device", "setup_runtime"]

# Rank 0 evaluates (``--eval-dense`` can take long) while the others wait in a collective:
# far above the default 10 min (nccl) / 30 min (gloo) process-group timeout.
PROCESS_GROUP_TIMEOUT = timedelta(hours=6)


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


def _local_gpu() -> torch.device:
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if local_rank >= torch.cuda.device_count():
        raise UsageError(
            f"process with LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} visible GPU(s): "
            "start at most one process per GPU (torchrun --nproc-per-node), or train with --device cpu"
        )
    return torch.device("cuda", local_rank)


def setup_runtime(device_name: str) -> Runtime:
    """Device auto-selection; process group from torchrun's environment variables."""
    launched = "WORLD_SIZE" in os.environ  # torchrun sets it, also for --nproc-per-node 1
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    device = resolve_device(device_name)
    if device.type == "cuda" and launched:
        device = _local_gpu()
    if device.type == "cuda":
        if device.index is None:  # plain "cuda": the current device, by its index
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
    if launched and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", timeout=PROCESS_GROUP_TIMEOUT)
    return Runtime(device=device, rank=rank, world_size=world_size, launched=launched)


def broadcast_float(value: float, runtime: Runtime) -> float:
    """Rank 0's value on every rank (the LR rule must agree everywhere)."""
    if not runtime.distributed:
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return float(holder[0])
