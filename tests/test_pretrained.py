"""torchvision's VGG weights, exported and served, against torchvision's own evaluation pipeline.

Random-weight torchvision ``vgg16_bn`` (``.safetensors``, served over HTTP) and ``vgg11``
(``.pth``, its exported graph run on the service's preprocessing) go through
``python -m export --checkpoint FILE --tta center``; on real photos of several aspect ratios the
probabilities must equal ``Resize(256)``, ``CenterCrop(224)``, ``ToTensor``, ``Normalize`` (ImageNet
mean/std), the torchvision model and softmax: top-1 identical, every probability within 1e-3, and
the label an ImageNet class name.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import pytest
import torch
import torchvision
from PIL import Image
from safetensors.torch import save_file
from torchvision import transforms

from bench.launch import REPO_ROOT, bentoml_serve_command, free_port, running_server
from tests.helpers import repo_env, run_module
from vgg.preprocessing import open_rgb, to_graph_input

pytestmark = pytest.mark.slow

PHOTOS = REPO_ROOT.parent / "shared" / "data" / "photos"
TOLERANCE = 1e-3
WEIGHTS = torchvision.models.VGG16_Weights.IMAGENET1K_V1  # metadata only: nothing is downloaded
# Random torchvision weights give nearly uniform probabilities (all about 1e-3); a 40x last layer
# spreads them (vgg11: top-1 0.02 to 0.15 on the photos) so that a resize one pixel off shows:
# with the long side rounded instead of truncated, vgg11's probabilities move by up to 2.4e-2 and
# one photo's top-1 changes.
HEAD_GAIN = 40.0


@pytest.fixture(scope="module")
def photos() -> list[Path]:
    files = sorted(PHOTOS.glob("*.jpg"))
    if not files:
        pytest.skip(f"real photos not found at {PHOTOS} (shared/data/photos is optional)")
    return files


def random_torchvision_vgg(name: str, *, seed: int) -> torch.nn.Module:
    """torchvision's ``name`` with its own random initialisation, a spread-out head and (with
    BatchNorm) non-trivial running statistics."""
    torch.manual_seed(seed)
    model = getattr(torchvision.models, name)(weights=None)
    with torch.no_grad():
        model.classifier[6].weight.mul_(HEAD_GAIN)
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.8, 1.25)
    return model.eval()


@torch.no_grad()
def torchvision_probs(model: torch.nn.Module, files: list[Path]) -> np.ndarray:
    """torchvision's evaluation pipeline for its ImageNet weights (PIL path, as its references)."""
    preset = WEIGHTS.transforms()
    pipeline = transforms.Compose(
        [
            transforms.Resize(preset.resize_size[0]),
            transforms.CenterCrop(preset.crop_size[0]),
            transforms.ToTensor(),
            transforms.Normalize(preset.mean, preset.std),
        ]
    )
    batch = torch.stack([pipeline(Image.open(path).convert("RGB")) for path in files])
    return torch.softmax(model(batch).double(), dim=1).numpy()


def export(checkpoint: Path, *, home: Path, out: Path, register: bool) -> subprocess.CompletedProcess:
    flags = ("--tta", "center", "--out", str(out), *([] if register else ["--no-register"]))
    return run_module(
        "export", "--checkpoint", str(checkpoint), *flags, env=repo_env(BENTOML_HOME=str(home)), timeout=900
    )


def assert_same_as_torchvision(probs: np.ndarray, expected: np.ndarray) -> None:
    assert probs.shape == expected.shape == (len(expected), 1000)
    np.testing.assert_array_equal(probs.argmax(axis=1), expected.argmax(axis=1))
    assert np.abs(probs - expected).max() <= TOLERANCE


def test_torchvision_vgg11_pth_exports_to_torchvisions_pipeline(tmp_path, photos):
    model = random_torchvision_vgg("vgg11", seed=0)
    weights = tmp_path / "vgg11.pth"
    torch.save(model.state_dict(), weights)
    result = export(weights, home=tmp_path / "bentoml", out=tmp_path / "vgg11.onnx", register=False)
    assert result.returncode == 0, result.stderr[-2000:]
    session = ort.InferenceSession(str(tmp_path / "vgg11.onnx"), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape[1:] == [256, 256, 3]
    graph_inputs = np.stack([to_graph_input(open_rgb(path), 256) for path in photos])  # the service's preprocessing
    probs = np.concatenate([session.run(None, {"images": graph_inputs[i : i + 1]})[0] for i in range(len(photos))])
    assert_same_as_torchvision(probs.astype(np.float64), torchvision_probs(model, photos))


@pytest.fixture(scope="module")
def served_vgg16_bn(tmp_path_factory, photos):
    """A random torchvision vgg16_bn saved as .safetensors, exported, registered and served."""
    root = tmp_path_factory.mktemp("pretrained")
    model = random_torchvision_vgg("vgg16_bn", seed=1)
    weights = root / "vgg16_bn.safetensors"
    save_file(model.state_dict(), str(weights))
    expected = torchvision_probs(model, photos)
    del model
    home = root / "bentoml"
    result = export(weights, home=home, out=root / "vgg16_bn.onnx", register=True)
    assert result.returncode == 0, result.stderr[-2000:]
    # a full VGG-16 on a 2-core CI machine: warm up batches of 1 and 2 only, and never shed load
    env = repo_env(BENTOML_HOME=str(home), VGG_MAX_BATCH_SIZE="2", VGG_MAX_LATENCY_MS="600000")
    env.pop("VGG_MODEL", None)
    port = free_port()
    with running_server(
        bentoml_serve_command(port), port=port, env=env, log_path=root / "server.log", timeout_s=600
    ) as (url, _):
        with httpx.Client(base_url=url, timeout=120.0) as client:
            yield {"client": client, "expected": expected}


def test_torchvision_vgg16_bn_safetensors_is_served_as_torchvision_computes_it(served_vgg16_bn, photos):
    client, expected = served_vgg16_bn["client"], served_vgg16_bn["expected"]
    probs = np.full(expected.shape, np.nan)
    labels = []
    for row, path in enumerate(photos):
        response = client.post("/classify", files={"image": (path.name, path.read_bytes())}, data={"top_k": "1000"})
        assert response.status_code == 200, response.text
        answer = response.json()
        for entry in answer["top"]:
            probs[row, entry["index"]] = entry["score"]
        labels.append((answer["index"], answer["label"]))
    assert_same_as_torchvision(probs, expected)
    categories = WEIGHTS.meta["categories"]
    assert all(label == categories[index] for index, label in labels)
