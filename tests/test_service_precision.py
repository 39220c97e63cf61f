"""The service on a model exported with int8, two workers, on this machine's device.

A small VGG-A is trained a few steps on three colour classes and exported with
``precision="int8"`` (calibration and agreement check on its training images) into a fresh
BentoML store; ``bentoml serve`` then runs with default settings and ``VGG_WORKERS=2``.
On a CPU machine the int8 graph must be what is served (``GET /model`` says so), its answers
equal ONNX Runtime run directly on the int8 file, and agree on top-1 with the fp32 graph.
"""

from __future__ import annotations

import sys
from pathlib import Path

import httpx
import numpy as np
import pytest

from bench.launch import REPO_ROOT, bentoml_serve_command, free_port, running_server
from export.check import image_files, load_graph_inputs, run_onnx, session
from serving.engine import _cuda_usable
from serving.workers import WarmBoard, cpu_threads, gpu_for_worker
from tests.export_helpers import CLASS_COLOURS, SCALE, train_on_folder, write_checkpoint, write_colour_folder
from tests.helpers import repo_env

CALIBRATION = 24
AGREEMENT = 60


def env_for(home: Path, **variables: str) -> dict[str, str]:
    env = {name: value for name, value in repo_env().items() if not name.startswith("VGG_")}
    return env | {"BENTOML_HOME": str(home)} | variables


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict:
    """A trained colour VGG-A registered with fp32 + int8 graphs in a fresh store."""
    import subprocess

    root = tmp_path_factory.mktemp("precision")
    data = write_colour_folder(root / "colours", per_class=(CALIBRATION + AGREEMENT) // 3 + 4)
    checkpoint = write_checkpoint(root / "best.pt", train_on_folder(data), classes=list(CLASS_COLOURS), data=data)
    home = root / "bentoml"
    code = (
        f"from export import export_checkpoint; export_checkpoint({str(checkpoint)!r}, precision='int8', "
        f"calibration_count={CALIBRATION}, agreement_count={AGREEMENT})"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, env=env_for(home), capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    entry = next((home / "models" / "vgg").glob("*/model.int8.onnx")).parent
    return {"root": root, "home": home, "data": data, "fp32": entry / "model.onnx", "int8": entry / "model.int8.onnx"}


@pytest.fixture(scope="module")
def server(exported) -> dict:
    port = free_port()
    env = env_for(exported["home"], VGG_WORKERS="2", VGG_MAX_BATCH_SIZE="4")
    log_path = exported["root"] / "server.log"
    with running_server(bentoml_serve_command(port), port=port, env=env, log_path=log_path, timeout_s=300) as (url, _):
        with httpx.Client(base_url=url, timeout=60.0) as client:
            yield {"client": client, "log": log_path}


@pytest.mark.slow
def test_the_cpu_serves_int8_by_default_and_says_so(server) -> None:
    if _cuda_usable():
        pytest.skip("this machine has a usable GPU: the fp32 graph is served there (the model has no fp16)")
    info = server["client"].get("/model").json()
    assert (info["precision"], info["provider"], info["workers"]) == ("int8", "CPUExecutionProvider", 2)
    assert info["labels"] == list(CLASS_COLOURS) and info["test_scale"] == SCALE
    log = server["log"].read_text(errors="replace")
    assert "worker 1/2" in log and "worker 2/2" in log and "int8 graph on CPUExecutionProvider" in log


@pytest.mark.slow
def test_int8_answers_equal_the_int8_graph_and_agree_with_fp32(server, exported) -> None:
    if _cuda_usable():
        pytest.skip("this machine has a usable GPU")
    files = image_files(exported["data"] / "train")[::5][:15]
    images = load_graph_inputs(files, test_scale=SCALE)
    int8 = run_onnx(session(exported["int8"]), images)
    fp32 = run_onnx(session(exported["fp32"]), images)
    served = []
    for path, expected in zip(files, int8, strict=True):
        response = server["client"].post(
            "/classify", files={"image": (path.name, path.read_bytes())}, data={"top_k": "3"}
        )
        assert response.status_code == 200, response.text
        answer = response.json()
        scores = {entry["index"]: entry["score"] for entry in answer["top"]}
        np.testing.assert_allclose([scores[i] for i in range(3)], expected, rtol=0, atol=1e-5)
        served.append(answer["index"])
    assert (np.array(served) == fp32.argmax(axis=1)).mean() >= 0.99


@pytest.mark.slow
def test_ready_only_when_every_worker_is_warm(server) -> None:
    assert server["client"].get("/readyz").status_code == 200  # both workers marked themselves warm


def test_warm_board_needs_every_worker(tmp_path) -> None:
    board = WarmBoard(3, root=tmp_path)
    assert not board.all_warm()
    board.mark_warm(1)
    board.mark_warm(3)
    assert not board.all_warm()
    board.mark_warm(2)
    assert board.all_warm()
    board.mark_cold(2)  # a worker restarting
    assert not board.all_warm()
    board.mark_warm(2)
    (board.directory / "worker-3").write_text("999999999")  # a worker that died without marking itself cold
    assert not board.all_warm()


def test_workers_pin_gpus_round_robin_and_share_the_cpu_cores(monkeypatch) -> None:
    from serving import engine

    assert [gpu_for_worker(index, 4) for index in range(1, 7)] == [0, 1, 2, 3, 0, 1]
    assert gpu_for_worker(1, 0) == 0
    monkeypatch.setattr(engine, "physical_cores", lambda: 16)
    assert (cpu_threads(1), cpu_threads(4), cpu_threads(32)) == (16, 4, 1)


def test_default_workers_follow_the_visible_gpus(monkeypatch) -> None:
    from serving import workers

    monkeypatch.delenv("VGG_WORKERS", raising=False)
    monkeypatch.setattr(workers, "visible_gpus", lambda: 0)
    assert workers.configured_workers() == 1
    monkeypatch.setattr(workers, "visible_gpus", lambda: 8)
    assert workers.configured_workers() == 8
    monkeypatch.setenv("VGG_WORKERS", "3")
    assert workers.configured_workers() == 3
    monkeypatch.setenv("VGG_WORKERS", "0")  # refused by the start-up check; counted as 1 until then
    assert workers.configured_workers() == 1


@pytest.mark.slow
def test_a_precision_the_model_lacks_stops_the_server_with_one_line(exported) -> None:
    import subprocess

    wanted = "int8" if _cuda_usable() else "fp16"
    command = bentoml_serve_command(free_port())
    result = subprocess.run(
        command,
        cwd=REPO_ROOT,
        env=env_for(exported["home"], VGG_PRECISION=wanted),
        capture_output=True,
        text=True,
        timeout=120,
    )
    lines = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    assert result.returncode != 0 and len(lines) == 1, lines
    assert f"VGG_PRECISION={wanted}" in lines[0]
