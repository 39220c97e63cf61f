"""A run's per-epoch record: the rows kept in ``last.pt``, ``metrics.csv``, ``curves.png`` and the log.

Every quality figure is an accuracy, a fraction in 0..1, from evaluation to the CSV, the
checkpoint's ``metrics`` and the log (which shows it in percent): top-1 and top-5 of the
single centre crop, of FiveCrop (the test-time augmentation the service runs) and of dense
evaluation, and the training top-1 on the augmented crops.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

__all__ = ["METRIC_COLUMNS", "SELECTION_KEY", "epoch_line", "plot_history", "upgrade_row", "write_metrics"]

METRIC_COLUMNS = (
    "epoch",
    "lr",
    "train_loss",
    "train_top1",
    "center_top1",
    "center_top5",
    "five_top1",
    "five_top5",
    "dense_top1",
    "dense_top5",
    "seconds",
)
SELECTION_KEY = "five_top1"  # chooses best.pt and drives the LR rule: FiveCrop top-1, the served TTA


def upgrade_row(row: dict[str, Any]) -> dict[str, Any]:
    """A history row as this version writes it: runs saved by earlier versions kept top-1/top-5
    errors (``five_top1_err``); they become accuracies (``five_top1``)."""
    upgraded = {}
    for key, value in row.items():
        if key.endswith("_err") and isinstance(value, (int, float)):
            upgraded[key.removesuffix("_err")] = 1.0 - value
        else:
            upgraded[key] = value
    return upgraded


def write_metrics(history: list[dict[str, Any]], out: Path) -> None:
    with open(out / "metrics.csv", "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=METRIC_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(history)


def plot_history(history: list[dict[str, Any]], path: Path) -> None:
    """Loss, top-1 accuracy and learning rate per epoch, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [row["epoch"] for row in history]
    figure, (loss_axis, accuracy_axis, lr_axis) = plt.subplots(1, 3, figsize=(13, 3.6))
    loss_axis.plot(epochs, [row["train_loss"] for row in history], marker="o")
    loss_axis.set(title="training loss", xlabel="epoch")
    curves = [("train_top1", "train"), ("center_top1", "val centre crop"), ("five_top1", "val FiveCrop")]
    if history and history[0].get("dense_top1") not in (None, ""):
        curves.append(("dense_top1", "val dense"))
    for key, label in curves:
        accuracy_axis.plot(epochs, [row[key] for row in history], marker="o", label=label)
    accuracy_axis.set(title="top-1 accuracy", xlabel="epoch")
    accuracy_axis.legend()
    lr_axis.plot(epochs, [row["lr"] for row in history], marker="o")
    lr_axis.set(title="learning rate", xlabel="epoch", yscale="log")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def epoch_line(row: dict[str, Any], *, images_per_s: float, next_lr: float) -> str:
    """One log line for an epoch's row (accuracies in percent)."""
    dense = f" dense {100 * row['dense_top1']:.2f}/{100 * row['dense_top5']:.2f}" if "dense_top1" in row else ""
    changed = f" | next lr {next_lr:.0e}" if next_lr != row["lr"] else ""
    return (
        f"epoch {row['epoch']} | lr {row['lr']:.0e} | train loss {row['train_loss']:.4f} "
        f"top-1 {100 * row['train_top1']:.2f}% | val top-1/top-5 accuracy (%): centre "
        f"{100 * row['center_top1']:.2f}/{100 * row['center_top5']:.2f} FiveCrop "
        f"{100 * row['five_top1']:.2f}/{100 * row['five_top5']:.2f}{dense} | {images_per_s:.0f} img/s{changed}"
    )
