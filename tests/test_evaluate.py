"""``python -m training.evaluate``: every protocol against an independent computation on tiny
models, ensembles, class-name matching, bad input, and training's own validation reproduced."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import vgg
from tests.export_helpers import CROP, MEAN, STD, peaky_model, write_checkpoint
from tests.helpers import repo_env, run_module
from tests.training_helpers import TINY_TRAINING, dense_probabilities_by_hand, write_folder
from training import data as datasets
from training import evaluate as ev
from vgg.checkpoint import load_checkpoint
from vgg.preprocessing import open_rgb, resize_shortest_side, to_graph_input

CLASSES = ["cat", "dog", "fish"]


def settings(batch_size: int = 2) -> ev.Settings:
    return ev.Settings(batch_size=batch_size, device=torch.device("cpu"), amp=False, workers=0, progress=False)


def noisy_folder(root: Path, counts: dict[str, int], *, seed: int = 0) -> Path:
    """``root/<class>/<i>.png``: random images of assorted sizes and aspect ratios."""
    rng = np.random.default_rng(seed)
    for name, count in counts.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for index in range(count):
            width, height = int(rng.integers(36, 70)), int(rng.integers(36, 70))
            Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(root / name / f"{index}.png")
    return root


@pytest.fixture(scope="module")
def model():
    return peaky_model(num_classes=len(CLASSES))


@pytest.fixture
def checkpoint(tmp_path, model) -> Path:
    return write_checkpoint(tmp_path / "best.pt", model, classes=CLASSES)


def normalised(pixels: np.ndarray) -> torch.Tensor:
    tensor = torch.from_numpy(np.asarray(pixels, dtype=np.float32).copy()).permute(2, 0, 1)
    return (tensor - torch.tensor(MEAN).view(3, 1, 1)) / torch.tensor(STD).view(3, 1, 1)


@torch.no_grad()
def grid50_by_hand(model, path: str, q: int) -> torch.Tensor:
    """50 PIL crops of the Q x Q square and of its mirror image, one forward each."""
    square = Image.fromarray(to_graph_input(open_rgb(path), q))
    positions = np.round(np.linspace(0, q - CROP, 5)).astype(int)
    probabilities = []
    for source in (square, square.transpose(Image.Transpose.FLIP_LEFT_RIGHT)):
        for top in positions:
            for left in positions:
                view = normalised(source.crop((left, top, left + CROP, top + CROP)))
                probabilities.append(torch.softmax(model(view[None])[0], dim=0))
    return torch.stack(probabilities).mean(dim=0)


@torch.no_grad()
def dense_by_hand(model, path: str, q: int) -> torch.Tensor:
    return dense_probabilities_by_hand(model, normalised(resize_shortest_side(open_rgb(path), q)))


# ---------------------------------------------------------------- protocols against independent computations


def test_grid50_dense_and_their_combination_equal_a_computation_by_hand(tmp_path, checkpoint, model):
    data = noisy_folder(tmp_path / "images", {"cat": 1, "fish": 1})
    loaded = ev.load_model(checkpoint)
    _, samples, _ = ev.image_samples(data, loaded)
    paths = [path for path, _ in samples]
    scales = [32, 44]
    cache: dict[str, ev.Posteriors] = {}
    grid = ev.protocol_posteriors(loaded, samples, "grid50", scales, settings(), cache)
    dense = ev.protocol_posteriors(loaded, samples, "dense", scales, settings(), cache)
    both = ev.protocol_posteriors(loaded, samples, "dense+grid50", scales, settings(), cache)
    expected_grid = torch.stack([torch.stack([grid50_by_hand(model, p, q) for q in scales]).mean(0) for p in paths])
    expected_dense = torch.stack([torch.stack([dense_by_hand(model, p, q) for q in scales]).mean(0) for p in paths])
    assert expected_grid.max() > 0.5, "model too flat for the comparison to mean anything"
    torch.testing.assert_close(grid.probs, expected_grid, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(dense.probs, expected_dense, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(both.probs, (expected_grid + expected_dense) / 2, rtol=1e-4, atol=1e-5)
    assert both.scales == scales and both.seconds == pytest.approx(grid.seconds + dense.seconds)
    assert (grid.probs - dense.probs).abs().max() > 1e-3  # the two protocols do differ here


@pytest.mark.parametrize("protocol", ["center", "five", "ten"])
def test_crop_protocols_equal_torchvision_on_the_checkpoints_test_scale(tmp_path, checkpoint, model, protocol):
    from torchvision.transforms import v2

    data = noisy_folder(tmp_path / "images", {"dog": 2})
    loaded = ev.load_model(checkpoint)
    _, samples, _ = ev.image_samples(data, loaded)
    result = ev.protocol_posteriors(loaded, samples, protocol, None, settings(batch_size=1))
    assert result.scales == [loaded.test_scale] == [37]
    transform = {"center": lambda x: [v2.CenterCrop(CROP)(x)], "five": v2.FiveCrop(CROP), "ten": v2.TenCrop(CROP)}[
        protocol
    ]
    with torch.no_grad():
        expected = torch.stack(
            [
                torch.softmax(
                    model(torch.stack(list(transform(normalised(to_graph_input(open_rgb(path), 37)))))), 1
                ).mean(0)
                for path, _ in samples
            ]
        )
    torch.testing.assert_close(result.probs, expected, rtol=1e-4, atol=1e-5)


def test_default_test_scales_single_for_crops_and_section_4_2_for_the_others(checkpoint):
    loaded = ev.load_model(checkpoint)  # S unknown: Q = 37, so S = 37 and Q in {37 - 32 -> crop, 37, 69}
    assert ev.test_scales("five", loaded, None) == [37]
    assert ev.test_scales("grid50", loaded, None) == ev.test_scales("dense", loaded, None) == [32, 37, 69]
    assert ev.test_scales("center", loaded, [48, 40, 48]) == [40, 48]
    with pytest.raises(ev.UsageError, match="below the 32-pixel crop"):
        ev.test_scales("dense", loaded, [24, 40])


# ---------------------------------------------------------------- ensembles and class names


def test_ensemble_averages_posteriors_by_class_name(tmp_path, model):
    other = peaky_model(num_classes=3, seed=5)
    first = write_checkpoint(tmp_path / "a.pt", model, classes=CLASSES)
    second = write_checkpoint(tmp_path / "b.pt", other, classes=["fish", "cat", "dog"])  # other column order
    data = noisy_folder(tmp_path / "images", {"cat": 1, "dog": 1, "fish": 1}, seed=2)
    models = [ev.load_model(first), ev.load_model(second)]
    _, samples, _ = ev.image_samples(data, models[0])
    parts = [ev.protocol_posteriors(m, samples, "center", None, settings()) for m in models]
    result = ev.ensemble(parts, ev.class_orders(models))
    reordered = parts[1].probs[:, [1, 2, 0]]  # fish, cat, dog -> cat, dog, fish
    torch.testing.assert_close(result.probs, (parts[0].probs + reordered) / 2)
    assert (parts[0].probs - reordered).abs().max() > 1e-3  # the two models do disagree

    report = tmp_path / "report.json"
    assert (
        ev.cli(
            [
                "--checkpoint",
                str(first),
                "--checkpoint",
                str(second),
                "--data",
                str(data),
                "--protocol",
                "center",
                "five",
                "--json",
                str(report),
            ]
        )
        == 0
    )
    rows = json.loads(report.read_text())["rows"]
    assert [(row["model"], row["protocol"]) for row in rows] == [
        (str(first), "center"),
        (str(second), "center"),
        ("ensemble", "center"),
        (str(first), "five"),
        (str(second), "five"),
        ("ensemble", "five"),
    ]
    labels = torch.tensor([0, 1, 2])
    assert rows[2]["top1_err"] == pytest.approx(1 - (result.probs.argmax(1) == labels).float().mean().item())


def constant_checkpoint(path: Path, *, classes: list[str], favourite: str) -> Path:
    """A VGG that always answers ``favourite``."""
    model = vgg.build("A", num_classes=len(classes), fc_width=8)
    with torch.no_grad():
        model.classifier[-1].weight.zero_()
        model.classifier[-1].bias.copy_(torch.tensor([10.0 if name == favourite else 0.0 for name in classes]))
    return write_checkpoint(path, model.eval(), classes=classes)


def test_classes_are_matched_by_name_not_by_position(tmp_path, capsys):
    checkpoint = constant_checkpoint(tmp_path / "c.pt", classes=["fish", "dog", "cat"], favourite="cat")
    data = noisy_folder(tmp_path / "images", {"cat": 2, "dog": 1})  # sorted: cat, dog
    report = tmp_path / "r.json"
    assert (
        ev.cli(["--checkpoint", str(checkpoint), "--data", str(data), "--protocol", "center", "--json", str(report)])
        == 0
    )
    (row,) = json.loads(report.read_text())["rows"]
    assert row["top1_err"] == pytest.approx(1 / 3) and row["top5_err"] == 0.0 and row["images"] == 3
    assert "center" in capsys.readouterr().out


def test_a_torchvision_layout_state_dict_with_labels(tmp_path, model):
    """What export accepts: a bare state dict, its classes named by --labels, torchvision's preprocessing."""
    state_dict = tmp_path / "vgg.pth"
    torch.save(model.state_dict(), state_dict)
    (tmp_path / "labels.txt").write_text("\n".join(CLASSES) + "\n")
    data = noisy_folder(tmp_path / "images", {"dog": 1, "fish": 1}, seed=4)
    report = tmp_path / "r.json"
    argv = ["--checkpoint", str(state_dict), "--labels", str(tmp_path / "labels.txt"), "--data", str(data)]
    assert ev.cli([*argv, "--protocol", "center", "--json", str(report)]) == 0
    (row,) = json.loads(report.read_text())["rows"]
    assert row["images"] == 2 and row["test_scales"] == [256]  # torchvision's Q
    loaded = ev.load_model(state_dict, labels=CLASSES)
    assert loaded.crop == 224 and loaded.classes == CLASSES
    assert ev.cli(["--checkpoint", str(state_dict), "--data", str(data)]) == 2  # 3 outputs, no names


def test_held_out_split_of_a_train_folder_is_the_one_training_validated_on(tmp_path, checkpoint):
    write_folder(tmp_path / "data" / "train", {"cat": 8, "dog": 8}, size=40)
    loaded = ev.load_model(checkpoint)
    loaded.config.update(seed=3, val_split=0.25)
    _, samples, where = ev.image_samples(tmp_path / "data", loaded)
    expected = datasets.folder_splits(tmp_path / "data", val_split=0.25, seed=3).val
    assert [path for path, _ in samples] == [path for path, _ in expected] and "held-out" in where
    assert {label for _, label in samples} == {0, 1}


# ---------------------------------------------------------------- bad input: one line, exit 2


def bad_cases(tmp_path: Path, checkpoint: Path) -> dict[str, tuple[list[str], str]]:
    good = noisy_folder(tmp_path / "good", {"cat": 1})
    unknown = noisy_folder(tmp_path / "unknown", {"cat": 1, "zebra": 1})
    (tmp_path / "empty" / "cat").mkdir(parents=True)
    (tmp_path / "corrupt.pt").write_bytes(b"PK\x03\x04 truncated")
    other = write_checkpoint(tmp_path / "other.pt", peaky_model(num_classes=2), classes=["cat", "cow"])
    base = ["--checkpoint", str(checkpoint), "--data", str(good)]
    return {
        "missing_folder": (["--checkpoint", str(checkpoint), "--data", str(tmp_path / "nope")], "no such folder"),
        "empty_class": (["--checkpoint", str(checkpoint), "--data", str(tmp_path / "empty")], "has no images"),
        "unknown_class": (
            ["--checkpoint", str(checkpoint), "--data", str(unknown)],
            "'zebra' is not one of the 3 classes",
        ),
        "missing_checkpoint": (["--checkpoint", str(tmp_path / "none.pt"), "--data", str(good)], "no such file"),
        "corrupt_checkpoint": (
            ["--checkpoint", str(tmp_path / "corrupt.pt"), "--data", str(good)],
            "not a readable checkpoint",
        ),
        "scale_below_crop": ([*base, "--test-scales", "20"], "below the 32-pixel crop"),
        "bad_protocol": ([*base, "--protocol", "twelve"], "invalid choice"),
        "batch_size": ([*base, "--batch-size", "0"], "--batch-size must be at least 1"),
        "json_folder": ([*base, "--json", str(tmp_path / "no" / "r.json")], "no folder"),
        "ensemble_classes": ([*base, "--checkpoint", str(other)], "know different classes"),
        "no_data_flag": (["--checkpoint", str(checkpoint)], "--data"),
    }


@pytest.mark.parametrize(
    "case",
    [
        "missing_folder",
        "empty_class",
        "unknown_class",
        "missing_checkpoint",
        "corrupt_checkpoint",
        "scale_below_crop",
        "bad_protocol",
        "batch_size",
        "json_folder",
        "ensemble_classes",
        "no_data_flag",
    ],
)
def test_bad_input_gives_one_line_and_exit_2(tmp_path, checkpoint, capsys, case):
    argv, message = bad_cases(tmp_path, checkpoint)[case]
    try:
        code = ev.cli(argv)
    except SystemExit as exit_:  # argparse
        code = exit_.code
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("error: ") and message in err, err
    assert "Traceback" not in err


# ---------------------------------------------------------------- done when: training's figures reproduced


TRAIN = [
    *TINY_TRAINING,
    *("--scale", "36", "44", "--no-amp", "--batch-norm", "--init", "kaiming", "--lr", "0.05", "--dropout", "0"),
    *("--epochs", "2"),
]


@pytest.mark.slow
def test_evaluate_reproduces_training_validation_and_reports_every_protocol(tmp_path):
    data = tmp_path / "data"
    classes = {"disc": 16, "square": 16, "triangle": 16, "hstripes": 16, "vstripes": 16, "ring": 16}
    write_folder(data / "train", classes, size=40)
    write_folder(data / "val", {name: 4 for name in classes}, size=40)
    run = tmp_path / "run"
    env = repo_env(VGG_CACHE=str(tmp_path / "cache"))
    trained = run_module("training.run", *TRAIN, "--data", str(data), "--out", str(run), env=env, timeout=900)
    assert trained.returncode == 0, trained.stderr[-2000:]
    report = tmp_path / "report.json"
    evaluated = run_module(
        "training.evaluate",
        *("--checkpoint", str(run / "last.pt"), "--data", str(data), "--protocol", "center", "five"),
        *("--json", str(report)),
        env=env,
        timeout=600,
    )
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    last = load_checkpoint(run / "last.pt")["history"][-1]
    rows = {row["protocol"]: row for row in json.loads(report.read_text())["rows"]}
    for protocol in ("center", "five"):
        assert rows[protocol]["images"] == 24 and rows[protocol]["test_scales"] == [40]  # Q = (36 + 44) / 2
        # Training records accuracies, the evaluation errors (as the paper's tables): the same counts.
        assert rows[protocol]["top1_err"] == 1 - last[f"{protocol}_top1"]
        assert rows[protocol]["top5_err"] == 1 - last[f"{protocol}_top5"]
    assert f"{100 * (1 - last['five_top1']):.2f}%" in evaluated.stdout

    few = tmp_path / "few"
    for name in ("disc", "ring"):
        (few / name).mkdir(parents=True)
        (few / name / "0.png").write_bytes((data / "val" / name / "0.png").read_bytes())
    everything = tmp_path / "all.json"
    assert (
        ev.cli(
            [
                "--checkpoint",
                str(run / "best.pt"),
                "--data",
                str(few),
                "--test-scales",
                "32",
                "40",
                "--json",
                str(everything),
            ]
        )
        == 0
    )
    rows = json.loads(everything.read_text())["rows"]
    assert [row["protocol"] for row in rows] == list(ev.protocols.PROTOCOLS)
    assert all(row["images"] == 2 and row["test_scales"] == [32, 40] and 0 <= row["top1_err"] <= 1 for row in rows)
