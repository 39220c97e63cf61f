"""The CUDA paths, end to end: ONNX Runtime's CUDA engine against the CPU engine, the service
with ``VGG_REQUIRE_GPU=1``, a bf16 + channels_last training step, torchrun with NCCL, resume
and dense evaluation on the GPU.

Marked ``gpu``: skipped without a CUDA GPU. ``bench/gpu_check.sh --dry-run`` runs them on the
CPU (``VGG_CHECK_DEVICE=cpu``: ORT's CPU provider, gloo, the CPU's bf16) so that this file
cannot rot on machines without a GPU.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import vgg
from bench.launch import bentoml_serve_command, free_port, running_server
from serving.engine import Engine, ModelFiles, resolve_model
from tests.export_helpers import peaky_model, write_checkpoint
from tests.helpers import REPO_ROOT, repo_env, run_module
from tests.training_helpers import TINY_TRAINING
from vgg.preprocessing import open_rgb, to_graph_input

pytestmark = pytest.mark.gpu

CLASSES = [f"class_{index}" for index in range(10)]
TINY = TINY_TRAINING  # with the bf16 autocast each test asks for


@pytest.fixture(scope="module")
def device() -> torch.device:
    """``cuda``, or what ``VGG_CHECK_DEVICE`` names (the dry run: ``cpu``)."""
    return torch.device(os.environ.get("VGG_CHECK_DEVICE", "cuda"))


@pytest.fixture(scope="module")
def real_jpegs() -> list[Path]:
    """Real photos: Imagenette (a few per class) and the non-square photos, when present."""
    shared = REPO_ROOT.parent / "shared" / "data"
    gpu_subset = REPO_ROOT / ".gpu" / "send-1" / "data"  # what bench/gpu_pack.sh ships to a GPU machine
    roots = [root for root in (gpu_subset, shared) if root.is_dir()]
    if not roots:
        pytest.skip(f"no real images at {shared} or {gpu_subset}")
    files = sorted(roots[0].glob("imagenette/train/*/*.JPEG"))[::40][:48] + sorted(roots[0].glob("photos/*.jpg"))
    if not files:
        pytest.skip(f"no JPEGs under {roots[0]}")
    return files


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A peaky 10-class VGG-A: its top-1 is far from ties on most images."""
    root = tmp_path_factory.mktemp("gpu-model")
    return write_checkpoint(root / "best.pt", peaky_model(num_classes=len(CLASSES)), classes=CLASSES)


@pytest.fixture(scope="module")
def graphs(checkpoint) -> ModelFiles:
    """The checkpoint exported twice (fp32, fp16) as bare .onnx files, as one model."""
    from export import export_checkpoint

    fp32 = export_checkpoint(checkpoint, tta="five", register=False, out=checkpoint.with_name("model.onnx"))
    fp16 = export_checkpoint(
        checkpoint, tta="five", precision="fp16", register=False, out=checkpoint.with_name("model.fp16.onnx")
    )
    return dataclasses.replace(
        resolve_model(str(fp32.onnx_path)), graphs={"fp32": fp32.onnx_path, "fp16": fp16.onnx_path}
    )


def decisive(probs: np.ndarray, margin: float = 0.05) -> np.ndarray:
    """Images whose top-1 beats the runner-up by ``margin``: their label cannot flip by rounding."""
    top2 = np.sort(probs, axis=1)[:, -2:]
    return (top2[:, 1] - top2[:, 0]) >= margin


def test_cuda_engine_matches_the_cpu_engine(graphs, real_jpegs, device):
    images = np.stack([to_graph_input(open_rgb(path), graphs.test_scale) for path in real_jpegs])
    cpu = Engine(graphs, device="cpu", precision="fp32", intra_op_threads=2)
    expected = cpu.run(images)
    fp32 = Engine(graphs, device=device.type, precision="fp32")
    assert fp32.on_gpu == (device.type == "cuda"), fp32.provider
    np.testing.assert_allclose(fp32.run(images), expected, rtol=0, atol=1e-4)
    fp32.warm_up([8, 64])  # on the GPU: padded to a warmed-up size, IO binding
    np.testing.assert_allclose(fp32.run(images[:5]), expected[:5], rtol=0, atol=1e-4)

    fp16 = Engine(graphs, device=device.type)  # auto: fp16 on CUDA (fp32 on the CPU of a dry run)
    assert fp16.precision == ("fp16" if device.type == "cuda" else "fp32")
    half = fp16.run(images)
    assert half.dtype == np.float32 and np.isfinite(half).all()
    sure = decisive(expected)
    assert sure.mean() > 0.5, "the test model should be confident on most images"
    np.testing.assert_array_equal(half.argmax(1)[sure], expected.argmax(1)[sure])


def test_service_on_the_gpu_answers_like_the_cpu_engine(checkpoint, graphs, real_jpegs, device, tmp_path):
    """A model registered with fp32 + fp16 graphs; ``bentoml serve`` with ``VGG_REQUIRE_GPU=1``
    serves the fp16 graph on CUDA; its labels for real JPEGs are the CPU engine's (fp32)."""
    cpu = Engine(graphs, device="cpu", precision="fp32", intra_op_threads=2)
    expected = cpu.run(np.stack([to_graph_input(open_rgb(path), graphs.test_scale) for path in real_jpegs]))
    env = repo_env(BENTOML_HOME=str(tmp_path / "bentoml"), VGG_REQUIRE_GPU="1" if device.type == "cuda" else "0")
    env.pop("VGG_MODEL", None)
    exported = run_module("export", "--checkpoint", str(checkpoint), "--precision", "fp16", env=env, timeout=600)
    assert exported.returncode == 0, exported.stderr[-2000:]
    port = free_port()
    log = tmp_path / "server.log"
    with running_server(bentoml_serve_command(port), port=port, env=env, log_path=log, timeout_s=300) as (url, _):
        with httpx.Client(base_url=url, timeout=120) as client:
            answers = [
                client.post("/classify", files={"image": (path.name, path.read_bytes(), "image/jpeg")})
                for path in real_jpegs
            ]
    assert [answer.status_code for answer in answers] == [200] * len(answers)
    labels = np.array([CLASSES.index(answer.json()["label"]) for answer in answers])
    sure = decisive(expected)
    np.testing.assert_array_equal(labels[sure], expected.argmax(1)[sure])
    if device.type == "cuda":
        text = log.read_text(errors="replace")
        assert "fp16 graph on CUDAExecutionProvider" in text, text[-3000:]


def test_bf16_channels_last_training_steps_lower_the_loss(device):
    from training.epoch import train_one_epoch

    torch.manual_seed(0)
    model = vgg.build("A", num_classes=4, fc_width=64, dropout=0.0, init="kaiming").to(device)
    model = model.to(memory_format=torch.channels_last)
    images, labels = torch.randn(16, 3, 32, 32), torch.arange(16) % 4
    with torch.no_grad():
        before = F.cross_entropy(model.eval()(images.to(device)), labels.to(device)).item()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9, weight_decay=5e-4)
    stats = train_one_epoch(
        model,
        [(images, labels)] * 8,
        optimizer,
        device=device,
        amp=True,
        channels_last=True,
        epoch=1,
        show_progress=False,
    )
    with torch.no_grad():
        after = F.cross_entropy(model.eval()(images.to(device)), labels.to(device)).item()
    assert np.isfinite(stats.loss) and after < before


def run_training(args: list[str], tmp_path: Path, *, torchrun: bool = False) -> subprocess.CompletedProcess:
    launcher = ("torch.distributed.run", "--standalone", "--nproc-per-node", "1", "-m") if torchrun else ()
    env = repo_env(VGG_CACHE=str(tmp_path / "cache"), BENTOML_HOME=str(tmp_path / "bentoml"))
    return run_module(*launcher, "training.run", *args, env=env, timeout=600)


def test_torchrun_one_process_runs_an_epoch_with_a_process_group(tiny_data, tmp_path, device):
    out = tmp_path / "run"
    result = run_training(
        [*TINY, "--data", str(tiny_data), "--epochs", "1", "--amp", "--device", device.type, "--out", str(out)],
        tmp_path,
        torchrun=True,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    backend = "nccl" if device.type == "cuda" else "gloo"
    assert f"device {device.type}" in result.stderr and f"(process group: {backend})" in result.stderr
    assert len((out / "metrics.csv").read_text().splitlines()) == 2  # header + one epoch


def test_resume_on_the_device_continues(tiny_data, tmp_path, device):
    out = tmp_path / "run"
    common = [*TINY, "--data", str(tiny_data), "--amp", "--device", device.type, "--out", str(out)]
    first = run_training([*common, "--epochs", "1"], tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    second = run_training(["--resume", "--out", str(out), "--epochs", "2", "--device", device.type], tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resuming" in second.stderr
    assert len((out / "metrics.csv").read_text().splitlines()) == 3  # header + two epochs


def test_dense_evaluation_on_the_device_equals_the_fc_net(device):
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.manual_seed(0)
    model = vgg.build("A", num_classes=5, fc_width=32, init="kaiming").to(device).eval()
    dense = vgg.to_dense(model, crop=64)
    images = torch.randn(3, 3, 64, 64, device=device)
    with torch.no_grad():
        torch.testing.assert_close(dense(images), model(images), rtol=1e-4, atol=1e-4)
        assert dense(torch.randn(1, 3, 96, 128, device=device)).shape == (1, 5)  # larger than the crop
