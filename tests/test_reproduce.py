"""The reproduction protocol (bench/reproduce.py) end to end on a tiny Imagenette subset."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "bench"))

import reproduce  # noqa: E402


def test_test_scale_is_training_runs_for_jittered_s():
    assert reproduce.test_scale(reproduce.GEOMETRIES["quarter"]) == 96
    assert reproduce.test_scale(reproduce.GEOMETRIES["paper"]) == 384


@pytest.mark.parametrize(
    "change",
    [
        {"geometry": "paper"},
        {"batch_size": 32},
        {"fc_width": 128},
        {"data": "other"},
        {"amp": False},
        {"seed": 1},
        {"classes": 5},
        {"per_class": 7},
    ],
)
def test_a_recorded_step_is_reused_only_with_the_same_configuration(tmp_path, change):
    args = reproduce.get_args_parser().parse_args(["--data", str(tmp_path)])
    step = reproduce.Step("A-paper", "A", ("--init", "paper"), 4)
    record = tmp_path / "A-paper.json"
    config = reproduce.step_config(step, data=tmp_path, args=args)
    record.write_text(json.dumps({"name": "A-paper", "epochs": 4, "config": config}))
    assert reproduce.recorded_run(record, config)["name"] == "A-paper"
    data = Path(change.pop("data")) if "data" in change else tmp_path
    changed = reproduce.get_args_parser().parse_args(["--data", str(tmp_path)])
    for key, value in change.items():
        setattr(changed, key, value)
    assert reproduce.recorded_run(record, reproduce.step_config(step, data=data, args=changed)) is None
    longer = reproduce.Step("A-paper", "A", ("--init", "paper"), 5)
    assert reproduce.recorded_run(record, reproduce.step_config(longer, data=tmp_path, args=args)) is None


@pytest.mark.slow
@pytest.mark.data
def test_protocol_on_a_tiny_subset(imagenette_train, tmp_path):
    out = tmp_path / "reproduce"
    command = [
        sys.executable,
        str(REPO_ROOT / "bench" / "reproduce.py"),
        "--data",
        str(imagenette_train.parent),
        "--out",
        str(out),
        "--classes",
        "3",
        "--per-class",
        "20",
        "--epochs-a",
        "1",
        "--epochs-d",
        "1",
        "--fc-width",
        "64",
        "--batch-size",
        "16",
        "--eval-batch",
        "8",
        "--http-batch",
        "4",
    ]
    result = subprocess.run(
        command,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "BENTOML_DO_NOT_TRACK": "True"},
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    results = json.loads((out / "results.json").read_text())
    # 3 classes x 20 images, 10 % held out per class: 2 each.
    assert results["val_images"] == 6 and len(results["classes"]) == 3
    runs = {run["name"]: run for run in results["runs"]}
    assert list(runs) == ["A-paper", "D-preinit", "D-glorot"]
    assert runs["A-paper"]["init"] == "paper" and runs["D-glorot"]["init"] == "glorot"
    assert runs["D-preinit"]["init_from"].endswith("A-paper/best.pt")
    assert runs["D-preinit"]["epochs"] == runs["D-glorot"]["epochs"] == 1
    for run in runs.values():
        protocols = ("center", "five", "ten", "dense")
        assert set(run["errors"]) == {*protocols, *(f"{name}_scales" for name in protocols)}
        for top1, top5 in (run["errors"][k] for k in protocols):
            assert 0.0 <= top5 <= top1 <= 1.0
        assert run["errors"]["dense_scales"] == [64, 96, 128] and run["errors"]["five_scales"] == [96]
        assert run["train_images_per_s"] > 0
    served = results["served"]
    assert served["top1_err"] == served["offline_top1_err"] and served["disagreements"] == 0
    assert "| VGG-D (D-preinit) | pre-init from A | 1 |" in (out / "results.md").read_text()
    # The subset is a folder of links to the first 20 images of the first 3 classes.
    links = sorted((out / "data" / "train").glob("*/*"))
    assert len(links) == 60 and all(link.is_symlink() for link in links)
