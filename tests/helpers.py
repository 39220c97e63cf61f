"""Helpers for every kind of test: the repository's root, a child process's environment, and
running one of the project's modules as its command line does."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def repo_env(**extra: str) -> dict[str, str]:
    """This process's environment with the repository first on ``PYTHONPATH`` and BentoML's
    usage tracking off, plus ``extra`` (e.g. ``BENTOML_HOME``, ``VGG_CACHE``)."""
    path = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path, "BENTOML_DO_NOT_TRACK": "True", **extra}


def run_module(
    module: str, *args: str, env: dict[str, str] | None = None, timeout: float = 300
) -> subprocess.CompletedProcess:
    """``python -m module args`` from the repository's root, its output captured as text."""
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=REPO_ROOT,
        env=env if env is not None else repo_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
