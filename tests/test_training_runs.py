"""End-to-end training runs through the CLI: bad arguments, resume after SIGKILL, DDP,
real data, and the demo's bar (paper, section 3.1 recipe)."""

from __future__ import annotations

import csv
import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import vgg
from tests.helpers import REPO_ROOT, repo_env, run_module
from tests.training_helpers import TINY_TRAINING, ddp_rank_with_unreadable_batch, tiny_net
from training.history import METRIC_COLUMNS
from training.run import cli
from vgg.checkpoint import CHECKPOINT_FORMAT, load_checkpoint, save_checkpoint

TINY = [*TINY_TRAINING, "--no-amp"]


def run_env(tmp_path: Path) -> dict[str, str]:
    """A run's own caches: generated data and the BentoML store under ``tmp_path``."""
    return repo_env(VGG_CACHE=str(tmp_path / "cache"), BENTOML_HOME=str(tmp_path / "bentoml"))


def train(args: list[str], tmp_path: Path, *, timeout: int = 300) -> subprocess.CompletedProcess:
    return run_module("training.run", *args, env=run_env(tmp_path), timeout=timeout)


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path)["model"]


# ---------------------------------------------------------------- bad arguments: one line, exit 2


def corrupt_file(tmp_path: Path) -> Path:
    path = tmp_path / "corrupt" / "last.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"PK\x03\x04 truncated")
    return path


def checkpoint_lacking(folder: Path, *, arch: dict, drop: tuple[str, ...] = (), data: Path | None = None) -> Path:
    """A checkpoint of the right format whose ``arch`` or resume state is incomplete."""
    model = vgg.build("A", num_classes=3, fc_width=32)
    checkpoint = {
        "format": CHECKPOINT_FORMAT,
        "arch": arch,
        "model": model.state_dict(),
        "classes": ["a", "b", "c"],
        "preprocess": {
            "mean": [0.0] * 3,
            "std": [1.0] * 3,
            "pca_eigval": [0.0] * 3,
            "pca_eigvec": [[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0]],
        },
        "config": {"cfg": "A", "data": str(data)},
        "optimizer": {},
        "lr_rule": {},
        "epoch": 1,
        "rng": {},
        "history": [],
    }
    path = folder / "last.pt"
    save_checkpoint({key: value for key, value in checkpoint.items() if key not in drop}, path)
    return path


GOOD_ARCH = {"cfg": "A", "batch_norm": False, "num_classes": 3, "dropout": 0.5, "fc_width": 32}


@pytest.mark.parametrize(
    "case",
    [
        "missing_folder",
        "empty_class",
        "corrupt_init_from",
        "corrupt_resume",
        "no_internet",
        "resume_without_out",
        "crop_above_scale",
        "dropout",
        "momentum",
        "workers",
        "device",
        "out_is_a_file",
        "init_from_without_arch_keys",
        "resume_without_optimizer",
        "resume_with_empty_state",
    ],
)
def test_bad_arguments_give_one_line_and_exit_2(tmp_path, tiny_data, monkeypatch, capsys, case):
    monkeypatch.setenv("VGG_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr("urllib.request.urlopen", _no_network)
    args = {
        "missing_folder": ["--data", str(tmp_path / "nowhere")],
        "empty_class": ["--data", str(tiny_data)],
        "corrupt_init_from": ["--data", str(tiny_data), "--init-from", str(corrupt_file(tmp_path))],
        "corrupt_resume": ["--resume", "--out", str(corrupt_file(tmp_path).parent)],
        "no_internet": ["--dataset", "cifar10"],
        "resume_without_out": ["--resume"],
        "crop_above_scale": ["--data", str(tiny_data), "--scale", "36", "--crop", "64"],
        "dropout": ["--data", str(tiny_data), "--dropout", "1.5"],
        "momentum": ["--data", str(tiny_data), "--momentum", "-1"],
        "workers": ["--data", str(tiny_data), "--workers", "-1"],
        "device": ["--data", str(tiny_data), "--device", "foo"],
        "out_is_a_file": ["--data", str(tiny_data), "--out", str(tiny_data / "train" / "disc" / "0.png")],
        "init_from_without_arch_keys": [
            "--data",
            str(tiny_data),
            "--init-from",
            str(checkpoint_lacking(tmp_path / "no_arch", arch={"cfg": "A"})),
        ],
        "resume_without_optimizer": [
            "--resume",
            "--out",
            str(checkpoint_lacking(tmp_path / "no_optimizer", arch=GOOD_ARCH, drop=("optimizer",)).parent),
        ],
        "resume_with_empty_state": [
            "--resume",
            "--out",
            str(checkpoint_lacking(tmp_path / "empty_state", arch=GOOD_ARCH, data=tiny_data).parent),
        ],
    }[case]
    if case == "empty_class":
        (tiny_data / "train" / "empty").mkdir()
    out = [] if case.startswith(("corrupt_resume", "resume")) else ["--out", str(tmp_path / "run")]
    assert cli([*TINY, *out, *args]) == 2  # later flags win
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: ") and "\n" not in error and "Traceback" not in error
    expected = {
        "missing_folder": "no such folder",
        "empty_class": "no images",
        "corrupt_init_from": "checkpoint",
        "corrupt_resume": "checkpoint",
        "no_internet": "--data",
        "resume_without_out": "--out",
        "crop_above_scale": "crop",
        "dropout": "--dropout",
        "momentum": "--momentum",
        "workers": "--workers",
        "device": "--device",
        "out_is_a_file": "is a file",
        "init_from_without_arch_keys": "lacks num_classes, batch_norm",
        "resume_without_optimizer": "lacks optimizer",
        "resume_with_empty_state": "cannot resume from it",
    }[case]
    assert expected in error
    if case == "no_internet":
        assert "no internet" in error


def _no_network(*args, **kwargs):
    raise OSError("[Errno 101] Network is unreachable")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--cfg", "F"], "invalid choice: 'F'"),
        (["--epochs", "two"], "invalid int value"),
        (["--bogus"], "unrecognized"),
    ],
)
def test_argparse_errors_are_one_line_and_exit_2(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        cli(argv)
    error = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and message in error
    assert error.startswith("error: ") and "\n" not in error and "usage" not in error


@pytest.mark.slow
def test_ddp_rank_with_an_all_unreadable_batch_still_steps_with_the_others(tmp_path):
    """Rank 1's first batch is None: it joins the all-reduce with zero gradients, so neither rank
    hangs and both end with the same weights."""
    torch.multiprocessing.spawn(
        ddp_rank_with_unreadable_batch, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True
    )
    zero, one = (
        torch.load(tmp_path / "rank0.pt", weights_only=True),
        torch.load(tmp_path / "rank1.pt", weights_only=True),
    )
    torch.manual_seed(0)  # both ranks' initial weights
    initial = tiny_net().state_dict()
    assert not torch.equal(zero["5.weight"], initial["5.weight"])  # the steps moved them
    for key, _ in tiny_net().named_parameters():  # BN buffers are each rank's own until the next forward
        assert torch.equal(zero[key], one[key]), key


# ---------------------------------------------------------------- runs


@pytest.mark.slow
def test_run_writes_checkpoints_metrics_plot_and_resumes_bit_identically_after_sigkill(tmp_path, tiny_data):
    """A run SIGKILLed in the middle of epoch 2 and resumed ends with the same weights, bit for
    bit, as an uninterrupted run (RNG states, optimizer and LR rule come back from last.pt)."""
    args = [*TINY, "--data", str(tiny_data), "--epochs", "2", "--log-every", "1", "--eval-dense"]
    straight = tmp_path / "straight"
    done = train([*args, "--out", str(straight)], tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert {p.name for p in straight.iterdir()} >= {"last.pt", "best.pt", "config.json", "metrics.csv", "curves.png"}
    rows = list(csv.DictReader((straight / "metrics.csv").open()))
    best, last = load_checkpoint(straight / "best.pt"), load_checkpoint(straight / "last.pt")
    # One unit, accuracy, from evaluation to the CSV and the checkpoint.
    assert list(rows[0]) == list(METRIC_COLUMNS) and len(rows) == 2
    for row, saved in zip(rows, last["history"], strict=True):
        assert all(float(row[key]) == pytest.approx(saved[key]) for key in METRIC_COLUMNS)
        assert all(0 <= saved[key] <= 1 for key in METRIC_COLUMNS if "top" in key)
    assert last["epoch"] == 2 and best["metrics"]["val_top1"] == max(r["five_top1"] for r in last["history"])
    assert last["metrics"]["center_top5"] == last["history"][-1]["center_top5"]
    assert "init: paper" in done.stderr  # A from scratch: the paper's N(0, 1e-2)

    killed = tmp_path / "killed"
    process = subprocess.Popen(
        [sys.executable, "-m", "training.run", *args, "--out", str(killed)],
        cwd=REPO_ROOT,
        env=run_env(tmp_path),
        stderr=subprocess.PIPE,
        text=True,
    )
    for line in process.stderr:
        if "epoch 2 step 3/6" in line:
            process.send_signal(signal.SIGKILL)
            break
    process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL
    assert load_checkpoint(killed / "last.pt")["epoch"] == 1
    resumed = train(["--resume", "--out", str(killed), "--no-export"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming" in resumed.stderr
    expected, actual = weights(straight / "last.pt"), weights(killed / "last.pt")
    assert expected.keys() == actual.keys()
    assert all(torch.equal(expected[key], actual[key]) for key in expected)

    def metrics_without_timing(run: Path) -> list[str]:
        return [line.rsplit(",", 1)[0] for line in (run / "metrics.csv").read_text().splitlines()]

    assert metrics_without_timing(killed) == metrics_without_timing(straight)


@pytest.mark.slow
def test_torchrun_two_gloo_processes_match_one_process(tmp_path, tiny_data):
    """DDP with 2 processes of 8 images = 1 process of 16 (dropout and augmentation off)."""
    args = [*TINY, "--data", str(tiny_data), "--epochs", "2", "--dropout", "0", "--no-augment", "--device", "cpu"]
    single = train([*args, "--out", str(tmp_path / "one")], tmp_path)
    assert single.returncode == 0, single.stderr[-2000:]
    torchrun = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        "-m",
        "training.run",
        *args,
        "--out",
        str(tmp_path / "two"),
    ]
    double = subprocess.run(torchrun, cwd=REPO_ROOT, env=run_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert double.returncode == 0, double.stderr[-3000:]
    assert "device cpu x2" in double.stderr
    one, two = weights(tmp_path / "one" / "last.pt"), weights(tmp_path / "two" / "last.pt")
    torch.manual_seed(0)  # the run's seed: its initial weights
    initial = vgg.build("A", num_classes=3, fc_width=32, dropout=0.0, init="paper").state_dict()
    assert not torch.equal(one["features.0.weight"], initial["features.0.weight"])  # training moved them
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=1e-4, atol=1e-6)


@pytest.mark.slow
@pytest.mark.data
def test_short_run_on_imagenette_lowers_the_training_loss(tmp_path, imagenette_train):
    """A few hundred real images (3 classes x 80, via symlinks), 5 short epochs of VGG-A with BN."""
    root = tmp_path / "imagenette"
    for folder in sorted(p for p in imagenette_train.iterdir() if p.is_dir())[:3]:
        (root / "train" / folder.name).mkdir(parents=True)
        for image in sorted(folder.iterdir())[:80]:
            (root / "train" / folder.name / image.name).symlink_to(image)
    args = [
        "--cfg",
        "A",
        "--batch-norm",
        "--fc-width",
        "64",
        "--scale",
        "36",
        "44",
        "--crop",
        "32",
        "--batch-size",
        "16",
        "--lr-patience",
        "10",
        "--dropout",
        "0",
        "--stats-images",
        "100",
        "--workers",
        "0",
        "--no-export",
        "--epochs",
        "5",
        "--data",
        str(root),
        "--out",
        str(tmp_path / "run"),
    ]
    run = train(args, tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    history = load_checkpoint(tmp_path / "run" / "last.pt")["history"]
    losses = [row["train_loss"] for row in history]
    # Epoch losses are noisy at this size; the last two epochs' mean must be clearly below the first.
    assert len(losses) == 5 and (losses[-1] + losses[-2]) / 2 < losses[0] - 0.03, losses


@pytest.mark.slow
def test_demo_run_reaches_95_percent_and_registers_the_served_model(tmp_path):
    """`python -m training.run --cfg D` with no data: the demo set, VGG-D (fc 4096), the
    paper's optimiser; >= 95% validation top-1, then export + BentoML registration."""
    run = train(["--cfg", "D", "--out", str(tmp_path / "demo")], tmp_path, timeout=900)  # int8 export included
    assert run.returncode == 0, run.stderr[-3000:]
    assert "DEMO" in run.stderr and "--data DIR" in run.stderr
    best = load_checkpoint(tmp_path / "demo" / "best.pt")
    assert best["arch"] == {"cfg": "D", "batch_norm": True, "num_classes": 10, "dropout": 0.5, "fc_width": 4096}
    assert best["metrics"]["val_top1"] >= 0.95, best["history"]
    assert best["config"]["batch_size"] == 256 and best["config"]["lr"] == 0.01
    assert Path(best["config"]["data"], "train").is_dir()  # export's int8 calibration reads it
    check = run_module("vgg.store", "--check", env=run_env(tmp_path), timeout=120)
    assert check.returncode == 0, check.stdout + check.stderr
    shown = run_module("vgg.store", env=run_env(tmp_path), timeout=120)
    metadata = json.loads(shown.stdout.split("\n", 1)[1])
    # Without a GPU the run adds the int8 graph the service serves on the CPU (after its agreement check).
    expected = ["fp32"] if torch.cuda.is_available() else ["fp32", "int8"]
    assert metadata["precisions"] == expected, run.stderr[-3000:]
    if not torch.cuda.is_available():
        assert "int8 top-1 agreement with fp32" in run.stderr


@pytest.mark.slow
def test_torchrun_resume_restores_each_ranks_own_rng(tmp_path, tiny_data):
    """Two gloo ranks with augmentation drawn in each process (no workers): a run stopped after
    epoch 1 and resumed ends with the weights of an uninterrupted run, which needs every rank to
    get its own RNG state back (rank 1 restoring rank 0's would draw rank 0's crops and flips)."""
    args = [*TINY, "--data", str(tiny_data), "--epochs", "2", "--dropout", "0", "--scale", "36", "44"]

    def torchrun(out: Path, *extra: str) -> None:
        done = run_module(
            "torch.distributed.run",
            *("--standalone", "--nproc-per-node", "2", "-m", "training.run", *args, "--out", str(out), *extra),
            env=run_env(tmp_path),
            timeout=400,
        )
        assert done.returncode == 0, done.stderr[-3000:]

    torchrun(tmp_path / "straight")
    torchrun(tmp_path / "split", "--epochs", "1")
    first = load_checkpoint(tmp_path / "split" / "last.pt")
    ranks = first["rng_ranks"]
    assert len(ranks) == 2 and not torch.equal(ranks[0]["torch"], ranks[1]["torch"])
    torchrun(tmp_path / "split", "--resume")
    straight, resumed = weights(tmp_path / "straight" / "last.pt"), weights(tmp_path / "split" / "last.pt")
    for key in straight:
        torch.testing.assert_close(resumed[key], straight[key], rtol=0, atol=0, msg=key)
