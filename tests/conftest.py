"""Shared fixtures: the optional real data set, a fresh BentoML model store per test; tests
marked ``gpu`` skip without a CUDA GPU."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
IMAGENETTE_ROOT = REPO_ROOT.parent / "shared" / "data" / "imagenette"


@pytest.fixture(scope="session")
def imagenette_train() -> Path:
    """``../shared/data/imagenette/train``; skips the test when the data set is absent."""
    train = IMAGENETTE_ROOT / "train"
    if not train.is_dir():
        pytest.skip(f"real data not found at {train} (shared/data/imagenette is optional)")
    return train


@pytest.fixture
def bentoml_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty BentoML home for this test (``$BENTOML_HOME``), no ``$VGG_MODEL``, no usage tracking."""
    home = tmp_path / "bentoml"
    monkeypatch.setenv("BENTOML_HOME", str(home))
    monkeypatch.setenv("BENTOML_DO_NOT_TRACK", "True")
    monkeypatch.delenv("VGG_MODEL", raising=False)
    return home


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
