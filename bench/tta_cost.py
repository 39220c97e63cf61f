"""Cost per image of the exported graph's test-time protocols, measured side by side.

    .venv/bin/python bench/tta_cost.py                       # VGG-D, 224 crops: five at Q = 256 vs
                                                             # dense at Q = 256, 384, 512 (ONNX Runtime, CPU)
    .venv/bin/python bench/tta_cost.py --provider cuda       # the same on a GPU (onnxruntime-gpu)
    python3 bench/tta_cost.py --runtime torch --batch 8      # the graph module in PyTorch (CUDA if present)

Each graph is :class:`export.graph.InferenceGraph` (random weights: the cost does not depend on
them) exported with :func:`export.onnx_io.to_onnx` and run with ONNX Runtime on uint8 inputs
of its own size, as the service runs it (``--runtime torch``: the same module run by PyTorch,
fp32, no export). Prints seconds per image of each protocol and the ratio to the first one.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import vgg  # noqa: E402
from export.check import session  # noqa: E402
from export.graph import InferenceGraph  # noqa: E402
from export.onnx_io import save_onnx, to_onnx  # noqa: E402


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--cfg", default="D", choices=vgg.CONFIG_NAMES)
    p.add_argument("--crop", type=int, default=224)
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--scale", type=int, default=256, help="Q of the baseline FiveCrop graph")
    p.add_argument("--test-scales", type=int, nargs="+", default=[256, 384, 512], help="Q of the dense graph")
    p.add_argument("--batch", type=int, default=1, help="images per run")
    p.add_argument("--iters", type=int, default=3, help="timed runs per graph (after one warm-up)")
    p.add_argument("--provider", choices=("cpu", "cuda"), default="cpu", help="ONNX Runtime provider")
    p.add_argument("--runtime", choices=("onnxruntime", "torch"), default="onnxruntime")
    p.add_argument("--json", type=Path, default=None)
    return p


def graphs(args: argparse.Namespace) -> dict[str, InferenceGraph]:
    torch.manual_seed(0)
    model = vgg.build(args.cfg, num_classes=args.classes).eval()
    common = {"mean": [124.0, 116.0, 104.0], "std": [58.0, 57.0, 57.5], "crop": args.crop}
    multi = ",".join(map(str, args.test_scales))
    return {
        f"five Q={args.scale}": InferenceGraph(model, test_scale=args.scale, tta="five", **common),
        f"dense Q={args.scale}": InferenceGraph(model, test_scale=args.scale, tta="dense", **common),
        f"dense Q={multi}": InferenceGraph(
            model, test_scale=max(args.test_scales), tta="dense", test_scales=args.test_scales, **common
        ),
    }


def seconds_per_image(path: Path, graph: InferenceGraph, args: argparse.Namespace) -> float:
    providers = (
        ["CUDAExecutionProvider", "CPUExecutionProvider"] if args.provider == "cuda" else ["CPUExecutionProvider"]
    )
    runner = session(path, providers=providers)
    if args.provider == "cuda" and "CUDAExecutionProvider" not in runner.get_providers():
        raise SystemExit("error: ONNX Runtime has no CUDA provider here")
    images = np.random.default_rng(0).integers(
        0, 256, size=(args.batch, graph.test_scale, graph.test_scale, 3), dtype=np.uint8
    )
    runner.run(None, {"images": images})  # warm-up
    start = time.perf_counter()
    for _ in range(args.iters):
        runner.run(None, {"images": images})
    return (time.perf_counter() - start) / (args.iters * args.batch)


@torch.no_grad()
def torch_seconds_per_image(graph: InferenceGraph, args: argparse.Namespace) -> float:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    module = graph.to(device).eval()
    images = torch.randint(
        0, 256, (args.batch, graph.test_scale, graph.test_scale, 3), dtype=torch.uint8, device=device
    )
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    module(images)  # warm-up
    sync()
    start = time.perf_counter()
    for _ in range(args.iters):
        module(images)
    sync()
    return (time.perf_counter() - start) / (args.iters * args.batch)


def measure(args: argparse.Namespace) -> dict[str, float]:
    results = {}
    with tempfile.TemporaryDirectory(prefix="tta-cost-") as scratch:
        for name, graph in graphs(args).items():
            if args.runtime == "torch":
                results[name] = torch_seconds_per_image(graph, args)
                continue
            path = save_onnx(to_onnx(graph), Path(scratch) / "graph.onnx")
            results[name] = seconds_per_image(path, graph, args)
            path.unlink()
    return results


def main(args: argparse.Namespace) -> int:
    results = measure(args)
    baseline = next(iter(results.values()))
    if args.runtime == "torch":
        where = (
            f"PyTorch {torch.__version__} on {torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'CPU'}"
        )
    else:
        where = f"ONNX Runtime {args.provider}"
    cpu = platform.processor() or platform.machine()
    print(f"VGG-{args.cfg}, {args.crop} crops, batch {args.batch}, {where} (host {cpu}, {os.cpu_count()} cores):")
    for name, seconds in results.items():
        print(f"  {name:<24} {1000 * seconds:9.1f} ms/image  {seconds / baseline:5.2f}x")
    if args.json:
        args.json.write_text(
            json.dumps({"config": vars(args) | {"json": str(args.json)}, "seconds_per_image": results}, indent=2) + "\n"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
