"""The random number generators of a training run: seeding, and their state in ``last.pt``.

A resumed run continues with the RNG states the interrupted one saved, so it draws the same
augmentations and dropout masks; DataLoader workers are reseeded each epoch from
:func:`epoch_seed`.
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as dist

if TYPE_CHECKING:
    from training.distributed import Runtime

__all__ = ["epoch_seed", "gather_rng_states", "rank_rng_state", "rng_state", "seed_everything", "set_rng_state"]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    """Seed of the DataLoader workers' RNGs for one epoch: a function of (seed, epoch, rank)
    only, so a resumed run's workers draw the same augmentations as an uninterrupted run's."""
    return (seed * 1_000_003 + epoch) * 1_009 + rank


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
    """Restore what :func:`rng_state` saved."""
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
