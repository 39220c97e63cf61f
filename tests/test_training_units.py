"""Training building blocks (paper, section 3.1): LR rule, augmentation, data, checkpoints."""

from __future__ import annotations

import dataclasses
import logging
import random

import numpy as np
import pytest
import torch
from PIL import Image

import vgg
from training import data as datasets
from training.config import TrainConfig
from training.demo import CLASSES, make_image
from training.lr import PlateauState, plateau_step
from training.run import UsageError, checkpoint_dict, config_from_args, get_args_parser, rng_state, set_rng_state, validate
from training.transforms import (
    EvalPreset,
    PCALighting,
    RandomCrop,
    RandomHorizontalFlip,
    RandomIsotropicRescale,
    Stats,
    TrainPreset,
    dense_scales,
    five_crop_boxes,
    pixel_stats,
)
from vgg.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint

# ---------------------------------------------------------------- the recipe and its flags


def test_defaults_are_the_papers_recipe():
    config = TrainConfig()
    assert (config.batch_size, config.momentum, config.weight_decay, config.dropout) == (256, 0.9, 5e-4, 0.5)
    assert (config.lr, config.lr_factor, config.lr_max_decreases, config.epochs) == (1e-2, 0.1, 3, 74)
    assert (config.scale, config.crop, config.pca_std, config.fc_width) == ((256,), 224, 0.1, 4096)
    assert config.test_scale == 256 and dataclasses.replace(config, scale=(256, 512)).test_scale == 384


def test_test_scale_flag_overrides_the_papers_q():
    args = get_args_parser().parse_args(["--cfg", "A", "--data", "x", "--scale", "64", "128", "--crop", "56",
                                         "--test-scale", "64"])
    config, demo = config_from_args(args)
    assert not demo and config.test_scale == 64 and config.scale_range == (64, 128)
    validate(config, world_size=1)
    with pytest.raises(UsageError, match="--test-scale Q >= --crop"):
        validate(dataclasses.replace(config, eval_scale=48), world_size=1)


@pytest.mark.parametrize(
    ("cfg", "init", "init_from", "expected"),
    [("A", None, None, "paper"), ("A-LRN", None, None, "paper"), ("D", None, None, "glorot"),
     ("E", None, "a.pt", "paper"), ("D", "kaiming", None, "kaiming")],
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


def coordinate_image(width: int, height: int) -> Image.Image:
    """R = x, G = y: every pixel says where it came from."""
    yy, xx = np.mgrid[0:height, 0:width]
    return Image.fromarray(np.stack([xx, yy, np.zeros_like(xx)], axis=-1).astype(np.uint8))


@pytest.mark.parametrize(("scale_min", "scale_max"), [(36, 44), (256, 512), (40, 40)])
def test_scale_jitter_stays_within_bounds_and_keeps_aspect(scale_min, scale_max):
    torch.manual_seed(0)
    rescale = RandomIsotropicRescale(scale_min, scale_max)
    image = Image.new("RGB", (30, 20))
    sides = []
    for _ in range(2000):
        width, height = rescale(image).size
        sides.append(height)
        assert width == round(30 * height / 20)
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
        np.testing.assert_array_equal(pixels, np.asarray(image)[y0:y0 + 32, x0:x0 + 32])
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


def stats_identity() -> Stats:
    return Stats(mean=[0.0] * 3, std=[1.0] * 3, pca_eigval=[0.0] * 3, pca_eigvec=np.eye(3).tolist())


def test_train_preset_without_augmentation_is_deterministic_and_normalised():
    stats = Stats(mean=[10.0, 20.0, 0.0], std=[2.0, 2.0, 2.0], pca_eigval=[1.0] * 3, pca_eigvec=np.eye(3).tolist())
    preset = TrainPreset(scale_range=(40, 48), crop=32, stats=stats, pca_std=0.1, augment=False)
    image = coordinate_image(80, 40)
    first, second = preset(image), preset(image)
    assert first.shape == (3, 32, 32) and torch.equal(first, second)
    augmented = TrainPreset(scale_range=(40, 48), crop=32, stats=stats, pca_std=0.1, augment=True)
    assert augmented(image).shape == (3, 32, 32)


def test_eval_preset_five_crops_in_torchvision_order():
    preset = EvalPreset(test_scale=40, crop=32, stats=stats_identity())
    center, five = preset(coordinate_image(40, 40))
    assert five.shape == (5, 3, 32, 32) and torch.equal(center, five[4])
    origins = [(int(view[0, 0, 0]), int(view[1, 0, 0])) for view in five]
    assert origins == [(0, 0), (8, 0), (0, 8), (8, 8), (4, 4)]
    assert five_crop_boxes(40, 40, 32)[4] == (4, 4, 36, 36)


@pytest.mark.parametrize(("scale_range", "crop", "expected"),
                         [((256, 256), 224, [224, 256, 288]), ((256, 512), 224, [256, 384, 512]), ((36, 36), 32, [32, 36, 68])])
def test_dense_scales_follow_section_4_2(scale_range, crop, expected):
    assert dense_scales(scale_range, crop) == expected


# ---------------------------------------------------------------- data


def write_folder(root, counts: dict[str, int], size=40):
    for label, (name, count) in enumerate(counts.items()):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for index in range(count):
            make_image(label % len(CLASSES), index, size=size).save(folder / f"{index}.png")


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


def test_unreadable_image_is_reported_once_and_skipped(tmp_path, caplog):
    write_folder(tmp_path, {"a": 2})
    broken = tmp_path / "a" / "broken.png"
    broken.write_bytes(b"not a png")
    _, samples = datasets.list_image_folder(tmp_path)
    dataset = datasets.ImageDataset(samples, TrainPreset(scale_range=(36, 36), crop=32, stats=stats_identity(),
                                                         pca_std=0.0, augment=False))
    with caplog.at_level(logging.WARNING):
        batches = [datasets.collate_skipping([dataset[i] for i in range(len(dataset))]) for _ in range(2)]
    assert [len(batch[1]) for batch in batches] == [2, 2]
    warnings = [record.getMessage() for record in caplog.records if "broken.png" in record.getMessage()]
    assert len(warnings) == 1 and "unreadable" in warnings[0]


@pytest.mark.parametrize("mode", ["L", "CMYK", "P", "RGBA", "I;16"])
def test_any_image_mode_loads_as_rgb(tmp_path, mode):
    image = make_image(0, 0).convert("L" if mode == "I;16" else mode)
    if mode == "I;16":
        image = Image.fromarray((np.asarray(image).astype(np.uint16) * 257))
    path = tmp_path / "c" / ("x.tif" if mode in ("CMYK", "I;16") else "x.png")
    path.parent.mkdir()
    image.save(path)
    _, samples = datasets.list_image_folder(tmp_path)
    tensor, label = datasets.ImageDataset(samples, EvalPreset(test_scale=40, crop=32, stats=stats_identity()))[0]
    assert label == 0 and tensor[0].shape == (3, 32, 32)


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
    history = [{"epoch": 1, "lr": 0.01, "train_loss": 1.0, "train_top1_err": 0.5, "center_top1_err": 0.4,
                "center_top5_err": 0.0, "five_top1_err": 0.3, "five_top5_err": 0.0, "seconds": 1.0}]
    random.seed(5)
    np.random.seed(5)
    checkpoint = checkpoint_dict(config=config, model=model, optimizer=optimizer, rule=PlateauState(lr=0.01),
                                 epoch=1, classes=["x", "y", "z"], stats=stats, history=history, init="paper")
    expected_draws = (random.random(), np.random.rand(), torch.rand(1))
    save_checkpoint(checkpoint, tmp_path / "last.pt")
    loaded = load_checkpoint(tmp_path / "last.pt")  # weights_only=True inside
    rebuilt = model_from_checkpoint(loaded)
    assert all(torch.equal(a, b) for a, b in zip(rebuilt.state_dict().values(), model.state_dict().values()))
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
    """With the single scale Q = crop, dense evaluation is the FC net on the image and its mirror."""
    from training.engine import evaluate_dense
    from training.transforms import DensePreset

    torch.manual_seed(0)
    model = vgg.build("A", num_classes=4, fc_width=16, init="kaiming").eval()
    images = [torch.randn(3, 32, 32) for _ in range(3)]
    labels = [0, 1, 2]
    batch = [([image], label) for image, label in zip(images, labels)]
    result = evaluate_dense(model, [batch], crop=32, device=torch.device("cpu"), amp=False)
    with torch.no_grad():
        stacked = torch.stack(images)
        probs = (model(stacked).softmax(1) + model(stacked.flip(3)).softmax(1)) / 2
    assert result["dense_top1"] == pytest.approx((probs.argmax(1) == torch.tensor(labels)).float().mean().item())
    assert result["dense_top5"] == 1.0  # 4 classes: top-5 always holds the label
    views = DensePreset(scales=[32, 40], stats=stats_identity())(coordinate_image(64, 32))
    assert [tuple(view.shape) for view in views] == [(3, 32, 64), (3, 40, 80)]
