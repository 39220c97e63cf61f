"""The project's own set-up: supported Python versions, wheels for every pin, the Makefile's interpreter."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from packaging import tags
from packaging.utils import parse_wheel_filename
from packaging.version import Version

REPO_ROOT = Path(__file__).resolve().parents[1]
PYTHON_VERSIONS = ("3.11", "3.12")
PIN = re.compile(r"^([A-Za-z0-9_.-]+)==([A-Za-z0-9_.+!-]+)$")


def pins() -> dict[str, str]:
    """Every exact pin of pyproject.toml: dependencies and all extras."""
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    requirements = project["dependencies"] + [r for extra in project["optional-dependencies"].values() for r in extra]
    found = {m.group(1).lower(): m.group(2) for r in requirements if (m := PIN.match(r.split(";")[0].strip()))}
    assert len(found) == len(set(requirements)), "every requirement is pinned with =="
    return found


def test_requires_python_admits_311_and_312():
    requires = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    assert requires == ">=3.11"


INDEX_URL = os.environ.get("PIP_INDEX_URL", "https://pypi.org/simple/").rstrip("/")


def _wheel_files(name: str) -> list[str]:
    """File names of ``name`` on the package index (its PEP 691 JSON page): no wheel is downloaded."""
    request = urllib.request.Request(f"{INDEX_URL}/{name}/", headers={"Accept": "application/vnd.pypi.simple.v1+json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return [entry["filename"] for entry in json.load(response)["files"] if entry["filename"].endswith(".whl")]


def _supported_tags(python: str) -> set[tags.Tag]:
    """The wheel tags pip accepts on this platform for ``--python-version python`` (CPython)."""
    version = tuple(int(part) for part in python.split("."))
    interpreter = f"cp{version[0]}{version[1]}"
    return set(tags.cpython_tags(version)) | set(tags.compatible_tags(version, interpreter))


@pytest.fixture(scope="module")
def package_index() -> None:
    """Skips the test when the package index does not answer (an offline machine)."""
    try:
        _wheel_files("pip")
    except (OSError, ValueError) as error:
        pytest.skip(f"package index {INDEX_URL} not reachable ({error}): cannot look up wheels")


def test_every_pin_has_a_wheel_for_python_311_and_312(package_index):
    """What ``pip download --only-binary=:all: --python-version V --no-deps NAME==VERSION`` would
    find, asked of the index pages: the torch and onnxruntime-gpu wheels are hundreds of MB each."""
    pinned = pins()
    with ThreadPoolExecutor(max_workers=len(pinned)) as pool:
        files = dict(zip(pinned, pool.map(_wheel_files, pinned), strict=True))
    missing = []
    for python in PYTHON_VERSIONS:
        supported = _supported_tags(python)
        for name, version in sorted(pinned.items()):
            wheels = [parse_wheel_filename(file) for file in files[name]]
            if not any(found == Version(version) and wheel_tags & supported for _, found, _, wheel_tags in wheels):
                missing.append(f"{name}=={version} (Python {python})")
    assert not missing, f"no wheel for this platform: {', '.join(missing)}"


def _fake_python(folder: Path, name: str, *, new_enough: bool) -> None:
    """``folder/name``: this interpreter, or a stand-in that answers like Python 3.10."""
    if new_enough:
        (folder / name).symlink_to(sys.executable)
    else:
        (folder / name).write_text("#!/bin/sh\nexit 1\n")
        (folder / name).chmod(0o755)


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
@pytest.mark.parametrize(
    ("present", "expected"),
    [
        ({"python3.11": True, "python3.12": True, "python3": True}, "python3.11"),
        ({"python3.11": False, "python3.12": True, "python3": True}, "python3.12"),
        ({"python3": True}, "python3"),
        ({"python3.11": False, "python3": False}, None),
    ],
    ids=["3.11-first", "3.12-when-3.11-is-too-old", "python3", "none"],
)
def test_makefile_picks_the_first_python_that_is_311_or_newer(tmp_path, present, expected):
    for name, new_enough in present.items():
        _fake_python(tmp_path, name, new_enough=new_enough)
    env = {**os.environ, "PATH": str(tmp_path)}  # make runs /bin/sh; `command -v` is built in
    env.pop("PYTHON", None)
    result = subprocess.run(
        [shutil.which("make"), "-s", "python"], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    if expected is None:
        assert result.returncode == 2 and "no Python 3.11 or newer found" in result.stderr
    else:
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith(f"{expected} (Python 3.")
