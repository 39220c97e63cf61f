"""A run's checkpoints and resuming from its ``last.pt``: what each epoch's checkpoint holds
(:func:`training_checkpoint`), what a resume needs from it, the configuration a resumed run
continues with, and the state it restores (model, optimizer, LR rule, RNGs, history)."""

from __future__ import annotations

import argparse
import dataclasses
import logging
from pathlib import Path
from typing import Any

from torch import nn

from training.config import TrainConfig
from training.history import upgrade_row
from training.lr import PlateauState
from training.rng import rank_rng_state, rng_state, set_rng_state
from training.transforms import Stats
from vgg.checkpoint import RESUME_KEYS, CheckpointError, build_checkpoint
from vgg.errors import one_line

__all__ = [
    "RESUME_OVERRIDES",
    "check_resume_state",
    "restore",
    "resumed_config",
    "saved_stats",
    "training_checkpoint",
]

log = logging.getLogger("training")

STATS_KEYS = ("mean", "std", "pca_eigval", "pca_eigvec")
# The flag of each option whose name differs from its TrainConfig field.
_FLAG_OF = {"test_scale_override": "--test-scale"}


RESUME_OVERRIDES = ("epochs", "export", "workers", "log_every", "device")


def resumed_config(saved: dict[str, Any], args: argparse.Namespace) -> TrainConfig:
    """The saved configuration of a run; only how long and where it runs may change. It
    continues in ``--out`` (where its last.pt was read), even if the run was moved there."""
    given = {key: value for key, value in vars(args).items() if key not in ("resume", "verbose", "out")}
    ignored = sorted(set(given) - set(RESUME_OVERRIDES))
    if ignored:
        log.warning(
            "--resume keeps the saved recipe; ignoring %s",
            ", ".join(_FLAG_OF.get(k, f"--{k.replace('_', '-')}") for k in ignored),
        )
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


def saved_stats(state: dict[str, Any]) -> Stats:
    """The training-set statistics a checked resume state carries."""
    return Stats(**{key: state["preprocess"][key] for key in STATS_KEYS})


def restore(
    state: dict[str, Any], *, model: nn.Module, optimizer, init: str, path: Path, rank: int = 0
) -> tuple[PlateauState, int, list[dict[str, Any]], str]:
    """Load the resume state of ``last.pt`` into ``model``/``optimizer`` and this rank's RNGs;
    returns the LR rule, the first epoch to run, the history and the init description. A rank
    the run did not have before keeps its fresh seed (``seed + rank``)."""
    try:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        rule = PlateauState.from_dict(state["lr_rule"])
        own = rank_rng_state(state, rank)
        if own is None:
            log.warning(
                "rank %d: %s holds no RNG state for it (saved by fewer processes); it starts from its seed", rank, path
            )
        else:
            set_rng_state(own)
        start_epoch, history = int(state["epoch"]) + 1, [upgrade_row(row) for row in state["history"]]
    except (KeyError, TypeError, ValueError, RuntimeError, IndexError, AttributeError) as error:
        raise CheckpointError(f"{path}: cannot resume from it ({one_line(error)})") from None
    return rule, start_epoch, history, state["config"].get("init_used", init)


def training_checkpoint(
    *,
    config: TrainConfig,
    model: nn.Module,
    optimizer,
    rule: PlateauState,
    epoch: int,
    classes: list[str],
    stats: Stats,
    history: list[dict[str, Any]],
    init: str,
    rng_states: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """The checkpoint after ``epoch`` (:func:`vgg.checkpoint.build_checkpoint`), with the resume state;
    ``rng_states``: every rank's RNG state in rank order (:func:`training.rng.gather_rng_states`),
    default this process's."""
    last = history[-1]
    rng_states = rng_states or [rng_state()]
    return build_checkpoint(
        model,
        arch={
            "cfg": config.cfg,
            "batch_norm": config.batch_norm,
            "num_classes": len(classes),
            "dropout": config.dropout,
            "fc_width": config.fc_width,
        },
        classes=classes,
        preprocess={**dataclasses.asdict(stats), "crop": config.crop, "test_scale": config.test_scale},
        metrics={
            "epoch": epoch,
            "val_top1": last["five_top1"],
            "val_top5": last["five_top5"],
            "center_top1": last["center_top1"],
            "center_top5": last["center_top5"],
            "train_loss": last["train_loss"],
        },
        config={**config.to_dict(), "init_used": init},
        resume={
            "optimizer": optimizer.state_dict(),
            "lr_rule": rule.to_dict(),
            "epoch": epoch,
            "rng": rng_states[0],
            "rng_ranks": rng_states,
            "history": history,
        },
    )
