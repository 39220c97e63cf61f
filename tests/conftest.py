"""Shared fixtures: the optional real data set and a torch thread limit for the 2-core CI."""

from __future__ import annotations

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
