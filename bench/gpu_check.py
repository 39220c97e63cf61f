"""GPU acceptance check: the CUDA paths' correctness (pytest ``-m gpu``) and speed, in one report.

Run through ``bash bench/gpu_check.sh`` (which installs carried wheels first). Each step writes
``runs/gpu-check/<step>.json``; a step already done is not run again, so the check can be spread
over several short commands (``--steps``) while its files travel to the GPU machine, and the
last command writes ``gpu_check.md`` and ``gpu_check.json`` with every step. ``--dry-run`` runs
every step on the CPU at toy size (ORT's CPU provider, a tiny model, a few images).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
SENT_DATA = REPO_ROOT / ".gpu" / "send-1" / "data"  # the images bench/gpu_pack.sh ships
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


@dataclass(frozen=True)
class Context:
    out: Path
    dry_run: bool
    data: Path | None  # a folder with imagenette/train/<class>/ and photos/

    @property
    def device(self) -> str:
        return "cpu" if self.dry_run else "cuda"

    def env(self, **extra: str) -> dict[str, str]:
        path = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
        return {
            **os.environ,
            "PYTHONPATH": path,
            "BENTOML_DO_NOT_TRACK": "True",
            "PYTHONUNBUFFERED": "1",
            "VGG_CHECK_DEVICE": self.device,
            **extra,
        }


@dataclass
class StepResult:
    name: str
    title: str
    ok: bool
    seconds: float
    command: str
    figures: dict
    tail: str
    reason: str = ""


def run(
    ctx: Context,
    name: str,
    title: str,
    command: list[str],
    *,
    timeout: int,
    figures_file: Path | None = None,
    env: dict[str, str] | None = None,
) -> StepResult:
    """Run ``command`` (output to ``<out>/<name>.log``); its figures from ``figures_file``."""
    log = ctx.out / f"{name}.log"
    print(f"== {name}: {' '.join(command)}", flush=True)
    started = time.perf_counter()
    try:
        with open(log, "w") as handle:
            code = subprocess.run(
                command, cwd=REPO_ROOT, env=env or ctx.env(), stdout=handle, stderr=subprocess.STDOUT, timeout=timeout
            ).returncode
        reason = "" if code == 0 else f"exit code {code}"
    except subprocess.TimeoutExpired:
        code, reason = -1, f"timed out after {timeout} s"
    seconds = time.perf_counter() - started
    text = log.read_text(errors="replace")
    figures = {}
    if figures_file is not None and figures_file.exists():
        figures = json.loads(figures_file.read_text())
    return StepResult(
        name,
        title,
        code == 0,
        round(seconds, 1),
        " ".join(command),
        figures,
        "\n".join(text.splitlines()[-40:]),
        reason,
    )


def python(*args: str) -> list[str]:
    return [sys.executable, *args]


# ---------------------------------------------------------------- steps


def step_machine(ctx: Context) -> StepResult:
    code = (
        "import json, os, platform, torch, torchvision; print(json.dumps({'python': platform.python_version(), "
        "'torch': torch.__version__, 'torchvision': torchvision.__version__, 'cuda': torch.version.cuda, "
        "'cudnn': torch.backends.cudnn.version(), 'gpu': torch.cuda.get_device_name(0) "
        "if torch.cuda.is_available() else None, 'cpus': os.cpu_count(), 'cpu': platform.processor()}))"
    )
    result = run(ctx, "machine", "Machine and versions", python("-c", code), timeout=120)
    if result.ok:
        result.figures = json.loads(result.tail.splitlines()[-1])
        if shutil.which("nvidia-smi"):
            smi = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=60)
            result.tail = smi.stdout.strip()
            query = subprocess.run(
                ["nvidia-smi", "--query-gpu=name,memory.total,driver_version,clocks.max.sm", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=60,
            )
            result.figures["nvidia_smi"] = query.stdout.strip()
        if not ctx.dry_run and not result.figures.get("gpu"):
            result.ok, result.reason = False, "torch sees no CUDA device"
    return result


def step_torch_tests(ctx: Context) -> StepResult:
    command = python(
        "-m",
        "pytest",
        "tests/test_gpu.py",
        "-m",
        "gpu",
        "-k",
        "not engine and not service",
        "-q",
        "-p",
        "no:cacheprovider",
        "-o",
        "addopts=-ra",
    )
    return run(ctx, "torch-tests", "Correctness: training on the device (pytest -m gpu)", command, timeout=900)


def step_train_speed(ctx: Context) -> StepResult:
    figures = ctx.out / "train-speed.figures.json"
    if ctx.dry_run:
        size = ["--batch", "2", "--size", "32", "--steps", "1", "--rounds", "1", "--workers", "1"]
    else:
        workers = str(max(1, min(14, (os.cpu_count() or 2) - 2)))
        size = ["--batch", "64", "--size", "224", "--steps", "12", "--rounds", "3", "--workers", workers]
    data = ["--data", str(ctx.data / "imagenette" / "train")] if ctx.data else []
    command = python("bench/train_throughput.py", *size, *data, "--json", str(figures))
    return run(
        ctx,
        "train-speed",
        "Speed: training VGG-D (bf16, channels_last), JPEG loader vs in-memory batches",
        command,
        timeout=900,
        figures_file=figures,
    )


def step_ort(ctx: Context) -> StepResult:
    code = (
        "import json, onnxruntime as ort; from serving.cuda import cuda_problem, preload_cuda_libraries; "
        "print(json.dumps({'onnxruntime': ort.__version__, 'file': ort.__file__, "
        "'providers': ort.get_available_providers(), 'preloaded': list(preload_cuda_libraries()), "
        "'cuda_problem': cuda_problem()}))"
    )
    result = run(ctx, "ort", "ONNX Runtime and its CUDA provider", python("-c", code), timeout=300)
    if result.ok:
        result.figures = json.loads(result.tail.splitlines()[-1])
        problem = result.figures.get("cuda_problem")
        if problem and not ctx.dry_run:
            result.ok, result.reason = False, f"ONNX Runtime's CUDA provider is not usable: {problem}"
    return result


def step_ort_tests(ctx: Context) -> StepResult:
    command = python(
        "-m",
        "pytest",
        "tests/test_gpu.py",
        "tests/test_cuda.py",
        "-m",
        "gpu",
        "-k",
        "engine or service or without_torch",
        "-q",
        "-p",
        "no:cacheprovider",
        "-o",
        "addopts=-ra",
    )
    return run(
        ctx,
        "ort-tests",
        "Correctness: ORT CUDA engine and the service on the GPU (pytest -m gpu)",
        command,
        timeout=900,
    )


def step_engine_speed(ctx: Context) -> StepResult:
    figures = ctx.out / "engine-speed.figures.json"
    size = (
        ["--cfg", "A", "--crop", "32", "--batch", "2", "--iters", "1"]
        if ctx.dry_run
        else ["--cfg", "D", "--batch", "32", "--iters", "10", "--no-cpu"]
    )
    command = python(
        "bench/inference.py", *size, "--no-int8", "--save-dir", str(ctx.out / "model"), "--json", str(figures)
    )
    return run(
        ctx,
        "engine-speed",
        "Speed: the exported VGG-D FiveCrop graph, ORT CUDA (IO binding) vs PyTorch",
        command,
        timeout=900,
        figures_file=figures,
    )


def step_serve_speed(ctx: Context) -> StepResult:
    figures = ctx.out / "serve-speed.figures.json"
    graph = ctx.out / "model" / ("model.onnx" if ctx.dry_run else "model.fp16.onnx")
    load = (
        ["--concurrency", "1", "4", "--requests", "8", "--time-limit", "30"]
        if ctx.dry_run
        else ["--concurrency", "1", "32", "128", "--requests", "384", "--time-limit", "20"]
    )
    images = ["--images", str(ctx.data / "imagenette" / "train")] if ctx.data else []
    logs = ctx.out / "serve-logs"
    logs.mkdir(exist_ok=True)
    precision = ["--precisions", "fp32" if ctx.dry_run else "fp16"]
    targets = ["--targets", "service", "naive", "engine"]
    command = python(
        "bench/serve.py",
        "--model",
        str(graph),
        *precision,
        *targets,
        *images,
        *load,
        "--json",
        str(figures),
        "--log-dir",
        str(logs),
    )
    env = ctx.env(VGG_REQUIRE_GPU="0" if ctx.dry_run else "1")
    return run(
        ctx,
        "serve-speed",
        "Speed: the service over HTTP with real JPEGs vs the raw engine and a naive server",
        command,
        timeout=900,
        figures_file=figures,
        env=env,
    )


STEPS: dict[str, Callable[[Context], StepResult]] = {
    "machine": step_machine,
    "torch-tests": step_torch_tests,
    "train-speed": step_train_speed,
    "ort": step_ort,
    "ort-tests": step_ort_tests,
    "engine-speed": step_engine_speed,
    "serve-speed": step_serve_speed,
}
STOP_ON_FAILURE = {"machine", "ort"}  # nothing after them can run


# ---------------------------------------------------------------- report


def load(ctx: Context, name: str) -> StepResult | None:
    path = ctx.out / f"{name}.json"
    return StepResult(**json.loads(path.read_text())) if path.exists() else None


def section(result: StepResult) -> str:
    status = "passed" if result.ok else f"FAILED ({result.reason})"
    lines = [f"## {result.title}", "", f"`{result.command}`: {status}, {result.seconds:.0f} s", ""]
    if result.figures:
        lines += ["```json", json.dumps(result.figures, indent=2), "```", ""]
    lines += ["<details><summary>output (last lines)</summary>", "", "```", result.tail, "```", "", "</details>", ""]
    return "\n".join(lines)


def write_report(ctx: Context) -> Path:
    results = [result for name in STEPS if (result := load(ctx, name)) is not None]
    mode = "DRY RUN on the CPU (toy sizes)" if ctx.dry_run else "on the GPU"
    header = [
        f"# GPU check ({mode})",
        "",
        f"Written {time.strftime('%Y-%m-%d %H:%M:%S %Z')} by "
        f"`bash bench/gpu_check.sh{' --dry-run' if ctx.dry_run else ''}`; host CPU: "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; data: {ctx.data or 'none'}.",
        "",
        "| step | status | seconds |",
        "| --- | --- | --- |",
    ]
    header += [f"| {r.name} | {'passed' if r.ok else 'FAILED'} | {r.seconds:.0f} |" for r in results]
    missing = [name for name in STEPS if load(ctx, name) is None]
    if missing:
        header += ["", f"Not run: {', '.join(missing)}."]
    report = ctx.out / "gpu_check.md"
    report.write_text("\n".join(header + [""] + [section(r) for r in results]))
    (ctx.out / "gpu_check.json").write_text(
        json.dumps({"dry_run": ctx.dry_run, "steps": [vars(r) for r in results], "not_run": missing}, indent=2) + "\n"
    )
    if os.environ.get("OUT"):  # a device machine's result folder: the report and logs travel back
        for path in [ctx.out / "gpu_check.md", ctx.out / "gpu_check.json", *sorted(ctx.out.glob("serve-logs/*.log"))]:
            shutil.copy(path, Path(os.environ["OUT"]) / path.name)
    return report


# ---------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="every step on the CPU at toy size")
    parser.add_argument("--steps", default=",".join(STEPS), help=f"comma-separated subset of {','.join(STEPS)}")
    parser.add_argument("--out", type=Path, default=None, help="default: runs/gpu-check (dry run: runs/gpu-check-dry)")
    parser.add_argument(
        "--data",
        type=Path,
        default=None,
        help="folder with imagenette/train and photos (default: .gpu/send-1/data, else ../shared/data)",
    )
    parser.add_argument("--fresh", action="store_true", help="run steps again even if they are done")
    args = parser.parse_args(argv)
    unknown = set(args.steps.split(",")) - set(STEPS)
    if unknown:
        parser.error(f"unknown steps: {', '.join(sorted(unknown))}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = args.out or REPO_ROOT / "runs" / ("gpu-check-dry" if args.dry_run else "gpu-check")
    out.mkdir(parents=True, exist_ok=True)
    data = args.data or next((d for d in (SENT_DATA, SHARED_DATA) if (d / "imagenette" / "train").is_dir()), None)
    ctx = Context(out=out.resolve(), dry_run=args.dry_run, data=data)
    failed = False
    for name in args.steps.split(","):
        done = load(ctx, name)
        if done is not None and done.ok and not args.fresh:
            print(f"== {name}: done earlier ({done.seconds:.0f} s)")
            continue
        result = STEPS[name](ctx)
        (ctx.out / f"{name}.json").write_text(json.dumps(vars(result), indent=2) + "\n")
        print(
            f"== {name}: {'passed' if result.ok else 'FAILED: ' + result.reason} ({result.seconds:.0f} s)", flush=True
        )
        failed |= not result.ok
        write_report(ctx)  # after every step: a command stopped at its time limit still leaves one
        if not result.ok and name in STOP_ON_FAILURE:
            print(f"error: {result.reason}\n{result.tail}", file=sys.stderr)
            break
    report = write_report(ctx)
    print(f"report: {report}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
