"""``python -m training.run --cfg D``: train a VGG with the paper's recipe (section 3.1),
validate every epoch (section 3.2), checkpoint, and export the best model for serving.

Without ``--data``/``--dataset`` it trains on the generated demo data set. Several
processes: ``torchrun --nproc-per-node N -m training.run ...`` (DDP; nccl on GPU, gloo on CPU).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

import vgg
from training import data as datasets
from training import finetune
from training.config import TrainConfig, UsageError, validate
from training.demo import DEMO_OVERRIDES, cpu_has_bf16, demo_data_dir
from training.distributed import Runtime, broadcast_float, setup_runtime
from training.epoch import evaluate, evaluate_dense, train_one_epoch
from training.history import SELECTION_KEY, epoch_line, plot_history, write_metrics
from training.loaders import Loaders, make_loaders
from training.lr import plateau_step
from training.publish import ExportFailed, export_best
from training.resume import check_resume_state, resumed_config, saved_stats, training_checkpoint
from training.rng import gather_rng_states
from training.setup import Training, compute_stats, resolve_data, start_training
from vgg.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from vgg.errors import OneLineArgumentParser

log = logging.getLogger("training")

INITS = ("paper", "glorot", "kaiming")
DEMO_HINT = (
    "trained on the built-in DEMO data (generated shapes, not real photos). To train on real data: "
    "python -m training.run --cfg D --data DIR  (DIR/train/<class>/*.jpg, optional DIR/val/<class>/)"
)


RUN_ONLY_FLAGS = ("resume", "verbose")  # how this invocation runs, not part of the recipe


# ----------------------------------------------------------------------------- arguments


def get_args_parser() -> argparse.ArgumentParser:
    """Flags map one to one onto :class:`TrainConfig` fields (defaults: the paper's values).

    Unset flags are absent from the namespace (``argparse.SUPPRESS``), so the demo's own
    geometry only fills in what the user did not choose.
    """
    d = TrainConfig()
    p = OneLineArgumentParser(
        prog="python -m training.run",
        description=__doc__.split("\n\n")[0],
        argument_default=argparse.SUPPRESS,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    model = p.add_argument_group("model (paper, Table 1)")
    model.add_argument("--cfg", choices=vgg.CONFIG_NAMES, help=f"configuration (default {d.cfg})")
    model.add_argument(
        "--batch-norm", action=argparse.BooleanOptionalAction, help="BatchNorm after each conv (not in the paper)"
    )
    model.add_argument("--fc-width", type=int, help=f"width of the two hidden FC layers (default {d.fc_width})")
    model.add_argument("--dropout", type=float, help=f"dropout of the first two FC layers (default {d.dropout})")
    model.add_argument(
        "--init", choices=INITS, help="weight init (default: paper for A/A-LRN or with --init-from, glorot otherwise)"
    )
    model.add_argument(
        "--init-from", metavar="CKPT", help="pre-initialise from a trained net A checkpoint (section 3.1)"
    )
    model.add_argument(
        "--finetune-from",
        metavar="FILE",
        help="fine-tune: start from a checkpoint or torchvision-layout VGG state dict (.pth/.safetensors); "
        "its configuration, normalisation and lr 1e-3 are the defaults",
    )
    model.add_argument("--freeze-features", action="store_true", help="with --finetune-from: train only the FC layers")
    optim = p.add_argument_group("optimiser (paper, section 3.1)")
    optim.add_argument("--batch-size", type=int, help=f"global mini-batch (default {d.batch_size})")
    optim.add_argument("--momentum", type=float, help=f"(default {d.momentum})")
    optim.add_argument("--weight-decay", type=float, help=f"(default {d.weight_decay})")
    optim.add_argument(
        "--decay-bias",
        action=argparse.BooleanOptionalAction,
        help="weight decay on biases and BatchNorm parameters too (default on; --no-decay-bias: off)",
    )
    optim.add_argument("--lr", type=float, help=f"initial learning rate (default {d.lr})")
    optim.add_argument("--lr-factor", type=float, help=f"LR multiplier on a plateau (default {d.lr_factor})")
    optim.add_argument(
        "--lr-patience", type=int, help=f"epochs without val improvement before a decrease (default {d.lr_patience})"
    )
    optim.add_argument("--lr-max-decreases", type=int, help=f"(default {d.lr_max_decreases})")
    optim.add_argument("--epochs", type=int, help=f"(default {d.epochs}; demo: {DEMO_OVERRIDES['epochs']})")
    images = p.add_argument_group("training images (paper, section 3.1)")
    images.add_argument(
        "--scale",
        type=int,
        nargs="+",
        metavar="S",
        help="training scale S: one value (fixed) or SMIN SMAX (jitter) (default 256)",
    )
    images.add_argument("--crop", type=int, help=f"crop size (default {d.crop})")
    images.add_argument(
        "--augment", action=argparse.BooleanOptionalAction, help="random crop, flip and colour shift (default on)"
    )
    images.add_argument("--pca-std", type=float, help=f"std of the PCA colour shift alphas (default {d.pca_std})")
    images.add_argument("--stats-images", type=int, help=f"images sampled for mean/std/PCA (default {d.stats_images})")
    images.add_argument(
        "--test-scale",
        dest="test_scale_override",
        type=int,
        metavar="Q",
        help="single test scale Q for validation and the served graph (default: S, or (Smin+Smax)/2)",
    )
    images.add_argument(
        "--eval-dense", action=argparse.BooleanOptionalAction, help="dense multi-scale evaluation (section 3.2)"
    )
    source = p.add_argument_group("data")
    source.add_argument(
        "--data", metavar="DIR", help="ImageNet-style folder: DIR/train/<class>/*, optional DIR/val/<class>/*"
    )
    source.add_argument("--dataset", choices=datasets.DOWNLOADABLE, help="download with torchvision (needs internet)")
    source.add_argument(
        "--val-split", type=float, help=f"held-out fraction of train/ without val/ (default {d.val_split})"
    )
    running = p.add_argument_group("running")
    running.add_argument("--seed", type=int, help=f"(default {d.seed})")
    running.add_argument(
        "--amp",
        action=argparse.BooleanOptionalAction,
        help="bf16 autocast (default off; demo: on where the CPU has bf16)",
    )
    running.add_argument("--workers", type=int, help="DataLoader workers (default 0 on CPU, min(8, cores) on GPU)")
    running.add_argument("--device", help="auto, cpu, cuda, cuda:N (default auto)")
    running.add_argument("--out", metavar="DIR", help="run directory (default runs/<cfg>-<timestamp>)")
    running.add_argument("--resume", action="store_true", default=False, help="continue from DIR/last.pt of --out")
    running.add_argument("--log-every", type=int, help="also log every N steps")
    running.add_argument(
        "--export", action=argparse.BooleanOptionalAction, help="export + register best.pt at the end (default on)"
    )
    running.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        default=False,
        help="also log the ONNX exporter's and optimiser's own messages while exporting",
    )
    return p


def config_from_args(args: argparse.Namespace) -> tuple[TrainConfig, bool]:
    """The resolved configuration and whether it trains on the demo data."""
    given = {key: value for key, value in vars(args).items() if key not in RUN_ONLY_FLAGS}
    if "scale" in given:
        given["scale"] = tuple(given["scale"])
    demo = given.get("data") is None and given.get("dataset") is None
    base = TrainConfig()
    if demo:
        base = dataclasses.replace(base, **DEMO_OVERRIDES, amp=cpu_has_bf16() or torch.cuda.is_available())
    return dataclasses.replace(base, **given), demo


def default_out(cfg: str) -> Path:
    return Path("runs") / f"{cfg}-{time.strftime('%Y%m%d-%H%M%S')}"


# ----------------------------------------------------------------------------- main


def main(args: argparse.Namespace) -> int:
    runtime = setup_runtime(getattr(args, "device", "auto"))
    if not runtime.is_main:
        logging.getLogger().setLevel(logging.WARNING)
    config, demo, resume_state, source = load_config(args, runtime)
    splits = datasets.folder_splits(Path(config.data), val_split=config.val_split, seed=config.seed)
    if not splits.val:
        raise UsageError(f"{config.data}: no validation images (add val/ or more images per class)")
    if demo:
        log.info("DEMO: %s", DEMO_HINT)
    stats = saved_stats(resume_state) if resume_state else compute_stats(config, splits.train)
    if source is not None:
        stats = finetune.source_stats(stats, source)
    training, start_epoch = start_training(config, runtime, splits, stats, resume_state, source)
    log_start(training, splits)
    if runtime.is_main:
        training.out.mkdir(parents=True, exist_ok=True)
        config_json = {**config.to_dict(), "init_used": training.init}
        (training.out / "config.json").write_text(json.dumps(config_json, indent=2) + "\n")
    best_top1 = run_epochs(training, make_loaders(config, splits, stats, runtime), start_epoch)
    if runtime.is_main:
        log.info("done: best val top-1 %.2f%% (FiveCrop); run directory %s", 100 * best_top1, training.out)
        if demo:
            log.info("DEMO: %s", DEMO_HINT)
        if config.export:
            export_best(training.out / "best.pt")
    if runtime.distributed:
        dist.destroy_process_group()
    return 0


def log_start(training: Training, splits: datasets.Splits) -> None:
    """What is trained on what, how, and with which recipe."""
    config, runtime = training.config, training.runtime
    log.info(
        "VGG-%s%s, %d classes, %d train / %d val images from %s",
        config.cfg,
        "-BN" if config.batch_norm else "",
        len(splits.classes),
        len(splits.train),
        len(splits.val),
        config.data,
    )
    log.info(
        "init: %s | device %s x%d (process group: %s) | amp %s | S %s crop %d Q %d | batch %d lr %g momentum %g "
        "wd %g dropout %g",
        training.init,
        runtime.device,
        runtime.world_size,
        runtime.backend,
        "bf16" if config.amp else "off",
        list(config.scale),
        config.crop,
        config.test_scale,
        config.batch_size,
        training.rule.lr,
        config.momentum,
        config.weight_decay,
        config.dropout,
    )


def load_config(
    args: argparse.Namespace, runtime: Runtime
) -> tuple[TrainConfig, bool, dict[str, Any] | None, finetune.Source | None]:
    """The checked configuration (with its run directory), whether it is the demo, the state
    of ``last.pt`` when resuming, and the weights to fine-tune from (``--finetune-from``)."""
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
    return dataclasses.replace(config, out=str(out)), demo, resume_state, source


def run_epochs(training: Training, loaders: Loaders, start_epoch: int) -> float:
    """Train, validate and checkpoint each epoch; returns the best validation top-1 (FiveCrop)."""
    config, runtime = training.config, training.runtime
    best_top1 = max((row[SELECTION_KEY] for row in training.history), default=-1.0)
    for epoch in range(start_epoch, config.epochs + 1):
        for group in training.optimizer.param_groups:
            group["lr"] = training.rule.lr
        loaders.start_epoch(epoch, seed=config.seed, rank=runtime.rank)
        row, images_per_s = run_epoch(training, loaders, epoch)
        val_top1 = broadcast_float(row.get(SELECTION_KEY, 0.0), runtime)
        training.history.append(row)
        training.rule = plateau_step(
            training.rule,
            val_top1=val_top1,
            patience=config.lr_patience,
            factor=config.lr_factor,
            max_decreases=config.lr_max_decreases,
        )
        rng_states = gather_rng_states(runtime)  # a collective: every rank takes part
        if runtime.is_main:
            log.info("%s", epoch_line(row, images_per_s=images_per_s, next_lr=training.rule.lr))
            save_epoch(training, epoch, best=val_top1 > best_top1, rng_states=rng_states)
            best_top1 = max(best_top1, val_top1)
        if runtime.distributed:
            dist.barrier()
    return best_top1


def run_epoch(training: Training, loaders: Loaders, epoch: int) -> tuple[dict[str, Any], float]:
    """One epoch's history row (validated on rank 0 only) and its training images/s."""
    config, runtime = training.config, training.runtime
    train = train_one_epoch(
        training.train_model,
        loaders.train,
        training.optimizer,
        device=runtime.device,
        amp=config.amp,
        channels_last=training.channels_last,
        epoch=epoch,
        show_progress=runtime.is_main,
        log_every=config.log_every,
        crop=config.crop,
    )
    row: dict[str, Any] = {"epoch": epoch, "lr": training.rule.lr, "train_loss": train.loss, "train_top1": train.top1}
    if runtime.is_main:
        row.update(
            evaluate(
                training.model,
                loaders.val,
                crop=config.crop,
                device=runtime.device,
                amp=config.amp,
                channels_last=training.channels_last,
            )
        )
        if loaders.dense is not None:
            row.update(
                evaluate_dense(training.model, loaders.dense, crop=config.crop, device=runtime.device, amp=config.amp)
            )
    row["seconds"] = round(train.seconds, 1)
    return row, train.images / max(train.seconds, 1e-9)


def save_epoch(training: Training, epoch: int, *, best: bool, rng_states: list[dict[str, Any]]) -> None:
    """``last.pt`` (and ``best.pt`` when ``best``), ``metrics.csv`` and ``curves.png``."""
    checkpoint = training_checkpoint(
        config=training.config,
        model=training.model,
        optimizer=training.optimizer,
        rule=training.rule,
        epoch=epoch,
        classes=training.classes,
        stats=training.stats,
        history=training.history,
        init=training.init,
        rng_states=rng_states,
    )
    save_checkpoint(checkpoint, training.out / "last.pt")
    if best:
        save_checkpoint(checkpoint, training.out / "best.pt")
    write_metrics(training.history, training.out)
    plot_history(training.history, training.out / "curves.png")


def cli(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    args = get_args_parser().parse_args(argv)
    if args.verbose:
        from export.onnx_io import show_exporter_logs

        show_exporter_logs()
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
