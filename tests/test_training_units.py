"""Training building blocks (paper, section 3.1): LR rule, augmentation, data, checkpoints."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import random
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import vgg
from tests.training_helpers import coordinate_image, dense_probabilities_by_hand, stats_identity, write_folder
from training import data as datasets
from training import distributed
from training import run as training_run
from training.config import TrainConfig, UsageError, validate
from training.demo import CLASSES, make_image
from training.distributed import Runtime, resolve_device
from training.epoch import evaluate
from training.loaders import make_loaders
from training.lr import PlateauState, plateau_step
from training.resume import resumed_config, training_checkpoint
from training.rng import rng_state, set_rng_state
from training.run import config_from_args, get_args_parser
from training.setup import build_model
from training.transforms import (
    EvalPreset,
    PCALighting,
    RandomCrop,
    RandomHorizontalFlip,
    RandomIsotropicRescale,
    Stats,
    TrainPreset,
    pixel_stats,
)
from vgg.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint
from vgg.preprocessing import IMAGE_EXTENSIONS, to_graph_input

# ---------------------------------------------------------------- the recipe and its flags


def test_defaults_are_the_papers_recipe():
    config = TrainConfig()
    assert (config.batch_size, config.momentum, config.weight_decay, config.dropout) == (256, 0.9, 5e-4, 0.5)
    assert (config.lr, config.lr_factor, config.lr_max_decreases, config.epochs) == (1e-2, 0.1, 3, 74)
    assert (config.scale, config.crop, config.pca_std, config.fc_width) == ((256,), 224, 0.1, 4096)
    assert config.test_scale == 256 and dataclasses.replace(config, scale=(256, 512)).test_scale == 384


def test_test_scale_flag_overrides_the_papers_q():
    args = get_args_parser().parse_args(
        ["--cfg", "A", "--data", "x", "--scale", "64", "128", "--crop", "56", "--test-scale", "64"]
    )
    config, demo = config_from_args(args)
    assert not demo and config.test_scale == 64 and config.scale_range == (64, 128)
    validate(config, world_size=1)
    with pytest.raises(UsageError, match="--crop <= --test-scale Q"):
        validate(dataclasses.replace(config, test_scale_override=48), world_size=1)


@pytest.mark.parametrize(
    ("cfg", "init", "init_from", "expected"),
    [
        ("A", None, None, "paper"),
        ("A-LRN", None, None, "paper"),
        ("D", None, None, "glorot"),
        ("E", None, "a.pt", "paper"),
        ("D", "kaiming", None, "kaiming"),
    ],
)
def test_default_init_is_the_papers_choice(cfg, init, init_from, expected):
    assert TrainConfig(cfg=cfg, init=init, init_from=init_from).resolved_init() == expected


def test_every_config_field_has_a_flag():
    option_dests = {action.dest for action in get_args_parser()._actions}
    missing = [f.name for f in dataclasses.fields(TrainConfig) if f.name not in option_dests]
    assert missing == []


def test_flags_override_and_demo_fills_only_unset_geometry():
    parser = get_args_parser()
    config, demo = config_from_args(parser.parse_args(["--cfg", "A", "--crop", "48", "--scale", "50", "60"]))
    assert demo and config.cfg == "A" and config.crop == 48 and config.scale == (50, 60)
    assert config.epochs == 6 and config.batch_size == 256 and config.lr == 1e-2  # demo length, paper optimiser
    config, demo = config_from_args(parser.parse_args(["--data", "/x", "--lr-patience", "5"]))
    assert not demo and config.scale == (256,) and config.crop == 224 and config.lr_patience == 5


# ---------------------------------------------------------------- learning-rate rule


def run_rule(accuracies, *, patience=2, max_decreases=3):
    state, lrs = PlateauState(lr=1e-2), []
    for accuracy in accuracies:
        state = plateau_step(state, val_top1=accuracy, patience=patience, factor=0.1, max_decreases=max_decreases)
        lrs.append(state.lr)
    return state, lrs


@pytest.mark.parametrize(
    ("accuracies", "patience", "expected_lrs"),
    [
        ([0.1, 0.2, 0.3], 2, [1e-2, 1e-2, 1e-2]),  # improving: never decreases
        ([0.5, 0.4, 0.4], 2, [1e-2, 1e-2, 1e-3]),  # two epochs without improvement
        ([0.5, 0.5], 1, [1e-2, 1e-3]),  # equal is not an improvement
        ([0.5, 0.4, 0.6, 0.6], 2, [1e-2, 1e-2, 1e-2, 1e-2]),  # an improvement resets the count
    ],
)
def test_plateau_rule_divides_by_ten_after_patience(accuracies, patience, expected_lrs):
    _, lrs = run_rule(accuracies, patience=patience)
    assert lrs == pytest.approx(expected_lrs)


def test_plateau_rule_decreases_at_most_three_times_and_round_trips():
    state, lrs = run_rule([0.5] + [0.1] * 20, patience=1)
    assert state.decreases == 3 and lrs[-1] == pytest.approx(1e-5) and min(lrs) == pytest.approx(1e-5)
    assert PlateauState.from_dict(state.to_dict()) == state


# ---------------------------------------------------------------- augmentation


@pytest.mark.parametrize(("scale_min", "scale_max"), [(36, 44), (256, 512), (40, 40)])
def test_scale_jitter_stays_within_bounds_and_keeps_aspect(scale_min, scale_max):
    torch.manual_seed(0)
    rescale = RandomIsotropicRescale(scale_min, scale_max)
    image = Image.new("RGB", (30, 20))
    sides = []
    for _ in range(2000):
        width, height = rescale(image).size
        sides.append(height)
        assert width == int(height * 30 / 20)  # torchvision's Resize: the long side truncated
    assert scale_min <= min(sides) <= scale_min + (scale_max - scale_min) // 50
    assert scale_max - (scale_max - scale_min) // 50 <= max(sides) <= scale_max


def test_random_crop_is_a_window_of_the_image_at_varying_positions():
    torch.manual_seed(0)
    image, crop = coordinate_image(60, 40), RandomCrop(32)
    origins = set()
    for _ in range(100):
        pixels = np.asarray(crop(image)).astype(int)
        x0, y0 = pixels[0, 0, 0], pixels[0, 0, 1]
        assert pixels.shape == (32, 32, 3)
        np.testing.assert_array_equal(pixels, np.asarray(image)[y0 : y0 + 32, x0 : x0 + 32])
        origins.add((x0, y0))
    xs, ys = {x for x, _ in origins}, {y for _, y in origins}
    assert min(xs) == 0 and max(xs) == 28 and min(ys) == 0 and max(ys) == 8


def test_horizontal_flip_mirrors_about_half_the_time():
    torch.manual_seed(0)
    image = coordinate_image(20, 10)
    mirrored = np.asarray(image)[:, ::-1]
    flips = [np.array_equal(np.asarray(RandomHorizontalFlip()(image)), mirrored) for _ in range(400)]
    assert 0.4 < np.mean(flips) < 0.6
    assert np.array_equal(np.asarray(RandomHorizontalFlip(1.0)(image)), mirrored)


def test_pca_colour_shift_has_alexnets_covariance():
    """shift = eigvec @ (alpha * eigval) / 255, alpha ~ N(0, std): covariance V diag((std*l/255)^2) V^T."""
    rotation, _ = np.linalg.qr(np.random.default_rng(0).normal(size=(3, 3)))
    eigval = [3000.0, 600.0, 100.0]
    lighting = PCALighting(eigval, rotation.tolist(), std=0.1)
    torch.manual_seed(0)
    shifts = torch.stack([lighting.shift() for _ in range(20000)]).double().numpy()
    expected = rotation @ np.diag((0.1 * np.array(eigval) / 255) ** 2) @ rotation.T
    np.testing.assert_allclose(shifts.mean(axis=0), 0, atol=0.02)
    np.testing.assert_allclose(np.cov(shifts, rowvar=False), expected, atol=0.02 * expected.max())
    image = torch.full((3, 4, 4), 100.0)
    shifted = lighting(image)
    assert torch.allclose(shifted - image, (shifted - image)[:, :1, :1].expand(3, 4, 4))  # same shift per pixel
    assert torch.equal(PCALighting(eigval, rotation.tolist(), std=0.0)(image), image)


def test_pixel_stats_recover_mean_and_principal_axes():
    rng = np.random.default_rng(1)
    axis = np.array([1.0, 1.0, 1.0]) / np.sqrt(3)
    pixels = 120 + rng.normal(0, 40, (64 * 64, 1)) * axis + rng.normal(0, 4, (64 * 64, 3))
    images = [Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8).reshape(64, 64, 3))]
    stats = pixel_stats(images, pixels_per_image=64 * 64)
    np.testing.assert_allclose(stats.mean, 120, atol=3)
    assert stats.pca_eigval[0] > 20 * stats.pca_eigval[1] >= 20 * stats.pca_eigval[2]
    assert abs(np.dot(np.array(stats.pca_eigvec)[:, 0], axis)) > 0.99


def test_train_preset_without_augmentation_is_deterministic_and_normalised():
    stats = Stats(mean=[10.0, 20.0, 0.0], std=[2.0, 2.0, 2.0], pca_eigval=[1.0] * 3, pca_eigvec=np.eye(3).tolist())
    preset = TrainPreset(scale_range=(40, 48), crop=32, stats=stats, pca_std=0.1, augment=False)
    image = coordinate_image(80, 40)
    first, second = preset(image), preset(image)
    assert first.shape == (3, 32, 32) and torch.equal(first, second)
    # S = 40 is the image's height already; the centre 32x32 crop starts at x = 24, y = 4,
    # so its first pixel is RGB (24, 4, 0), normalised to ((24-10)/2, (4-20)/2, (0-0)/2).
    assert first[:, 0, 0].tolist() == [7.0, -8.0, 0.0]
    assert first[:, 31, 31].tolist() == [(55 - 10) / 2, (35 - 20) / 2, 0.0]
    augmented = TrainPreset(scale_range=(40, 48), crop=32, stats=stats, pca_std=0.1, augment=True)
    assert augmented(image).shape == (3, 32, 32)


def test_eval_preset_is_the_served_square_normalised():
    stats = Stats(mean=[10.0, 20.0, 0.0], std=[2.0, 2.0, 1.0], pca_eigval=[0.0] * 3, pca_eigvec=np.eye(3).tolist())
    wide = Image.fromarray(np.random.default_rng(0).integers(0, 256, (50, 90, 3), dtype=np.uint8))
    square = torch.tensor(to_graph_input(wide, 40), dtype=torch.float32).permute(2, 0, 1)
    expected = (square - torch.tensor([10.0, 20.0, 0.0]).view(3, 1, 1)) / torch.tensor([2.0, 2.0, 1.0]).view(3, 1, 1)
    assert torch.equal(EvalPreset(test_scale=40, stats=stats)(wide), expected)


class MeanRedClassifier(torch.nn.Module):
    """Class scores from the mean of the red channel: class 0 for dark crops, 1 for bright ones."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        red = images[:, 0].mean(dim=(1, 2))
        return torch.stack([128 - red, red - 128], dim=1)


def test_evaluate_centre_metric_uses_the_centre_crop():
    """A 6x6 square bright only in its central 4x4 crop's middle: the centre crop says class 1,
    the mean over the five crops class 0."""
    squares = torch.zeros(2, 3, 6, 6)
    squares[:, 0, 1:5, 1:5] = 255.0
    squares[:, 0, 1, 1] = squares[:, 0, 4, 4] = squares[:, 0, 1, 4] = squares[:, 0, 4, 1] = 0.0
    result = evaluate(
        MeanRedClassifier(),
        [(squares, torch.tensor([1, 1]))],
        crop=4,
        device=torch.device("cpu"),
        amp=False,
        channels_last=False,
        show_progress=False,
    )
    assert result["center_top1"] == 1.0 and result["five_top1"] == 0.0


# ---------------------------------------------------------------- data


def test_stratified_split_is_per_class_seeded_and_disjoint():
    targets = [0] * 50 + [1] * 30 + [2] * 20
    train, val = datasets.stratified_split(targets, fraction=0.1, seed=3)
    assert sorted(train + val) == list(range(100)) and not set(train) & set(val)
    assert [sum(targets[i] == c for i in val) for c in range(3)] == [5, 3, 2]
    assert datasets.stratified_split(targets, fraction=0.1, seed=3) == (train, val)
    assert datasets.stratified_split(targets, fraction=0.1, seed=4)[1] != val


def test_folder_splits_carve_val_without_val_folder(tmp_path):
    write_folder(tmp_path / "train", {"a": 10, "b": 20})
    splits = datasets.folder_splits(tmp_path, val_split=0.1, seed=0)
    assert splits.classes == ["a", "b"] and len(splits.val) == 3 and len(splits.train) == 27


@pytest.mark.parametrize("problem", ["missing", "empty_class", "no_classes"])
def test_bad_folders_are_one_line_errors(tmp_path, problem):
    if problem == "empty_class":
        write_folder(tmp_path / "train", {"a": 3})
        (tmp_path / "train" / "b").mkdir()
    elif problem == "no_classes":
        (tmp_path / "train").mkdir()
    root = tmp_path / "nowhere" if problem == "missing" else tmp_path
    with pytest.raises(datasets.DataError) as error:
        datasets.folder_splits(root, val_split=0.1, seed=0)
    assert "\n" not in str(error.value)


def no_augment_preset() -> TrainPreset:
    return TrainPreset(scale_range=(36, 36), crop=32, stats=stats_identity(), pca_std=0.0, augment=False)


@pytest.mark.parametrize("workers", [0, 2])
def test_unreadable_image_is_reported_once_over_workers_and_epochs(tmp_path, caplog, workers):
    write_folder(tmp_path, {"a": 3})
    (tmp_path / "a" / "broken.png").write_bytes(b"not a png")
    _, samples = datasets.list_image_folder(tmp_path)
    loader = datasets.ReportingLoader(
        torch.utils.data.DataLoader(
            datasets.ImageDataset(samples, no_augment_preset()),
            batch_size=1,
            num_workers=workers,
            collate_fn=datasets.collate_skipping,
        )
    )
    with caplog.at_level(logging.WARNING):
        epochs = [[None if batch is None else len(batch[1]) for batch in loader] for _ in range(2)]
    assert [sorted(epoch, key=str) for epoch in epochs] == [[1, 1, 1, None]] * 2
    warnings = [record.getMessage() for record in caplog.records if "broken.png" in record.getMessage()]
    assert len(warnings) == 1 and "unreadable" in warnings[0]


@pytest.mark.parametrize(
    "error", [struct.error("unpack requires a buffer of 4 bytes"), KeyError(274), ZeroDivisionError("division by zero")]
)
def test_any_decoder_exception_skips_the_file_not_the_epoch(tmp_path, monkeypatch, error):
    write_folder(tmp_path, {"a": 2})
    _, samples = datasets.list_image_folder(tmp_path)
    real_open = datasets.open_rgb

    def open_rgb(path):
        if path.endswith("0.png"):
            raise error
        return real_open(path)

    monkeypatch.setattr(datasets, "open_rgb", open_rgb)
    collated = datasets.collate_skipping([datasets.ImageDataset(samples, no_augment_preset())[i] for i in range(2)])
    assert len(collated.batch[1]) == 1 and [item.path for item in collated.unreadable] == [samples[0][0]]
    assert len(datasets.sample_images(samples, count=2, scale=36, seed=0)) == 1


def test_image_extensions_are_the_shared_constant(tmp_path):
    assert datasets.IMAGE_EXTENSIONS is IMAGE_EXTENSIONS
    folder = tmp_path / "c"
    folder.mkdir()
    for name in ("a.JPEG", "b.png", "c.gif", "notes.txt"):
        Image.new("RGB", (8, 8)).save(folder / name, format="PNG") if name != "notes.txt" else (
            folder / name
        ).write_text("x")
    assert [Path(path).name for path, _ in datasets.list_image_folder(tmp_path)[1]] == ["a.JPEG", "b.png", "c.gif"]


@pytest.mark.parametrize("mode", ["L", "CMYK", "P", "RGBA", "I;16"])
def test_any_image_mode_loads_as_rgb(tmp_path, mode):
    image = make_image(0, 0).convert("L" if mode == "I;16" else mode)
    if mode == "I;16":
        image = Image.fromarray(np.asarray(image).astype(np.uint16) * 257)
    path = tmp_path / "c" / ("x.tif" if mode in ("CMYK", "I;16") else "x.png")
    path.parent.mkdir()
    image.save(path)
    _, samples = datasets.list_image_folder(tmp_path)
    tensor, label = datasets.ImageDataset(samples, EvalPreset(test_scale=40, stats=stats_identity()))[0]
    assert label == 0 and tensor.shape == (3, 40, 40)


def test_demo_images_are_deterministic_and_classes_differ():
    assert np.array_equal(np.asarray(make_image(3, 7)), np.asarray(make_image(3, 7)))
    means = np.array([np.asarray(make_image(label, 0)).reshape(-1, 3).mean(0) for label in range(len(CLASSES))])
    distances = np.linalg.norm(means[:, None] - means[None], axis=-1)
    assert len(CLASSES) >= 5 and np.all(distances + np.eye(len(CLASSES)) * 1e3 > 1)


# ---------------------------------------------------------------- checkpoints


def test_checkpoint_round_trip_with_resume_state(tmp_path):
    torch.manual_seed(0)
    config = TrainConfig(cfg="A", fc_width=16, crop=32, scale=(36, 40), data=str(tmp_path))
    model = vgg.build("A", num_classes=3, fc_width=16)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    optimizer.step()
    stats = Stats(mean=[1.0, 2.0, 3.0], std=[4.0, 5.0, 6.0], pca_eigval=[3.0, 2.0, 1.0], pca_eigvec=np.eye(3).tolist())
    history = [
        {
            "epoch": 1,
            "lr": 0.01,
            "train_loss": 1.0,
            "train_top1": 0.5,
            "center_top1": 0.6,
            "center_top5": 1.0,
            "five_top1": 0.7,
            "five_top5": 1.0,
            "seconds": 1.0,
        }
    ]
    random.seed(5)
    np.random.seed(5)
    checkpoint = training_checkpoint(
        config=config,
        model=model,
        optimizer=optimizer,
        rule=PlateauState(lr=0.01),
        epoch=1,
        classes=["x", "y", "z"],
        stats=stats,
        history=history,
        init="paper",
    )
    expected_draws = (random.random(), np.random.rand(), torch.rand(1))
    save_checkpoint(checkpoint, tmp_path / "last.pt")
    loaded = load_checkpoint(tmp_path / "last.pt")  # weights_only=True inside
    rebuilt = model_from_checkpoint(loaded)
    assert all(
        torch.equal(a, b) for a, b in zip(rebuilt.state_dict().values(), model.state_dict().values(), strict=True)
    )
    assert loaded["preprocess"]["crop"] == 32 and loaded["preprocess"]["test_scale"] == 38
    assert loaded["preprocess"]["mean"] == [1.0, 2.0, 3.0] and loaded["metrics"]["val_top1"] == pytest.approx(0.7)
    assert loaded["config"]["scale"] == [36, 40] and TrainConfig.from_dict(loaded["config"]) == config
    fresh = torch.optim.SGD(vgg.build("A", num_classes=3, fc_width=16).parameters(), lr=0.5, momentum=0.9)
    fresh.load_state_dict(loaded["optimizer"])
    assert fresh.param_groups[0]["lr"] == 0.01 and len(fresh.state) == len(list(model.parameters()))
    set_rng_state(loaded["rng"])
    draws = (random.random(), np.random.rand(), torch.rand(1))
    assert draws[:2] == expected_draws[:2] and torch.equal(draws[2], expected_draws[2])
    assert isinstance(rng_state()["numpy"][1], list)


def test_dense_evaluation_averages_softmax_over_scales_and_flips():
    from training.epoch import dense_probabilities, evaluate_dense
    from training.transforms import DensePreset

    torch.manual_seed(0)
    model = vgg.build("A", num_classes=10, fc_width=16, init="kaiming").eval()
    images = [torch.randn(3, 64, 96) for _ in range(6)]  # Q = 64 for a 32 crop: a 2x3 score map
    with torch.no_grad():
        expected = torch.stack([dense_probabilities_by_hand(model, image) for image in images])
        scales = [torch.randn(3, 32, 48), images[0]]  # two scales: the mean of each scale's result
        by_scale = (dense_probabilities_by_hand(model, scales[0]) + expected[0]) / 2
    dense = vgg.to_dense(model, crop=32).eval()
    cpu = torch.device("cpu")
    torch.testing.assert_close(dense_probabilities(dense, [images[0]], device=cpu, amp=False)[0], expected[0])
    torch.testing.assert_close(dense_probabilities(dense, scales, device=cpu, amp=False)[0], by_scale)
    labels = expected.argsort(dim=1, descending=True)[:, [0, 0, 1, 4, 5, 9]].diagonal().tolist()  # ranks 1,1,2,5,6,10
    batch = [([image], label) for image, label in zip(images, labels, strict=True)]
    result = evaluate_dense(model, [batch], crop=32, device=torch.device("cpu"), amp=False)
    assert result == pytest.approx({"dense_top1": 2 / 6, "dense_top5": 4 / 6})
    views = DensePreset(scales=[32, 40], stats=stats_identity())(coordinate_image(64, 32))
    assert [tuple(view.shape) for view in views] == [(3, 32, 64), (3, 40, 80)]


# ---------------------------------------------------------------- the CLI's checks


def test_resume_continues_in_the_given_out_directory(tmp_path):
    saved = TrainConfig(cfg="A", out=str(tmp_path / "old"), epochs=2).to_dict()
    args = argparse.Namespace(resume=True, out=str(tmp_path / "new"), epochs=5, lr=0.5)
    config = resumed_config(saved, args)
    assert config.out == str(tmp_path / "new") and config.epochs == 5 and config.lr == TrainConfig().lr


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"dropout": 1.5}, "--dropout"),
        ({"dropout": -0.1}, "--dropout"),
        ({"momentum": -1.0}, "--momentum"),
        ({"weight_decay": -1.0}, "--weight-decay"),
        ({"workers": -1}, "--workers"),
        ({"stats_images": 0}, "--stats-images"),
        ({"lr_factor": 0.0}, "--lr-factor"),
        ({"lr_patience": -1}, "--lr-patience"),
        ({"pca_std": -0.1}, "--pca-std"),
        ({"log_every": -1}, "--log-every"),
        ({"out": "FILE"}, "is a file"),
    ],
)
def test_validate_rejects_unusable_flags_in_one_line(tmp_path, change, message):
    if change.get("out") == "FILE":
        (tmp_path / "f").write_text("x")
        change = {"out": str(tmp_path / "f")}
    config = dataclasses.replace(TrainConfig(data=str(tmp_path)), **change)
    with pytest.raises(UsageError, match=message) as error:
        validate(config, world_size=1)
    assert "\n" not in str(error.value)
    validate(dataclasses.replace(config, **{key: getattr(TrainConfig(), key) for key in change}), world_size=1)


@pytest.mark.parametrize(
    ("name", "message"),
    [("foo", "expected auto, cpu"), ("cuda", "no CUDA GPU"), ("cuda:1", "no CUDA GPU"), ("meta", "expected auto, cpu")],
)
def test_unusable_device_is_a_usage_error(monkeypatch, name, message):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UsageError, match=message):
        resolve_device(name)
    assert resolve_device("auto") == torch.device("cpu") == resolve_device("cpu")


def test_process_group_timeout_outlasts_rank_0_evaluation(monkeypatch):
    calls = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(distributed.dist, "init_process_group", lambda **kwargs: calls.append(kwargs))
    runtime = distributed.setup_runtime("cpu")
    assert runtime.rank == 1 and runtime.distributed
    assert calls == [{"backend": "gloo", "timeout": distributed.PROCESS_GROUP_TIMEOUT}]
    assert distributed.PROCESS_GROUP_TIMEOUT.total_seconds() >= 3600


def test_diverging_run_is_one_line_and_exit_1(monkeypatch, capsys):
    def diverge(args):
        raise FloatingPointError("training loss is nan at epoch 1 step 10")

    monkeypatch.setattr(training_run, "main", diverge)
    assert training_run.cli(["--data", "x"]) == 1
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: training diverged") and "\n" not in error


@pytest.mark.parametrize(
    "arch",
    [
        {},
        {"cfg": "A", "batch_norm": False},
        {"cfg": "Z", "num_classes": 3, "batch_norm": False},
        {"cfg": "A", "num_classes": "ten", "batch_norm": False},
        "A",
    ],
)
def test_model_from_checkpoint_with_a_bad_arch_is_a_checkpoint_error(arch):
    from vgg.checkpoint import CheckpointError

    with pytest.raises(CheckpointError, match="arch"):
        model_from_checkpoint({"arch": arch, "model": {}})


def draw_epochs(tmp_path, epochs: list[int]) -> list[torch.Tensor]:
    """Training batches of the given epochs from freshly built loaders with 2 workers."""
    write_folder(tmp_path / "train", {"a": 4, "b": 4}, size=40)
    splits = datasets.folder_splits(tmp_path, val_split=0.25, seed=0)
    config = TrainConfig(cfg="A", scale=(36, 44), crop=32, batch_size=6, workers=2, seed=3)
    loaders = make_loaders(config, splits, stats_identity(), Runtime(device=torch.device("cpu"), rank=0, world_size=1))
    torch.manual_seed(123)  # the main process's RNG differs between the epochs of a run and a resumed run
    drawn = []
    for epoch in epochs:
        torch.rand(epoch)
        loaders.start_epoch(epoch, seed=config.seed, rank=0)
        drawn.append(torch.cat([batch[0] for batch in loaders.train]))
    return drawn


def test_worker_augmentations_depend_only_on_seed_and_epoch(tmp_path):
    """A resumed run's workers (started at epoch 2) draw what an uninterrupted run's draw in epoch 2."""
    first, second = draw_epochs(tmp_path, [1, 2])
    (resumed,) = draw_epochs(tmp_path / "again", [2])
    assert torch.equal(resumed, second) and not torch.equal(first, second)


@pytest.mark.parametrize("decay_bias", [True, False])
def test_no_decay_bias_exempts_biases_and_batch_norm_from_weight_decay(decay_bias):
    from training.epoch import make_optimizer

    args = get_args_parser().parse_args(["--cfg", "A", "--batch-norm", *([] if decay_bias else ["--no-decay-bias"])])
    config, _ = config_from_args(args)
    assert config.decay_bias is decay_bias
    config = dataclasses.replace(config, lr=0.1, momentum=0.0, weight_decay=0.5)
    model = vgg.build("A", num_classes=3, fc_width=8, batch_norm=True)
    before = {name: value.detach().clone() for name, value in model.named_parameters()}
    optimizer = make_optimizer(model, config)
    for parameter in model.parameters():
        parameter.grad = torch.zeros_like(parameter)
    optimizer.step()  # zero gradient: only weight decay moves a parameter, by lr * wd = 5 %
    for name, value in model.named_parameters():
        one_d = value.ndim == 1  # conv/linear biases and BatchNorm scale and shift
        decayed = decay_bias or not one_d
        expected = before[name] * (0.95 if decayed else 1.0)
        torch.testing.assert_close(value.detach(), expected, msg=name)
    assert any("bias" in name for name in before) and any("features.1.weight" == name for name in before)


def test_build_model_pre_initialises_from_a_trained_net_a(tmp_path):
    """--init-from (section 3.1): D's first four convs and three FC layers come from A's checkpoint."""
    source = vgg.build("A", num_classes=3, fc_width=16)
    checkpoint = {
        "format": "vgg-checkpoint/1",
        "model": source.state_dict(),
        "classes": ["a", "b", "c"],
        "arch": {"cfg": "A", "batch_norm": False, "num_classes": 3, "dropout": 0.5, "fc_width": 16},
        "preprocess": {"mean": [0.0] * 3, "std": [1.0] * 3, "crop": 32, "test_scale": 36},
    }
    save_checkpoint(checkpoint, tmp_path / "a.pt")
    config = TrainConfig(cfg="D", fc_width=16, init_from=str(tmp_path / "a.pt"))
    model, init = build_model(config, num_classes=3)
    assert "first 4 convs and 3 FC layers" in init
    assert torch.equal(model.features[0].weight, source.features[0].weight)
    assert torch.equal(model.classifier[-1].weight, source.classifier[-1].weight)


def test_runs_saved_with_errors_resume_with_accuracies():
    from training.history import upgrade_row

    legacy = {"epoch": 3, "lr": 0.01, "train_loss": 0.5, "train_top1_err": 0.25, "five_top1_err": 0.1, "seconds": 2.0}
    assert upgrade_row(legacy) == {
        "epoch": 3,
        "lr": 0.01,
        "train_loss": 0.5,
        "train_top1": 0.75,
        "five_top1": pytest.approx(0.9),
        "seconds": 2.0,
    }
    assert upgrade_row(upgrade_row(legacy)) == upgrade_row(legacy)
