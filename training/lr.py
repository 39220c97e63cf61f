"""The paper's learning-rate rule (section 3.1): divide by 10 when validation accuracy
stops improving, at most three times."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any


@dataclass(frozen=True)
class PlateauState:
    """What the rule remembers between epochs; plain numbers, so it fits a checkpoint."""

    lr: float
    best_top1: float = -1.0
    epochs_since_best: int = 0
    decreases: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> PlateauState:
        return cls(**values)


def plateau_step(
    state: PlateauState, *, val_top1: float, patience: int, factor: float = 0.1, max_decreases: int = 3
) -> PlateauState:
    """The state after an epoch that reached validation top-1 accuracy ``val_top1``.

    An epoch that beats the best accuracy so far resets the count. After ``patience``
    epochs without improvement the learning rate is multiplied by ``factor`` (and the
    count restarts), unless it has already been decreased ``max_decreases`` times.
    """
    if val_top1 > state.best_top1:
        return replace(state, best_top1=val_top1, epochs_since_best=0)
    waited = state.epochs_since_best + 1
    if waited >= patience and state.decreases < max_decreases:
        return replace(state, lr=state.lr * factor, epochs_since_best=0, decreases=state.decreases + 1)
    return replace(state, epochs_since_best=waited)
