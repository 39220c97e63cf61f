"""How often a model's int8 (and fp16) graphs give the fp32 graph's top-1 answer on real images.

Each image of ``--images`` (searched recursively) is decoded and resized exactly as the service
does it (:func:`vgg.preprocessing.load_graph_input` at the model's test scale Q) and run through
:class:`serving.engine.Engine` on the CPU, once per graph. Printed: the top-1 agreement of every
other graph with fp32 (target >= 99%, the threshold the int8 export check applies), the fp32
top-1 margin of the images where they disagree (near-ties or real errors), and, when the
images' folder names are the model's labels, each graph's top-1 accuracy.

    .venv/bin/python bench/agreement.py --model vgg:latest --images ../shared/data/imagenette/train
    .venv/bin/python bench/agreement.py --model runs/D-.../model.onnx --images DIR --limit 500 --json out.json

Use images the model was not trained on where you can: agreement is easier on training images,
which the model answers with confidence.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from export import check  # noqa: E402
from serving.engine import Engine, EngineError, ModelFiles, resolve_model  # noqa: E402
from vgg.preprocessing import ImageDecodeError, load_graph_input  # noqa: E402

TARGET_AGREEMENT = 0.99
BATCH = 16


def image_files(folder: Path, limit: int | None) -> list[Path]:
    """The images under ``folder`` (:func:`export.check.image_files`) in name order, ``limit``
    of them spread evenly over it (so over all its class folders) when there are more."""
    files = sorted(check.image_files(folder))
    if limit is not None and len(files) > limit:
        files = [files[i] for i in np.linspace(0, len(files) - 1, limit).round().astype(int)]
    return files


def graph_inputs(files: list[Path], test_scale: int) -> tuple[np.ndarray, list[Path]]:
    """The decoded images and the files they came from (undecodable files are skipped, named)."""
    images, kept = [], []
    for path in files:
        try:
            images.append(load_graph_input(path, test_scale))
            kept.append(path)
        except ImageDecodeError as error:
            print(f"skipped {path}: {error}", file=sys.stderr)
    return np.stack(images), kept


def probabilities(files: ModelFiles, precision: str, images: np.ndarray) -> np.ndarray:
    engine = Engine(files, device="cpu", precision=precision)
    return np.concatenate([engine.run(images[i : i + BATCH]) for i in range(0, len(images), BATCH)])


def compare(reference: np.ndarray, other: np.ndarray) -> dict:
    """Agreement of ``other`` with ``reference`` (fp32) on top-1, and where they disagree, how
    close fp32's top two were."""
    top = np.sort(reference, axis=1)
    margin = top[:, -1] - top[:, -2]
    disagree = reference.argmax(axis=1) != other.argmax(axis=1)
    return {
        "agreement": float(1.0 - disagree.mean()),
        "disagreements": int(disagree.sum()),
        "fp32_margin_where_they_disagree": sorted(float(m) for m in margin[disagree]),
        "median_fp32_margin": float(np.median(margin)),
        "max_abs_prob_diff": float(np.abs(reference - other).max()),
    }


def accuracy(probs: np.ndarray, kept: list[Path], labels: list[str]) -> float | None:
    """Top-1 accuracy when every image's parent folder is one of ``labels``, else ``None``."""
    index = {label: i for i, label in enumerate(labels)}
    truth = [index.get(path.parent.name) for path in kept]
    if any(label is None for label in truth):
        return None
    return float((probs.argmax(axis=1) == np.asarray(truth)).mean())


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="store tag or .onnx file (default: $VGG_MODEL or vgg:latest)")
    parser.add_argument("--images", type=Path, required=True, help="folder of real images (searched recursively)")
    parser.add_argument("--limit", type=int, default=None, help="use at most this many images, spread over the folder")
    parser.add_argument("--json", type=Path, default=None, help="also write the results to this JSON file")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.images.is_dir():
        print(f"error: {args.images}: no such folder", file=sys.stderr)
        return 2
    try:
        files = resolve_model(args.model)
    except EngineError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if "fp32" not in files.graphs or len(files.graphs) < 2:
        print(f"error: {files.tag} has only {'+'.join(files.graphs)}: nothing to compare with fp32", file=sys.stderr)
        return 2
    paths = image_files(args.images, args.limit)
    if not paths:
        print(f"error: {args.images}: no images", file=sys.stderr)
        return 2
    images, kept = graph_inputs(paths, files.test_scale)
    print(
        f"model {files.tag} ({files.metadata.get('cfg')}, Q {files.test_scale}, tta {files.metadata.get('tta')}), "
        f"{len(kept)} images from {args.images}; {platform.processor() or platform.machine()}"
    )
    started = time.perf_counter()
    probs = {precision: probabilities(files, precision, images) for precision in files.graphs}
    report: dict = {"model": files.tag, "images": len(kept), "folder": str(args.images), "graphs": {}}
    for precision, p in probs.items():
        row = {"top1_accuracy": accuracy(p, kept, files.labels)}
        if precision != "fp32":
            row |= compare(probs["fp32"], p)
            verdict = "met" if row["agreement"] >= TARGET_AGREEMENT else "MISSED"
            margins = ", ".join(f"{m:.3f}" for m in row["fp32_margin_where_they_disagree"][:10])
            print(
                f"{precision}: top-1 agrees with fp32 on {row['agreement']:.2%} ({row['disagreements']} differ; "
                f"target >= {TARGET_AGREEMENT:.0%}: {verdict}); fp32 top-1 margin where they differ: "
                f"[{margins}] (median margin over all images {row['median_fp32_margin']:.3f})"
            )
        if row["top1_accuracy"] is not None:
            print(f"{precision}: top-1 accuracy {row['top1_accuracy']:.2%} (folder names are the labels)")
        report["graphs"][precision] = row
    print(f"({time.perf_counter() - started:.0f} s for {len(probs)} graphs)")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
