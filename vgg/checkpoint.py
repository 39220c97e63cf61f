"""Training checkpoints: written atomically, read without unpickling code.

A checkpoint is a plain dict (tensors, numbers, strings, lists, dicts), loadable with
``torch.load(weights_only=True)``::

    format       "vgg-checkpoint/1"
    arch         {"cfg": "D", "batch_norm": False, "num_classes": 10, "dropout": 0.5, "fc_width": 4096}
    model        the model's state_dict
    classes      class names, index order
    preprocess   {"mean": [r, g, b], "std": [r, g, b], "pca_eigval": [3], "pca_eigvec": [[3]x3],
                  "crop": 224, "test_scale": 256}   (pixel units, 0..255)
    metrics      {"epoch": int, "val_top1": float, "val_top5": float, "center_top1": float,
                  "center_top5": float, "train_loss": float}   (accuracies, 0..1; val = FiveCrop)
    config       the resolved training configuration (a converted state dict: where it came from)
    optimizer, lr_rule, epoch, rng, history   resume state (training only)

:func:`build_checkpoint` assembles one; :func:`save_checkpoint` writes it atomically.

Plain VGG state dicts in torchvision's layout (``features.N.weight``, ``classifier.N.weight``,
with or without BatchNorm keys; ``torch.save`` files or ``.safetensors``) become checkpoints
with :func:`checkpoint_from_state_dict`; :func:`load_any` reads either kind of file, and
``python -m vgg.checkpoint --from-state-dict FILE --out CKPT [--labels FILE]`` writes the
converted checkpoint.
"""

from __future__ import annotations

import os
import pickle
import re
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from vgg.errors import one_line
from vgg.model import CONFIG_NAMES, FC_WIDTH, VGG, build

__all__ = [
    "CHECKPOINT_FORMAT",
    "CheckpointError",
    "RESUME_KEYS",
    "build_checkpoint",
    "save_checkpoint",
    "load_checkpoint",
    "model_from_checkpoint",
    "read_state_dict",
    "infer_arch",
    "imagenet_classes",
    "read_labels",
    "checkpoint_from_state_dict",
    "torchvision_preprocess",
    "load_any",
]

CHECKPOINT_FORMAT = "vgg-checkpoint/1"
REQUIRED_KEYS = ("format", "arch", "model", "classes", "preprocess")
ARCH_KEYS = ("cfg", "batch_norm", "num_classes", "dropout", "fc_width")
PREPROCESS_KEYS = ("mean", "std", "pca_eigval", "pca_eigvec", "crop", "test_scale")
METRIC_KEYS = ("epoch", "val_top1", "val_top5", "center_top1", "center_top5", "train_loss")
RESUME_KEYS = ("config", "optimizer", "lr_rule", "epoch", "rng", "history")


class CheckpointError(ValueError):
    """A file that is missing, truncated, foreign or unsafe to load as a checkpoint."""


def build_checkpoint(
    model: torch.nn.Module,
    *,
    arch: Mapping[str, Any],
    classes: Sequence[str],
    preprocess: Mapping[str, Any],
    metrics: Mapping[str, Any],
    config: Mapping[str, Any] | None = None,
    resume: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """A checkpoint of the schema above: ``model``'s weights (detached, contiguous, on the CPU)
    and the given parts. ``resume`` holds the training-only state (optimizer, lr_rule, epoch,
    rng, history). Raises ``ValueError`` when a part lacks one of the schema's keys."""
    for part, value, keys in (
        ("arch", arch, ARCH_KEYS),
        ("preprocess", preprocess, PREPROCESS_KEYS),
        ("metrics", metrics, METRIC_KEYS),
    ):
        missing = [key for key in keys if key not in value]
        if missing:
            raise ValueError(f"checkpoint {part} lacks {', '.join(missing)}")
    if int(arch["num_classes"]) != len(classes):
        raise ValueError(f"{len(classes)} class names for num_classes {arch['num_classes']}")
    checkpoint = {
        "format": CHECKPOINT_FORMAT,
        "arch": dict(arch),
        "model": {key: value.detach().cpu().contiguous() for key, value in model.state_dict().items()},
        "classes": [str(name) for name in classes],
        "preprocess": dict(preprocess),
        "metrics": dict(metrics),
    }
    if config is not None:
        checkpoint["config"] = dict(config)
    return {**checkpoint, **(resume or {})}


def save_checkpoint(checkpoint: dict[str, Any], path: str | os.PathLike) -> None:
    """Write ``checkpoint`` to ``path`` atomically: temp file, fsync, rename, fsync dir."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as file:
            torch.save(checkpoint, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temp_name, path)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def _unsafe_reason(error: pickle.UnpicklingError) -> str:
    """Why ``torch.load(weights_only=True)`` refused a file, in this project's words (torch's
    own message suggests loading it unsafely, which must not be repeated as advice)."""
    named = re.search(r"(?:GLOBAL|global) '?([\w.]+)", str(error))
    found = f" (it references {named.group(1)})" if named else ""
    return (
        f"it holds Python objects other than tensors and plain data{found}, and unpickling them could run "
        "code; only checkpoints and state dicts of tensors are accepted"
    )


def _read_file(path: Path, *, map_location: str | torch.device = "cpu") -> Any:
    """The object stored in ``path`` (``torch.save`` or ``.safetensors``); one-line errors."""
    if not path.exists():
        raise CheckpointError(f"{path}: no such file")
    if not path.is_file():
        raise CheckpointError(f"{path}: not a file")
    if _is_safetensors(path):
        return _read_safetensors(path)
    try:
        with warnings.catch_warnings():  # e.g. "Detected pickle protocol 4": the error below says it all
            warnings.simplefilter("ignore")
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        if "global" not in str(error).lower():  # not a pickle of objects at all (text, stray bytes)
            raise CheckpointError(f"{path}: not a readable checkpoint ({one_line(error, with_type=True)})") from None
        raise CheckpointError(f"{path}: refused to load: {_unsafe_reason(error)}") from None
    except Exception as error:  # torch.load raises many types on foreign bytes; all mean "not readable"
        raise CheckpointError(f"{path}: not a readable checkpoint ({one_line(error, with_type=True)})") from None


def _check_project_checkpoint(checkpoint: Any, path: Path) -> dict[str, Any]:
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: not a VGG checkpoint (expected format {CHECKPOINT_FORMAT!r})")
    missing = [key for key in REQUIRED_KEYS if key not in checkpoint]
    if missing:
        raise CheckpointError(f"{path}: checkpoint lacks {', '.join(missing)}")
    return checkpoint


def load_checkpoint(path: str | os.PathLike, *, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load and validate a checkpoint; raise :class:`CheckpointError` with a one-line reason."""
    path = Path(path)
    return _check_project_checkpoint(_read_file(path, map_location=map_location), path)


def model_from_checkpoint(checkpoint: dict[str, Any]) -> VGG:
    """Rebuild the model of a loaded checkpoint (in eval mode, on the CPU).

    Raises :class:`CheckpointError` when ``arch`` lacks a key or holds an unusable value, or
    when the weights do not fit the architecture.
    """
    arch = checkpoint.get("arch")
    if not isinstance(arch, dict):
        raise CheckpointError("checkpoint 'arch' is not a dict")
    missing = [key for key in ("cfg", "num_classes", "batch_norm") if key not in arch]
    if missing:
        raise CheckpointError(f"checkpoint 'arch' lacks {', '.join(missing)}")
    try:
        model = build(
            arch["cfg"],
            num_classes=arch["num_classes"],
            batch_norm=arch["batch_norm"],
            dropout=arch.get("dropout", 0.5),
            fc_width=arch.get("fc_width", FC_WIDTH),
        )
    except (KeyError, TypeError, ValueError, RuntimeError) as error:
        raise CheckpointError(f"checkpoint 'arch' is not a buildable VGG ({one_line(error)})") from None
    try:
        model.load_state_dict(checkpoint["model"], strict=True)
    except (RuntimeError, TypeError, AttributeError, KeyError) as error:
        raise CheckpointError(f"checkpoint weights do not fit VGG-{arch['cfg']}: {one_line(error)}") from None
    return model.eval()


# ----------------------------------------------------------------------------- plain state dicts

SAFETENSORS_SUFFIX = ".safetensors"
IMAGENET_CLASS_COUNT = 1000
# Wrappers many training loops write around a state dict: {"state_dict": {...}} or {"model": {...}}.
WRAPPER_KEYS = ("state_dict", "model")
DDP_PREFIX = "module."
OPTIONAL_SUFFIX = ".num_batches_tracked"  # absent from torchvision's older BatchNorm files
# torchvision's evaluation preset for its ImageNet VGG weights: Resize(256), CenterCrop(224).
TORCHVISION_CROP = 224
TORCHVISION_TEST_SCALE = 256


def _is_safetensors(path: Path) -> bool:
    """``.safetensors`` by name, or by content: an 8-byte little-endian header length, then ``{``."""
    if path.suffix.lower() == SAFETENSORS_SUFFIX:
        return True
    try:
        with path.open("rb") as file:
            head = file.read(9)
    except OSError:
        return False
    return len(head) == 9 and head[8:9] == b"{" and 2 <= int.from_bytes(head[:8], "little") <= path.stat().st_size


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError, TypeError) as error:
        raise CheckpointError(f"{path}: not a readable .safetensors file ({one_line(error)})") from None


def _is_tensor_dict(value: Any) -> bool:
    return (
        isinstance(value, dict)
        and bool(value)
        and all(isinstance(key, str) and isinstance(tensor, torch.Tensor) for key, tensor in value.items())
    )


def _tensors_of(loaded: Any, path: Path) -> dict[str, torch.Tensor]:
    """The ``{key: tensor}`` dict in a loaded file: plain, wrapped (``{"state_dict": ...}``) or DDP-prefixed."""
    state = loaded
    if isinstance(loaded, dict) and not _is_tensor_dict(loaded):
        state = next((loaded[key] for key in WRAPPER_KEYS if _is_tensor_dict(loaded.get(key))), None)
    if not _is_tensor_dict(state):
        raise CheckpointError(f"{path}: neither a VGG checkpoint ({CHECKPOINT_FORMAT}) nor a state dict of tensors")
    if all(key.startswith(DDP_PREFIX) for key in state):
        state = {key.removeprefix(DDP_PREFIX): tensor for key, tensor in state.items()}
    return dict(state)


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of a state-dict file (``torch.save`` with ``weights_only=True``, or ``.safetensors``)."""
    path = Path(path)
    return _tensors_of(_read_file(path), path)


def _expected_shapes(cfg: str, *, batch_norm: bool, num_classes: int, fc_width: int) -> dict[str, tuple[int, ...]]:
    """``{key: shape}`` of a VGG's state dict, in module order (built on the meta device: no memory)."""
    with torch.device("meta"):
        model = build(cfg, num_classes=num_classes, batch_norm=batch_norm, fc_width=fc_width)
    return {key: tuple(value.shape) for key, value in model.state_dict().items()}


def _shape(value: torch.Tensor) -> tuple[int, ...]:
    return tuple(value.shape)


def _first_misfit(
    state: dict[str, torch.Tensor],
    expected: dict[str, tuple[int, ...]],
    name: str,
) -> tuple[tuple[int, int], str | None]:
    """((keys that fit before the first misfit, keys that fit in all), a one-line misfit or None)."""
    fits = sum(1 for key, shape in expected.items() if key in state and _shape(state[key]) == shape)
    for position, (key, shape) in enumerate(expected.items()):
        if key not in state:
            if key.endswith(OPTIONAL_SUFFIX):
                continue
            return (position, fits), f"lacks key {key!r} (VGG-{name} has it, shape {shape})"
        if _shape(state[key]) != shape:
            return (position, fits), f"key {key!r} has shape {_shape(state[key])}, VGG-{name} expects {shape}"
    extra = next((key for key in state if key not in expected), None)
    if extra is not None:
        return (len(expected), fits), f"unexpected key {extra!r} (shape {_shape(state[extra])}) for VGG-{name}"
    return (len(expected), fits), None


def _head_size(state: dict[str, torch.Tensor], key: str, default: int) -> int:
    value = state.get(key)
    return (
        int(value.shape[0]) if isinstance(value, torch.Tensor) and value.ndim == 2 and value.shape[0] > 0 else default
    )


def infer_arch(state: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The ``arch`` (configuration, BatchNorm, classes, FC width) whose keys and shapes are exactly ``state``'s.

    Raises :class:`CheckpointError` naming the first key or shape that fits no configuration
    (compared with the configuration that fits longest).
    """
    if not any(key.startswith("features.") for key in state):
        raise CheckpointError(
            f"not a VGG checkpoint or torchvision-layout VGG state dict: no 'features.N' keys "
            f"(first key {next(iter(state))!r})"
        )
    batch_norm = any(key.startswith("features.") and key.endswith(".running_mean") for key in state)
    num_classes = _head_size(state, "classifier.6.weight", IMAGENET_CLASS_COUNT)
    fc_width = _head_size(state, "classifier.0.weight", FC_WIDTH)
    closest: tuple[tuple[int, int], str] = ((-1, -1), "")
    for cfg in CONFIG_NAMES:
        name = f"{cfg}{' with BatchNorm' if batch_norm else ''}"
        fitted, misfit = _first_misfit(
            state, _expected_shapes(cfg, batch_norm=batch_norm, num_classes=num_classes, fc_width=fc_width), name
        )
        if misfit is None:
            return {
                "cfg": cfg,
                "batch_norm": batch_norm,
                "num_classes": num_classes,
                "dropout": 0.5,
                "fc_width": fc_width,
            }
        closest = max(closest, (fitted, misfit), key=lambda pair: pair[0])
    raise CheckpointError(f"matches no VGG configuration: {closest[1]}")


def imagenet_classes() -> list[str]:
    """ImageNet-1k's class names in index order, from the installed torchvision (no download)."""
    from torchvision.models import VGG16_Weights

    return list(VGG16_Weights.IMAGENET1K_V1.meta["categories"])


def read_labels(path: str | os.PathLike) -> list[str]:
    """Class names from a text file, one per line in index order (trailing blank lines ignored)."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise CheckpointError(f"--labels {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as error:
        raise CheckpointError(f"--labels {path}: not a readable UTF-8 text file ({one_line(error)})") from None
    names = [line.strip() for line in lines]
    while names and not names[-1]:
        names.pop()
    if not names:
        raise CheckpointError(f"--labels {path}: no class names (one name per line)")
    if "" in names:
        raise CheckpointError(f"--labels {path}: line {names.index('') + 1} is empty (one class name per line)")
    return names


def _resolve_classes(num_classes: int, labels: list[str] | None, *, need_names: bool) -> list[str]:
    if labels is not None:
        if len(labels) != num_classes:
            raise CheckpointError(f"--labels has {len(labels)} names but the weights have {num_classes} classes")
        return list(labels)
    if num_classes == IMAGENET_CLASS_COUNT:
        return imagenet_classes()
    if need_names:
        raise CheckpointError(
            f"the weights have {num_classes} classes, not ImageNet's {IMAGENET_CLASS_COUNT}: "
            "give --labels FILE (one class name per line, in index order)"
        )
    return [str(index) for index in range(num_classes)]


def torchvision_preprocess() -> dict[str, Any]:
    """``preprocess`` of torchvision's ImageNet weights: ImageNet mean/std, Q = 256, crop 224, AlexNet's PCA."""
    from vgg.preprocessing import IMAGENET_MEAN_RGB, IMAGENET_PCA_EIGVAL, IMAGENET_PCA_EIGVEC, IMAGENET_STD_RGB

    return {
        "mean": list(IMAGENET_MEAN_RGB),
        "std": list(IMAGENET_STD_RGB),
        "pca_eigval": list(IMAGENET_PCA_EIGVAL),
        "pca_eigvec": [list(row) for row in IMAGENET_PCA_EIGVEC],
        "crop": TORCHVISION_CROP,
        "test_scale": TORCHVISION_TEST_SCALE,
    }


def _as_model_state(state: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """``state`` in module order, floats as float32, missing BatchNorm counters as 0."""
    model = {}
    for key in expected:
        value = state.get(key, torch.tensor(0, dtype=torch.long))
        model[key] = value.to(torch.float32).contiguous() if value.is_floating_point() else value.contiguous()
    return model


def checkpoint_from_state_dict(
    state: dict[str, torch.Tensor],
    *,
    labels: list[str] | None = None,
    source: str | os.PathLike | None = None,
    need_names: bool = True,
) -> dict[str, Any]:
    """A checkpoint (this module's schema) for a torchvision-layout VGG state dict.

    ``arch`` is inferred from the keys and shapes (:func:`infer_arch`); ``classes`` are
    ``labels``, else ImageNet-1k's names for 1,000 outputs (else :class:`CheckpointError`, or
    index numbers when ``need_names`` is false); ``preprocess`` is torchvision's for its
    ImageNet weights (:func:`torchvision_preprocess`); ``config`` says where the weights came from.
    """
    arch = infer_arch(state)
    expected = _expected_shapes(
        arch["cfg"], batch_norm=arch["batch_norm"], num_classes=arch["num_classes"], fc_width=arch["fc_width"]
    )
    return {
        "format": CHECKPOINT_FORMAT,
        "arch": arch,
        "model": _as_model_state(state, expected),
        "classes": _resolve_classes(arch["num_classes"], labels, need_names=need_names),
        "preprocess": torchvision_preprocess(),
        "metrics": {},
        "config": {
            "converted_from": str(source) if source is not None else None,
            "source_format": "torchvision-layout VGG state dict",
        },
    }


def load_any(
    path: str | os.PathLike,
    *,
    labels: list[str] | None = None,
    need_names: bool = True,
) -> dict[str, Any]:
    """A checkpoint from ``path``: this project's checkpoint, or a converted VGG state dict.

    ``labels`` (class names) replace the checkpoint's classes; their count must fit. Raises
    :class:`CheckpointError` with a one-line reason for anything else.
    """
    path = Path(path)
    loaded = _read_file(path)
    if isinstance(loaded, dict) and "format" in loaded:
        checkpoint = _check_project_checkpoint(loaded, path)
        if labels is not None:
            num_classes = (checkpoint.get("arch") or {}).get("num_classes", len(checkpoint["classes"]))
            checkpoint = {**checkpoint, "classes": _resolve_classes(int(num_classes), labels, need_names=True)}
        return checkpoint
    state = _tensors_of(loaded, path)
    try:
        return checkpoint_from_state_dict(state, labels=labels, source=path.resolve(), need_names=need_names)
    except CheckpointError as error:
        raise CheckpointError(f"{path}: {error}") from None


# ----------------------------------------------------------------------------- command line


def _parse_args(argv: list[str] | None):
    from vgg.errors import OneLineArgumentParser

    parser = OneLineArgumentParser(
        prog="python -m vgg.checkpoint",
        description="Convert a VGG state dict in torchvision's layout (.pth/.pt or .safetensors) into a checkpoint "
        "that export, evaluation and fine-tuning take.",
    )
    parser.add_argument("--from-state-dict", required=True, metavar="FILE", help="torchvision-layout VGG state dict")
    parser.add_argument("--out", required=True, metavar="CKPT", help="checkpoint to write (atomically)")
    parser.add_argument(
        "--labels",
        metavar="FILE",
        help="class names, one per line in index order (default for 1,000 classes: ImageNet-1k's)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    import sys

    args = _parse_args(argv)
    try:
        labels = read_labels(args.labels) if args.labels else None
        checkpoint = load_any(args.from_state_dict, labels=labels)
        save_checkpoint(checkpoint, args.out)
    except CheckpointError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except OSError as error:
        print(f"error: cannot write {args.out}: {error.strerror or error}", file=sys.stderr)
        return 2
    arch = checkpoint["arch"]
    print(
        f"wrote {args.out}: VGG-{arch['cfg']}{' with BatchNorm' if arch['batch_norm'] else ''}, "
        f"{arch['num_classes']} classes, test scale Q {checkpoint['preprocess']['test_scale']}, "
        f"crop {checkpoint['preprocess']['crop']}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
