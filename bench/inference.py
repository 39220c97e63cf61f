"""Inference engine benchmark: the exported VGG graph in ONNX Runtime vs PyTorch eager.

Builds VGG-D (paper configuration D, fc 4096, 1000 classes, random weights: speed does not
depend on the values), exports it with :mod:`export` exactly as a checkpoint would be (uint8
``[N, Q, Q, 3]`` in, FiveCrop + softmax + mean inside the graph), and times, on the same
uint8 images, one run each:

- PyTorch eager, the export's reference pipeline (:func:`export.reference.reference_probs`:
  torchvision FiveCrop per image, normalise, model, softmax, mean), and the batched eager
  graph (:class:`export.graph.InferenceGraph` in PyTorch) for context;
- ONNX Runtime CPU: fp32, and int8 (QDQ, per-channel, calibrated on ``--calibration`` images);
- with a CUDA GPU: ORT CUDA fp32 and fp16 with IO binding (input and output on the device),
  and PyTorch eager on the GPU.

It prints images/s, the target ratios (fp32 ORT / PyTorch, int8 / fp32) and the
achieved GFLOP/s against an estimate of the machine's peak. VGG-D costs 15.47 GMAC per
224x224 crop (paper Table 2's D, counted in ``MACS_PER_CROP``), 5 crops per image.

Usage: ``python bench/inference.py --batch 8 --iters 3`` (a few minutes on 2 cores);
``--cfg A --crop 64`` for a quick smoke run.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import platform
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import vgg  # noqa: E402
from export.check import random_images  # noqa: E402
from export.graph import InferenceGraph  # noqa: E402
from export.onnx_io import save_onnx, set_metadata, to_onnx  # noqa: E402
from export.reference import reference_probs  # noqa: E402
from serving.engine import physical_cores  # noqa: E402
from vgg.preprocessing import IMAGENET_MEAN_RGB, IMAGENET_STD_RGB, default_test_scale  # noqa: E402

MACS_PER_CROP = {"D": 15.47e9}  # at 224x224; other configs/crops are counted with a hook
CROPS_PER_IMAGE = 5


def count_macs(model: torch.nn.Module, crop: int) -> float:
    """Multiply-accumulates of one forward pass on a ``crop x crop`` image (conv + linear)."""
    total = 0

    def conv_hook(module, inputs, output):
        nonlocal total
        kernel = module.kernel_size[0] * module.kernel_size[1] * module.in_channels // module.groups
        total += output.numel() * kernel

    def linear_hook(module, inputs, output):
        nonlocal total
        total += output.numel() * module.in_features

    handles = [m.register_forward_hook(conv_hook) for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    handles += [m.register_forward_hook(linear_hook) for m in model.modules() if isinstance(m, torch.nn.Linear)]
    with torch.inference_mode():
        model(torch.zeros(1, 3, crop, crop))
    for handle in handles:
        handle.remove()
    return float(total)


def cpu_peak_gflops(threads: int) -> tuple[float, float, str]:
    """(fp32 peak, int8 peak, how) in GFLOP/s (int8: GOP/s) from /proc/cpuinfo.

    Peak = cores x clock x FLOP/cycle. FLOP/cycle per core: 2 FMA units x (16 fp32 lanes with
    AVX-512, 8 with AVX2) x 2; int8 with AVX512-VNNI (vpdpbusd): 4x the fp32 MAC rate. The
    clock is the highest ``cpu MHz`` reported (nominal; turbo and AVX-512 down-clocking differ).
    The unit count (2 FMA units) is an assumption for server Xeons; one unit halves the peak.
    """
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    flags = set(re.search(r"^flags\s*:\s*(.*)$", text, re.M).group(1).split()) if "flags" in text else set()
    mhz = max((float(v) for v in re.findall(r"^cpu MHz\s*:\s*([\d.]+)", text, re.M)), default=2000.0)
    lanes = 16 if "avx512f" in flags else 8 if "avx2" in flags else 4
    fp32_per_cycle = 2 * lanes * 2
    int8_per_cycle = fp32_per_cycle * (4 if "avx512_vnni" in flags or "avx_vnni" in flags else 2)
    fp32 = threads * mhz / 1e3 * fp32_per_cycle
    int8 = threads * mhz / 1e3 * int8_per_cycle
    how = (
        f"{threads} cores x {mhz / 1e3:.2f} GHz x {fp32_per_cycle} FLOP/cycle "
        f"({'AVX-512' if lanes == 16 else 'AVX2' if lanes == 8 else 'SSE'}, 2 FMA units assumed"
        f"{', VNNI int8 x4' if int8_per_cycle == 4 * fp32_per_cycle else ''})"
    )
    return fp32, int8, how


def images_per_second(run, images: np.ndarray, *, batch: int, iters: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        run(images[:batch])
    start = time.perf_counter()
    for i in range(iters):
        run(images[(i * batch) % len(images) :][:batch])
    return batch * iters / (time.perf_counter() - start)


def cpu_session(path: Path, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def export_graph(model, *, crop: int, test_scale: int, half: bool, path: Path) -> Path:
    graph = InferenceGraph(
        model, mean=IMAGENET_MEAN_RGB, std=IMAGENET_STD_RGB, crop=crop, test_scale=test_scale, tta="five", half=half
    )
    with contextlib.redirect_stdout(io.StringIO()):
        proto = to_onnx(graph)
    # Enough metadata for the service to serve the file (bench/serve.py --model PATH).
    set_metadata(
        proto, {"test_scale": test_scale, "crop": crop, "tta": "five", "precision": "fp16" if half else "fp32"}
    )
    return save_onnx(proto, path, full_check=False)


def cuda_session(path: Path) -> ort.InferenceSession:
    """An ORT session that really runs on CUDA (as the service opens it), or SystemExit with ORT's reason."""
    from serving.cuda import cuda_problem, preload_cuda_libraries

    problem = cuda_problem()
    if problem is not None:
        raise SystemExit(f"error: ORT CUDA is not usable: {problem}")
    preload_cuda_libraries()
    options = {"cudnn_conv_algo_search": "EXHAUSTIVE", "use_tf32": "0"}
    session = ort.InferenceSession(str(path), providers=[("CUDAExecutionProvider", options)])
    if session.get_providers()[0] != "CUDAExecutionProvider":
        raise SystemExit(f"error: the ORT session for {path.name} runs on {session.get_providers()[0]}, not CUDA")
    return session


def bench_cuda(model, paths: dict[str, Path], images: np.ndarray, *, args, macs_per_image: float) -> dict[str, float]:
    """ORT CUDA fp32/fp16 with IO binding vs PyTorch eager (fp32 without TF32, and fp16) on the GPU."""
    device = torch.device("cuda")
    torch.backends.cudnn.allow_tf32 = False  # fp32 is fp32 on both sides (ORT: use_tf32=0)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.benchmark = True
    print("\n== CUDA:", torch.cuda.get_device_name(0))
    on_device = torch.from_numpy(images).to(device)
    results = {}
    for precision, half in (("fp32", False), ("fp16", True)):
        graph = (
            InferenceGraph(
                model,
                mean=IMAGENET_MEAN_RGB,
                std=IMAGENET_STD_RGB,
                crop=args.crop,
                test_scale=args.test_scale,
                tta="five",
                half=half,
            )
            .to(device)
            .eval()
        )

        def torch_run(batch, graph=graph):
            with torch.inference_mode():
                graph(on_device[: len(batch)])
            torch.cuda.synchronize()

        results[f"PyTorch eager {precision}"] = images_per_second(
            torch_run, images, batch=args.batch, iters=args.iters, warmup=2
        )
        del graph
    for precision in ("fp32", "fp16"):
        sess = cuda_session(paths[precision])
        binding = sess.io_binding()
        input_value = ort.OrtValue.ortvalue_from_numpy(images[: args.batch], "cuda", 0)
        binding.bind_ortvalue_input("images", input_value)
        binding.bind_output("probs", "cuda", 0)

        def ort_run(batch, sess=sess, binding=binding):
            binding.synchronize_inputs()
            sess.run_with_iobinding(binding)
            binding.synchronize_outputs()

        results[f"ORT CUDA {precision} (IO binding)"] = images_per_second(
            ort_run, images, batch=args.batch, iters=args.iters, warmup=2
        )
    print(f"{'engine':32s} {'images/s':>9s} {'crops/s':>9s} {'TFLOP/s':>8s}")
    for name, rate in results.items():
        print(f"{name:32s} {rate:9.1f} {rate * CROPS_PER_IMAGE:9.1f} {rate * macs_per_image * 2 / 1e12:8.2f}")
    for precision in ("fp32", "fp16"):
        ratio = results[f"ORT CUDA {precision} (IO binding)"] / results[f"PyTorch eager {precision}"]
        print(f"ratio ORT CUDA {precision} / PyTorch eager {precision}: {ratio:.2f}")
    print(
        f"ratio ORT CUDA fp16 / ORT CUDA fp32: "
        f"{results['ORT CUDA fp16 (IO binding)'] / results['ORT CUDA fp32 (IO binding)']:.2f}"
    )
    return results


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cfg", default="D", choices=vgg.CONFIG_NAMES)
    parser.add_argument("--crop", type=int, default=224)
    parser.add_argument("--test-scale", type=int, default=None, metavar="Q", help="test scale Q (default: 256 for 224)")
    parser.add_argument("--batch", type=int, default=8, help="images per run (x5 crops)")
    parser.add_argument("--iters", type=int, default=3, help="timed runs per engine")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: physical cores, cgroup-aware)")
    parser.add_argument("--calibration", type=int, default=4, help="int8 calibration images (random)")
    parser.add_argument("--no-int8", action="store_true")
    parser.add_argument("--no-cuda", action="store_true")
    parser.add_argument("--no-cpu", action="store_true", help="skip the CPU engines (the GPU part only)")
    parser.add_argument(
        "--save-dir",
        type=Path,
        default=None,
        help="keep the exported graphs here (model.onnx, model.fp16.onnx) for bench/serve.py",
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    args.threads = args.threads or physical_cores()
    args.test_scale = args.test_scale or default_test_scale(args.crop)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = vgg.build(args.cfg, num_classes=1000, init="kaiming").eval()
    macs_per_crop = MACS_PER_CROP.get(args.cfg) if args.crop == 224 else None
    macs_per_crop = macs_per_crop or count_macs(model, args.crop)
    macs_per_image = macs_per_crop * CROPS_PER_IMAGE
    images = random_images(max(args.batch * 2, args.calibration), test_scale=args.test_scale, seed=1)
    fp32_peak, int8_peak, how = cpu_peak_gflops(args.threads)
    print(
        f"VGG-{args.cfg}, FiveCrop {args.crop} from {args.test_scale}x{args.test_scale}: "
        f"{macs_per_crop / 1e9:.2f} GMAC/crop, batch {args.batch}, {args.iters} timed runs, {args.threads} threads, "
        f"{platform.processor() or platform.machine()}"
    )
    print(
        f"torch {torch.__version__}, onnxruntime {ort.__version__}; CPU peak estimate: {fp32_peak:.0f} GFLOP/s fp32, "
        f"{int8_peak:.0f} GOP/s int8 = {how}"
    )

    with tempfile.TemporaryDirectory(prefix="vgg-bench-") as scratch:
        folder = args.save_dir or Path(scratch)
        folder.mkdir(parents=True, exist_ok=True)
        paths = {
            "fp32": export_graph(
                model, crop=args.crop, test_scale=args.test_scale, half=False, path=folder / "model.onnx"
            )
        }
        results = (
            {}
            if args.no_cpu
            else bench_cpu(model, paths, images, args=args, macs_per_image=macs_per_image, peaks=(fp32_peak, int8_peak))
        )
        cuda = "CUDAExecutionProvider" in ort.get_available_providers() and torch.cuda.is_available()
        if args.save_dir or (cuda and not args.no_cuda):
            paths["fp16"] = export_graph(
                model, crop=args.crop, test_scale=args.test_scale, half=True, path=folder / "model.fp16.onnx"
            )
        if cuda and not args.no_cuda:
            results |= bench_cuda(model, paths, images, args=args, macs_per_image=macs_per_image)
        else:
            print("\nno CUDA GPU (or no CUDA provider): GPU path skipped")
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "cfg": args.cfg,
                    "crop": args.crop,
                    "test_scale": args.test_scale,
                    "batch": args.batch,
                    "iters": args.iters,
                    "crops_per_image": CROPS_PER_IMAGE,
                    "gmac_per_crop": macs_per_crop / 1e9,
                    "threads": args.threads,
                    "torch": torch.__version__,
                    "onnxruntime": ort.__version__,
                    "images_per_s": {name: round(rate, 2) for name, rate in results.items()},
                },
                indent=2,
            )
            + "\n"
        )
    return 0


def bench_cpu(
    model, paths: dict[str, Path], images: np.ndarray, *, args, macs_per_image: float, peaks: tuple[float, float]
) -> dict[str, float]:
    """ORT CPU (fp32, int8) vs PyTorch eager on the CPU, with the share of the estimated peak."""
    if not args.no_int8:
        from export.quantize import quantize_int8

        paths["int8"] = quantize_int8(
            paths["fp32"], paths["fp32"].with_name("model.int8.onnx"), calibration_images=images[: args.calibration]
        )
    mean, std = IMAGENET_MEAN_RGB, IMAGENET_STD_RGB
    results = {
        "pytorch eager reference": images_per_second(
            lambda b: reference_probs(model, b, mean=mean, std=std, crop=args.crop, tta="five"),
            images,
            batch=args.batch,
            iters=args.iters,
        ),
    }
    eager = InferenceGraph(model, mean=mean, std=std, crop=args.crop, test_scale=args.test_scale, tta="five").eval()

    def eager_run(batch):
        with torch.inference_mode():
            eager(torch.from_numpy(batch))

    results["pytorch eager batched graph"] = images_per_second(eager_run, images, batch=args.batch, iters=args.iters)
    for precision in [name for name in ("fp32", "int8") if name in paths]:
        sess = cpu_session(paths[precision], args.threads)
        results[f"ORT CPU {precision}"] = images_per_second(
            lambda b, sess=sess: sess.run(None, {"images": b}), images, batch=args.batch, iters=args.iters
        )

    fp32_peak, int8_peak = peaks
    print(f"\n{'engine':32s} {'images/s':>9s}  {'GFLOP/s':>8s}  {'of peak':>7s}")
    for name, rate in results.items():
        gflops = rate * macs_per_image * 2 / 1e9
        peak = int8_peak if "int8" in name else fp32_peak
        print(f"{name:32s} {rate:9.2f}  {gflops:8.1f}  {gflops / peak:7.1%}")
    reference = results["pytorch eager reference"]
    print(f"\nratio ORT fp32 / PyTorch eager reference: {results['ORT CPU fp32'] / reference:.2f} (target >= 2.0)")
    batched = results["ORT CPU fp32"] / results["pytorch eager batched graph"]
    print(f"ratio ORT fp32 / PyTorch eager batched:   {batched:.2f}")
    if "ORT CPU int8" in results:
        print(
            f"ratio ORT int8 / ORT fp32:                {results['ORT CPU int8'] / results['ORT CPU fp32']:.2f} "
            f"(target >= 2.5 with AVX512-VNNI)"
        )
    return results


if __name__ == "__main__":
    raise SystemExit(main())
