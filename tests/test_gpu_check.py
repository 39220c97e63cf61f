"""The GPU acceptance script cannot rot: its dry run (every step on the CPU at toy size) passes
and writes the full report; the pack script's requirement check sees a missing dependency."""

from __future__ import annotations

import json
import os
import subprocess
import zipfile
from pathlib import Path

import pytest

from bench import gpu_requirements

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.timeout(2400)  # every step of the check, on 2 CPU cores: about 6 minutes on an idle machine
def test_gpu_check_dry_run_writes_the_whole_report(tmp_path):
    out = tmp_path / "report"
    env = {**os.environ, "BENTOML_HOME": str(tmp_path / "bentoml"), "VGG_CACHE": str(tmp_path / "cache")}
    result = subprocess.run(
        ["bash", "bench/gpu_check.sh", "--dry-run", "--out", str(out)],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == f"report: {out / 'gpu_check.md'}"
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["dry_run"] and report["not_run"] == []
    steps = {step["name"]: step for step in report["steps"]}
    assert list(steps) == ["machine", "torch-tests", "train-speed", "ort", "ort-tests", "engine-speed", "serve-speed"]
    assert all(step["ok"] for step in steps.values())
    assert "passed" in steps["torch-tests"]["tail"] and "passed" in steps["ort-tests"]["tail"]
    assert (
        steps["train-speed"]["figures"]["images_per_s"]["ours bf16, JPEG loader"] > 0
        or not (REPO_ROOT.parent / "shared" / "data").is_dir()
    )
    assert steps["engine-speed"]["figures"]["images_per_s"]["ORT CPU fp32"] > 0
    rows = steps["serve-speed"]["figures"]["rows"]
    assert {row["target"] for row in rows} == {"service", "naive", "engine"}
    assert all(row["errors"] == 0 and row["completed"] > 0 for row in rows)
    markdown = (out / "gpu_check.md").read_text()
    assert markdown.startswith("# GPU check (DRY RUN") and markdown.count("\n## ") == 7
    # A second run reuses every finished step.
    again = subprocess.run(
        ["bash", "bench/gpu_check.sh", "--dry-run", "--out", str(out)],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert again.returncode == 0 and again.stdout.count("done earlier") == 7


def fake_wheel(folder: Path, name: str, requires: list[str]) -> None:
    metadata = "\n".join([f"Name: {name}", "Version: 1.0", *(f"Requires-Dist: {r}" for r in requires)]) + "\n"
    with zipfile.ZipFile(folder / f"{name}-1.0-py3-none-any.whl", "w") as archive:
        archive.writestr(f"{name}-1.0.dist-info/METADATA", metadata)


def test_requirements_met_by_carried_wheels_or_the_gpu_image(tmp_path):
    fake_wheel(
        tmp_path,
        "serving_thing",
        ["Starlette>=0.3", "numpy", "tomli; python_version < '3.11'", "extra-only; extra == 'docs'"],
    )
    fake_wheel(tmp_path, "starlette", ["anyio"])
    assert gpu_requirements.missing(tmp_path) == {}  # numpy, anyio: on the image; tomli, extra: not needed
    fake_wheel(tmp_path, "other", ["pydantic-core==2.0"])
    assert gpu_requirements.missing(tmp_path) == {"pydantic-core": ["other"]}


def test_reproduce_strict_fp32_turns_tf32_off_and_restores_it():
    import torch

    from bench import reproduce

    defaults = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = True, True
        with reproduce.strict_fp32():
            assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
        assert torch.backends.cudnn.allow_tf32 and torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = defaults
