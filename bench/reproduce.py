"""Reproduction on real images: the paper's procedure on Imagenette, measured end to end.

    .venv/bin/python bench/reproduce.py                      # the CPU protocol (RESULTS.md)
    .venv/bin/python bench/reproduce.py --geometry paper --amp --epochs-a 6 --epochs-d 4   # GPU

Steps (Simonyan & Zisserman, arXiv:1409.1556):

1. VGG-A from the paper's random initialisation (section 3.1).
2. VGG-D pre-initialised from step 1's best checkpoint: its first four conv layers and the
   three FC layers (section 3.1).
3. VGG-D with Glorot initialisation and no pre-initialisation (the paper's final note in
   section 3.1), with the same epoch budget as step 2.
4. Each best checkpoint on the held-out 10 %, with ``python -m training.evaluate``'s
   protocols: top-1/top-5 error with a single centre crop, FiveCrop and TenCrop at the test
   scale Q = (Smin + Smax) / 2, and dense evaluation (section 3.2: the fully-convolutional net
   over the whole image at Smin, (Smin + Smax) / 2 and Smax, with flips); ``--protocols`` adds
   grid50 and dense+grid50 (sections 3.2 and 4.3).
5. The best D is exported (FiveCrop inside the graph), served with ``bentoml serve`` and the
   held-out images are classified over HTTP: the served top-1 must equal the offline
   FiveCrop top-1 on the same images (exit code 1 otherwise).

Training uses ``python -m training.run`` (one subprocess per step, its own run directory
and log under ``--out``); the split is its stratified, seeded 90/10 split of ``train/``,
so the held-out images are never trained on. Results: ``--out``/results.{json,md}.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import httpx  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench.launch import bentoml_serve_command, free_port, running_server  # noqa: E402
from training import evaluate as evaluation  # noqa: E402
from training.config import TrainConfig  # noqa: E402
from training.data import Sample, folder_splits  # noqa: E402
from vgg.protocols import PROTOCOLS  # noqa: E402

log = logging.getLogger("reproduce")

DEFAULT_DATA = REPO_ROOT.parent / "shared" / "data" / "imagenette"
# The paper's geometry (section 3.1: S jittered in [256, 512], 224 crops) and the same scaled
# by 1/4 for a 2-core CPU. The test scale Q is training.run's: (Smin + Smax) / 2.
GEOMETRIES = {
    "paper": {"scale": (256, 512), "crop": 224},
    "quarter": {"scale": (64, 128), "crop": 56},
}
# grid50 and dense+grid50 (150 views per image) are opt-in: hours on a 2-core CPU.
DEFAULT_PROTOCOLS = ("center", "five", "ten", "dense")


@dataclass(frozen=True)
class Step:
    name: str
    cfg: str
    flags: tuple[str, ...]
    epochs: int


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--data", type=Path, default=DEFAULT_DATA, help="ImageNet-style folder with train/ (default: shared imagenette)"
    )
    p.add_argument("--out", type=Path, default=REPO_ROOT / "runs" / "reproduce", help="where runs, logs and results go")
    p.add_argument(
        "--geometry", choices=sorted(GEOMETRIES), default="quarter", help="image sizes (default: the paper's / 4)"
    )
    # Epochs of the CPU protocol (about an hour on a 2-core Xeon, RESULTS.md); the paper trained for 74.
    p.add_argument("--epochs-a", type=int, default=4, help="epochs of step 1 (VGG-A)")
    p.add_argument(
        "--init-a",
        choices=("paper", "glorot", "kaiming"),
        default="paper",
        help="initialisation of step 1 (default: the paper's N(0, 1e-2))",
    )
    p.add_argument("--epochs-d", type=int, default=2, help="epochs of steps 2 and 3 (each VGG-D)")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True, help="bf16 autocast (default on)")
    p.add_argument("--batch-size", type=int, default=256, help="the paper's 256")
    p.add_argument("--fc-width", type=int, default=4096, help="the paper's 4096")
    p.add_argument("--classes", type=int, default=0, help="use only the first N classes (0: all)")
    p.add_argument("--per-class", type=int, default=0, help="use only the first M images of each class (0: all)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--workers", type=int, default=None, help="DataLoader workers for training")
    p.add_argument("--eval-batch", type=int, default=32, help="images per evaluation batch")
    p.add_argument(
        "--protocols",
        nargs="+",
        choices=PROTOCOLS,
        default=list(DEFAULT_PROTOCOLS),
        help=f"test protocols of step 4 (default: {' '.join(DEFAULT_PROTOCOLS)}; five is always run)",
    )
    p.add_argument("--http-batch", type=int, default=16, help="images per /classify_batch request")
    p.add_argument("--seed", type=int, default=0)
    return p


# ----------------------------------------------------------------------------- data


def make_subset(train: Path, destination: Path, *, classes: int, per_class: int) -> Path:
    """An ImageNet-style folder of symlinks to the first images of the first classes."""
    for index, class_dir in enumerate(sorted(d for d in train.iterdir() if d.is_dir())):
        if classes and index >= classes:
            break
        target = destination / "train" / class_dir.name
        target.mkdir(parents=True, exist_ok=True)
        images = sorted(p for p in class_dir.iterdir() if p.is_file())
        for image in images[: per_class or None]:
            link = target / image.name
            if not link.exists():
                link.symlink_to(image.resolve())
    return destination


def held_out(data: Path, *, seed: int) -> tuple[list[str], list[Sample]]:
    """The validation split that training.run carves out of ``data/train`` (same seed)."""
    splits = folder_splits(data, val_split=0.1, seed=seed)
    return splits.classes, splits.val


# ----------------------------------------------------------------------------- training


def test_scale(geometry: dict) -> int:
    """training.run's single test scale Q for the geometry: (Smin + Smax) / 2."""
    return TrainConfig(scale=tuple(geometry["scale"]), crop=geometry["crop"]).test_scale


def step_config(step: Step, *, data: Path, args: argparse.Namespace) -> dict:
    """Everything that decides what a step trains; a recorded step is reused only if it matches."""
    return {
        "cfg": step.cfg,
        "flags": list(step.flags),
        "epochs": step.epochs,
        "data": str(data),
        "geometry": {
            key: list(value) if isinstance(value, tuple) else value for key, value in GEOMETRIES[args.geometry].items()
        },
        "batch_size": args.batch_size,
        "fc_width": args.fc_width,
        "amp": args.amp,
        "seed": args.seed,
        "classes": args.classes,
        "per_class": args.per_class,
    }


def eval_config(args: argparse.Namespace) -> dict:
    """What decides a step's evaluation figures (with its training configuration)."""
    return {"protocols": sorted(set(args.protocols) | {"five"}), "amp": args.amp}


def recorded_run(record: Path, config: dict) -> dict | None:
    """The finished step recorded in ``record`` if it was trained with ``config``, else None."""
    if not record.exists():
        return None
    done = json.loads(record.read_text())
    if done.get("config") != config:
        log.info("%s: recorded with another configuration; the step runs again", record.name)
        return None
    return done


def run_training(step: Step, *, data: Path, out: Path, args: argparse.Namespace) -> dict:
    """Train one step as ``python -m training.run``; return its wall time and metrics.

    A step that already finished in ``out`` (its ``<step>.json`` record exists) is reused only
    if its whole configuration (:func:`step_config`) matches, so an interrupted protocol
    continues where it stopped and a changed one trains afresh.
    """
    record = out / f"{step.name}.json"
    config = step_config(step, data=data, args=args)
    done = recorded_run(record, config)
    if done is not None:
        log.info("step %s: reusing the finished run in %s", step.name, out / step.name)
        return done
    geometry = GEOMETRIES[args.geometry]
    run_dir = out / step.name
    command = [
        sys.executable,
        "-m",
        "training.run",
        "--cfg",
        step.cfg,
        "--data",
        str(data),
        "--out",
        str(run_dir),
        "--epochs",
        str(step.epochs),
        "--scale",
        *map(str, geometry["scale"]),
        "--crop",
        str(geometry["crop"]),
        "--batch-size",
        str(args.batch_size),
        "--fc-width",
        str(args.fc_width),
        "--seed",
        str(args.seed),
        "--device",
        args.device,
        "--amp" if args.amp else "--no-amp",
        "--no-export",
        *step.flags,
    ]
    if args.workers is not None:
        command += ["--workers", str(args.workers)]
    log.info("step %s: %s", step.name, " ".join(command[1:]))
    start = time.perf_counter()
    with open(out / f"{step.name}.log", "wb") as log_file:
        result = subprocess.run(command, cwd=REPO_ROOT, stdout=log_file, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - start
    if result.returncode != 0:
        tail = (out / f"{step.name}.log").read_text(errors="replace").splitlines()[-15:]
        raise SystemExit(f"step {step.name} failed (exit {result.returncode}):\n" + "\n".join(tail))
    with open(run_dir / "metrics.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    train_seconds = sum(float(row["seconds"]) for row in rows)
    config = json.loads((run_dir / "config.json").read_text())
    train_images = len(folder_splits(data, val_split=0.1, seed=args.seed).train)
    done = {
        "name": step.name,
        "cfg": step.cfg,
        "init": config.get("init_used"),
        "init_from": config.get("init_from"),
        "epochs": len(rows),
        "wall_s": round(wall, 1),
        "train_images_per_s": round(train_images * len(rows) / max(train_seconds, 1e-9), 1),
        "checkpoint": str(run_dir / "best.pt"),
        "config": config,
    }
    record.write_text(json.dumps(done, indent=2) + "\n")
    return done


# ----------------------------------------------------------------------------- evaluation


@contextlib.contextmanager
def strict_fp32() -> Iterator[None]:
    """No TF32 in CUDA convolutions and matrix products while inside (PyTorch allows it in
    cuDNN convolutions by default), so an fp32 pass computes what the served fp32 graph does."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def evaluate_checkpoint(
    path: str, val: list[Sample], *, protocols: list[str], batch: int, amp: bool, device: torch.device
) -> tuple[dict, list[int]]:
    """Top-1/top-5 errors of each protocol (``python -m training.evaluate``'s implementation:
    the checkpoint's Q for center/five/ten, section 4.2's three Q for the others) and the fp32
    FiveCrop predictions, which the service must reproduce. With ``amp`` the protocols run
    under bf16 autocast; the FiveCrop predictions are always fp32 without TF32, like the served graph."""
    model = evaluation.load_model(path)
    settings = evaluation.Settings(batch_size=batch, device=device, amp=amp, workers=0, progress=False)
    labels = [label for _, label in val]
    cache: dict[str, evaluation.Posteriors] = {}
    errors: dict = {}
    with strict_fp32():  # the served graph computes fp32 without TF32 (ORT: use_tf32=0)
        for protocol in protocols:
            result = evaluation.protocol_posteriors(model, val, protocol, None, settings, cache)
            errors[protocol] = [round(value, 4) for value in evaluation.errors(result, labels)]
            errors[f"{protocol}_scales"] = result.scales
        fp32 = (
            cache["five"]
            if not amp and "five" in cache
            else evaluation.protocol_posteriors(model, val, "five", None, dataclasses.replace(settings, amp=False))
        )
    if len(fp32.indices) != len(val):
        unreadable = len(val) - len(fp32.indices)
        raise SystemExit(f"{unreadable} held-out images are unreadable; the served comparison needs all")
    return errors, fp32.probs.argmax(dim=1).tolist()


# ----------------------------------------------------------------------------- serving


def classify_over_http(checkpoint: str, val: list[Sample], *, workdir: Path, batch: int) -> tuple[list[int], str]:
    """Export ``checkpoint`` into a fresh BentoML store, serve it, classify ``val`` over HTTP."""
    from export import export_checkpoint

    home = workdir / "bentoml"
    os.environ["BENTOML_HOME"] = str(home)  # the export registers here; the server reads it
    result = export_checkpoint(checkpoint, tta="five", register=True)
    log.info("exported %s as %s", checkpoint, result.tag)
    env = {**os.environ, "BENTOML_HOME": str(home), "BENTOML_DO_NOT_TRACK": "True"}
    port = free_port()
    predictions: list[int] = []
    with running_server(bentoml_serve_command(port), port=port, env=env, log_path=workdir / "serve.log") as (url, _):
        with httpx.Client(base_url=url, timeout=300) as client:
            for start in range(0, len(val), batch):
                chunk = val[start : start + batch]
                files = [("images", (Path(p).name, Path(p).read_bytes(), "image/jpeg")) for p, _ in chunk]
                response = client.post("/classify_batch", files=files, data={"top_k": "1"})
                response.raise_for_status()
                predictions += [answer["index"] for answer in response.json()]
    return predictions, str(result.tag)


# ----------------------------------------------------------------------------- report


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU only, {os.cpu_count()} cores"
    return f"{cpu}; {device}; torch {torch.__version__}"


PROTOCOL_TITLES = {
    "center": "centre",
    "five": "FiveCrop",
    "ten": "TenCrop",
    "grid50": "grid50",
    "dense": "dense",
    "dense+grid50": "dense+grid50",
}


def markdown(results: dict) -> str:
    protocols = [name for name in PROTOCOLS if name in results["protocols"]]
    rows = [
        "| run | init | epochs | wall | train img/s | "
        + " | ".join(PROTOCOL_TITLES[name] for name in protocols)
        + " |",
        "|---|---|---|---|---|" + "---|" * len(protocols),
    ]
    for run in results["runs"]:
        e = run["errors"]
        cells = [f"{100 * e[k][0]:.1f} / {100 * e[k][1]:.1f}" for k in protocols]
        init = "pre-init from A" if run["init_from"] else run["init"]
        rows.append(
            f"| VGG-{run['cfg']} ({run['name']}) | {init} | {run['epochs']} | {run['wall_s'] / 60:.1f} min "
            f"| {run['train_images_per_s']:.0f} | " + " | ".join(cells) + " |"
        )
    served = results["served"]
    scales = results["runs"][0]["errors"]
    multi = next((scales[f"{name}_scales"] for name in ("dense", "grid50") if f"{name}_scales" in scales), None)
    return "\n".join(
        [
            f"Top-1 / top-5 validation error (%), {results['val_images']} held-out images, "
            f"Q = {results['test_scale']}{f', multi-scale Q {multi}' if multi else ''}"
            f"{', bf16 autocast' if results['amp'] else ''}.",
            "",
            *rows,
            "",
            f"Served ({served['model']}, FiveCrop graph over HTTP): top-1 error {100 * served['top1_err']:.2f} % "
            f"vs offline FiveCrop {100 * served['offline_top1_err']:.2f} %; "
            f"{served['disagreements']} of {results['val_images']} predictions differ.",
            "",
            f"Machine: {results['machine']}. Total wall time {results['wall_s'] / 60:.1f} min.",
        ]
    )


def make_data(args: argparse.Namespace, out: Path) -> Path:
    """The training folder: ``--data``, or a fresh subset of it (``--classes``/``--per-class``)."""
    data = args.data.resolve()
    if not (args.classes or args.per_class):
        return data
    subset = out / "data"
    if subset.exists():  # symlinks of an earlier subset, which may have had other sizes
        shutil.rmtree(subset)
    return make_subset(data / "train", subset, classes=args.classes, per_class=args.per_class)


def main(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    if not (args.data / "train").is_dir():
        print(f"error: {args.data}/train not found (ImageNet-style folder expected)", file=sys.stderr)
        return 2
    data = make_data(args, out)
    geometry = GEOMETRIES[args.geometry]
    protocols = sorted(set(args.protocols) | {"five"}, key=PROTOCOLS.index)
    steps = [
        Step(f"A-{args.init_a}", "A", ("--init", args.init_a), args.epochs_a),
        # The layers not copied from A get A's initialisation (the paper: its N(0, 1e-2)).
        Step(
            "D-preinit",
            "D",
            ("--init-from", str(out / f"A-{args.init_a}" / "best.pt"), "--init", args.init_a),
            args.epochs_d,
        ),
        Step("D-glorot", "D", ("--init", "glorot"), args.epochs_d),
    ]
    classes, val = held_out(data, seed=args.seed)
    use_cuda = torch.cuda.is_available() and args.device != "cpu"
    eval_device = torch.device("cuda" if use_cuda else "cpu")
    runs = []
    for step in steps:
        run = run_training(step, data=data, out=out, args=args)
        if "errors" not in run or run.get("eval_config") != eval_config(args):
            run["errors"], run["five_predictions"] = evaluate_checkpoint(
                run["checkpoint"], val, protocols=protocols, batch=args.eval_batch, amp=args.amp, device=eval_device
            )
            run["eval_config"] = eval_config(args)
            (out / f"{step.name}.json").write_text(json.dumps(run, indent=2) + "\n")
        log.info("%s: %s", step.name, run["errors"])
        runs.append(run)

    best_d = min((r for r in runs if r["cfg"] == "D"), key=lambda r: r["errors"]["five"][0])
    if "five_predictions" not in best_d:  # a reused record from before predictions were kept
        _, best_d["five_predictions"] = evaluate_checkpoint(
            best_d["checkpoint"], val, protocols=["five"], batch=args.eval_batch, amp=args.amp, device=eval_device
        )
    served, tag = classify_over_http(best_d["checkpoint"], val, workdir=out, batch=args.http_batch)
    labels = [label for _, label in val]
    offline = best_d["five_predictions"]
    results = {
        "geometry": geometry,
        "test_scale": test_scale(geometry),
        "protocols": protocols,
        "amp": args.amp,
        "val_images": len(val),
        "classes": classes,
        "runs": [{k: v for k, v in r.items() if k != "five_predictions"} for r in runs],
        "served": {
            "model": tag,
            "run": best_d["name"],
            "top1_err": round(1 - float(np.mean(np.array(served) == labels)), 4),
            "offline_top1_err": round(1 - float(np.mean(np.array(offline) == labels)), 4),
            "disagreements": int(sum(a != b for a, b in zip(served, offline, strict=True))),
        },
        "machine": machine(),
        "wall_s": round(time.perf_counter() - start, 1),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "results.md").write_text(markdown(results) + "\n")
    print(markdown(results))
    if results["served"]["top1_err"] != results["served"]["offline_top1_err"]:
        print("error: the served top-1 differs from the offline FiveCrop top-1", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    sys.exit(main(get_args_parser().parse_args()))
