"""Shared fixtures: the optional real data set, a tiny training folder, and an empty BentoML
model store per test; tests marked ``gpu`` skip without a CUDA GPU.

BentoML reads ``$BENTOML_HOME`` once per process, so the whole test run gets one temporary
home, set before any test imports BentoML (never the user's ``~/bentoml``); the
``bentoml_home`` fixture empties its model store around a test.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
IMAGENETTE_ROOT = REPO_ROOT.parent / "shared" / "data" / "imagenette"

_HOME: Path | None = None


def pytest_configure(config: pytest.Config) -> None:
    global _HOME
    _HOME = Path(tempfile.mkdtemp(prefix="vgg-tests-bentoml-"))
    os.environ["BENTOML_HOME"] = str(_HOME)
    os.environ["BENTOML_DO_NOT_TRACK"] = "True"


def pytest_unconfigure(config: pytest.Config) -> None:
    if _HOME is not None:
        shutil.rmtree(_HOME, ignore_errors=True)


@pytest.fixture(scope="session")
def imagenette_train() -> Path:
    """``../shared/data/imagenette/train``; skips the test when the data set is absent."""
    train = IMAGENETTE_ROOT / "train"
    if not train.is_dir():
        pytest.skip(f"real data not found at {train} (shared/data/imagenette is optional)")
    return train


@pytest.fixture
def tiny_data(tmp_path) -> Path:
    """A training folder for the tiny runs (``tests.training_helpers.TINY_TRAINING``): three
    classes of generated shapes, 32 training images each (6 steps of 16 per epoch) and a
    ``val/`` folder of 4 each."""
    from tests.training_helpers import write_folder

    root = tmp_path / "data"
    write_folder(root / "train", {"disc": 32, "square": 32, "triangle": 32}, size=40)
    write_folder(root / "val", {"disc": 4, "square": 4, "triangle": 4}, size=40)
    return root


def _empty_model_store(home: Path) -> None:
    import bentoml

    for model in bentoml.models.list():
        bentoml.models.delete(model.tag)
    shutil.rmtree(home / "models", ignore_errors=True)
    (home / "models").mkdir(parents=True, exist_ok=True)


@pytest.fixture
def bentoml_home(monkeypatch: pytest.MonkeyPatch) -> Path:
    """The test run's BentoML home with an empty model store, and no ``$VGG_MODEL``."""
    assert _HOME is not None
    monkeypatch.setenv("BENTOML_HOME", str(_HOME))
    monkeypatch.delenv("VGG_MODEL", raising=False)
    _empty_model_store(_HOME)
    yield _HOME
    _empty_model_store(_HOME)


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    """``@pytest.mark.gpu`` tests skip, with the reason, on a machine without a CUDA GPU,
    unless ``VGG_CHECK_DEVICE=cpu`` (``bench/gpu_check.sh --dry-run``) runs them on the CPU."""
    if _cuda_available() or os.environ.get("VGG_CHECK_DEVICE") == "cpu":
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (none visible to torch)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
