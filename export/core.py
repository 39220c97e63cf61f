"""``export_checkpoint``: training checkpoint -> checked ONNX model(s) -> BentoML store.

Everything is built and checked in a temporary directory first; only a model that passed
every check is registered (in one ``bentoml.models.create`` step) or written to ``out``.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from export import check
from export.graph import TTA_MODES, InferenceGraph
from export.onnx_io import OPSET, save_onnx, set_metadata, to_onnx
from export.reference import reference_probs
from vgg import store
from vgg.checkpoint import CheckpointError, load_any, model_from_checkpoint, read_labels
from vgg.errors import one_line
from vgg.preprocessing import MAX_SCALE, MIN_CROP, default_test_scale

__all__ = ["ExportError", "ExportResult", "export_checkpoint", "PRECISIONS", "FP32_TOLERANCE"]

logger = logging.getLogger(__name__)

PRECISIONS = ("fp32", "fp16", "int8")
FP32_TOLERANCE = 1e-4  # max abs difference of probabilities, ORT vs the PyTorch reference
REAL_CHECK_IMAGES = 8
RANDOM_CHECK_IMAGES = 4
FP16_MARGIN = 1e-3  # fp16 must agree on top-1 wherever fp32's top-2 margin is at least this
INT8_CALIBRATION_IMAGES = 128
INT8_AGREEMENT_IMAGES = 500
INT8_MIN_AGREEMENT = 0.99


class ExportError(RuntimeError):
    """An export that failed: bad checkpoint, failed check, or bad arguments (one-line message)."""


@dataclass
class ExportResult:
    """What an export produced.

    ``tag`` is the BentoML tag (``None`` when not registered); ``onnx_path`` the model of the
    requested precision (``out`` if given, else its file in the store entry); ``paths`` every
    written ONNX file by precision; ``checks`` the measured check results.
    """

    tag: str | None
    onnx_path: Path
    metadata: dict[str, Any]
    paths: dict[str, Path] = field(default_factory=dict)
    checks: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Source:
    """A loaded checkpoint and the export geometry resolved from it."""

    checkpoint: dict[str, Any]
    model: Any
    mean: list[float]
    std: list[float]
    crop: int
    test_scale: int  # the graph's input Q x Q: the largest test scale
    sha256: str
    data_folder: Path | None
    test_scales: list[int] = field(default_factory=list)  # the test scales Q the graph averages


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _load_source(
    checkpoint_path: Path,
    *,
    test_scale: int | None,
    labels: str | os.PathLike | None = None,
    test_scales: Sequence[int] | None = None,
) -> _Source:
    try:
        checkpoint = load_any(checkpoint_path, labels=read_labels(labels) if labels is not None else None)
        model = model_from_checkpoint(checkpoint)
        preprocess = checkpoint["preprocess"]
        mean, std = [float(v) for v in preprocess["mean"]], [float(v) for v in preprocess["std"]]
        crop = _whole_number(preprocess["crop"], "crop")
        stored_scale = preprocess.get("test_scale")
        saved_test_scale = (
            default_test_scale(crop) if stored_scale is None else _whole_number(stored_scale, "test_scale")
        )
        classes = [str(name) for name in checkpoint["classes"]]
    except CheckpointError as error:
        raise ExportError(str(error)) from None
    except (KeyError, TypeError, ValueError) as error:
        raise ExportError(f"{checkpoint_path}: malformed checkpoint ({one_line(error, with_type=True)})") from None
    except Exception as error:  # torch.load on foreign bytes can raise nearly anything (IndexError, ...)
        raise ExportError(f"{checkpoint_path}: not a readable checkpoint ({type(error).__name__})") from None
    _check_source(checkpoint_path, checkpoint, model, mean=mean, std=std, crop=crop, classes=classes)
    if stored_scale is not None:
        _check_scale(saved_test_scale, crop=crop, where=f"{checkpoint_path}: its preprocess test_scale")
    if test_scale is not None and test_scales:
        raise ExportError("give --test-scale Q or --test-scales Q..., not both")
    where = "the default test scale" if test_scale is None else "--test-scale"
    test_scale = saved_test_scale if test_scale is None else test_scale
    _check_scale(test_scale, crop=crop, where=where)
    scales = sorted({int(q) for q in test_scales}) if test_scales else [test_scale]
    for q in scales:
        _check_scale(q, crop=crop, where="--test-scales")
    config = checkpoint.get("config") or {}
    data = config.get("data") if isinstance(config, dict) else None
    return _Source(
        checkpoint,
        model,
        mean,
        std,
        crop,
        scales[-1],
        _sha256(checkpoint_path),
        check.training_folder(data),
        test_scales=scales,
    )


def _whole_number(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value):
        raise ValueError(f"preprocess {name} is {value!r}, not a whole number")
    return int(value)


def _check_scale(test_scale: int, *, crop: int, where: str) -> None:
    if not crop <= test_scale <= MAX_SCALE:
        raise ExportError(f"{where} is {test_scale}; a test scale must be between the crop {crop} and {MAX_SCALE}")


def _check_source(
    path: Path,
    checkpoint: dict[str, Any],
    model: Any,
    *,
    mean: list[float],
    std: list[float],
    crop: int,
    classes: list[str],
) -> None:
    """Refuse, in one line, a checkpoint whose export would fail late or be refused by the server."""
    if len(mean) != 3 or len(std) != 3 or not all(math.isfinite(v) for v in mean + std) or min(std) <= 0:
        raise ExportError(
            f"{path}: preprocess mean/std must be 3 finite values each, std positive; got {mean} and {std}"
        )
    if not MIN_CROP <= crop <= MAX_SCALE:
        raise ExportError(f"{path}: preprocess crop is {crop}, must be between {MIN_CROP} and {MAX_SCALE}")
    outputs = int(checkpoint["arch"]["num_classes"])
    if len(classes) != outputs:
        raise ExportError(
            f"{path}: {len(classes)} class names for a {outputs}-output classifier; the checkpoint is inconsistent"
        )
    if len(set(classes)) != len(classes):  # ImageNet-1k's own names repeat "crane" and "maillot"
        logger.info(
            "%s: %d class names, %d distinct; answers name classes by index too",
            path.name,
            len(classes),
            len(set(classes)),
        )
    bad = next(
        (
            name
            for name, tensor in model.state_dict().items()
            if tensor.is_floating_point() and not bool(tensor.isfinite().all())
        ),
        None,
    )
    if bad is not None:
        raise ExportError(
            f"{path}: weight {bad} holds NaN or infinite values (a diverged run?); export an earlier checkpoint"
        )


def _metadata(source: _Source, *, tta: str) -> dict[str, Any]:
    arch, metrics = source.checkpoint["arch"], source.checkpoint.get("metrics") or {}
    val_top1 = metrics.get("val_top1")
    metadata = {
        "cfg": str(arch["cfg"]),
        "batch_norm": bool(arch["batch_norm"]),
        "num_classes": int(arch["num_classes"]),
        store.TEST_SCALE_KEY: source.test_scale,
        **({"test_scales": source.test_scales} if len(source.test_scales) > 1 else {}),
        "crop": source.crop,
        "mean": source.mean,
        "std": source.std,
        "tta": tta,
        "checkpoint_sha256": source.sha256,
    }
    if val_top1 is not None:  # a converted state dict has no validation accuracy (BentoML refuses None)
        metadata["val_top1"] = float(val_top1)
    return metadata


def _check_inputs(source: _Source, check_images: Sequence[os.PathLike | str] | np.ndarray | None) -> np.ndarray:
    """Real images (``check_images`` or the first few of the training folder) plus random ones."""
    if isinstance(check_images, np.ndarray):
        real = check_images.astype(np.uint8)
    else:
        if check_images is None:
            files = check.image_files(source.data_folder)[:REAL_CHECK_IMAGES] if source.data_folder else []
        else:
            files = [Path(p) for p in check_images]
        real = check.load_graph_inputs(files, test_scale=source.test_scale)
    if len(real) == 0:
        logger.warning("no real images to check against (no training data folder): random images only")
    noise = check.random_images(RANDOM_CHECK_IMAGES, test_scale=source.test_scale)
    return np.concatenate([real.reshape(-1, source.test_scale, source.test_scale, 3), noise])


def _export_graph(source: _Source, *, tta: str, half: bool) -> onnx.ModelProto:
    graph = InferenceGraph(
        source.model,
        mean=source.mean,
        std=source.std,
        crop=source.crop,
        test_scale=source.test_scale,
        tta=tta,
        half=half,
        test_scales=source.test_scales,
    )
    exporter_chatter = io.StringIO()
    try:
        with contextlib.redirect_stdout(exporter_chatter):
            return to_onnx(graph)
    except Exception as error:  # the exporter raises many types; any of them is a failed export
        raise ExportError(f"torch.onnx export failed: {one_line(error, limit=300)}") from None
    finally:
        logger.debug("exporter output:\n%s", exporter_chatter.getvalue())


def _write(model: onnx.ModelProto, path: Path, metadata: dict[str, Any], *, precision: str) -> Path:
    set_metadata(model, {**metadata, "precision": precision})
    try:
        return save_onnx(model, path)
    except onnx.checker.ValidationError as error:
        raise ExportError(f"{precision} graph fails onnx.checker: {one_line(error)}") from None


def _check_fp32(path: Path, source: _Source, images: np.ndarray, *, tta: str) -> tuple[float, np.ndarray]:
    probs = check.run_onnx(check.session(path), images)
    reference = reference_probs(
        source.model,
        images,
        mean=source.mean,
        std=source.std,
        crop=source.crop,
        tta=tta,
        test_scales=source.test_scales,
    )
    max_diff = float(np.abs(probs - reference).max())
    if not max_diff <= FP32_TOLERANCE:  # also catches NaN
        raise ExportError(
            f"fp32 ONNX graph differs from the PyTorch reference: max abs diff {max_diff:.3g} > {FP32_TOLERANCE:g} "
            f"(tta={tta}, {len(images)} images)"
        )
    logger.info("fp32 check: max abs diff %.3g vs PyTorch on %d images", max_diff, len(images))
    return max_diff, probs


def _providers() -> list[str]:
    """CUDA first when onnxruntime-gpu has its provider *and* a GPU is there, else the CPU."""
    import torch

    if "CUDAExecutionProvider" in check.ort.get_available_providers() and torch.cuda.is_available():
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def _check_fp16(path: Path, images: np.ndarray, fp32_probs: np.ndarray) -> dict[str, Any]:
    probs = check.run_onnx(check.session(path, providers=_providers()), images)
    sorted_fp32 = np.sort(fp32_probs, axis=1)
    decisive = (sorted_fp32[:, -1] - sorted_fp32[:, -2]) >= FP16_MARGIN
    agree = probs.argmax(axis=1) == fp32_probs.argmax(axis=1)
    max_diff = float(np.abs(probs - fp32_probs).max())
    if probs.dtype != np.float32 or not np.all(agree[decisive]) or not np.isfinite(max_diff):
        raise ExportError(
            f"fp16 graph disagrees with fp32 on top-1 for {int((~agree & decisive).sum())} of {int(decisive.sum())} "
            f"check images (max abs diff {max_diff:.3g})"
        )
    logger.info("fp16 check: top-1 agrees with fp32 on %d images, max abs diff %.3g", len(images), max_diff)
    return {"fp16_max_abs_diff": max_diff, "fp16_top1_agreement": float(agree.mean())}


def _int8_images(source: _Source, calibration: Path | None, *, calibration_count: int, agreement_count: int):
    """Calibration and (disjoint) agreement images, decoded as the service would.

    Both come from the training folder, in a fixed shuffled order; with ``calibration`` the
    calibration images come from there and the agreement images from the training folder
    (or, without one, from the rest of ``calibration``).
    """
    training = check.image_files(source.data_folder) if source.data_folder else []
    calibration_pool = check.image_files(calibration) if calibration is not None else training
    calibration_files = calibration_pool[:calibration_count]
    used = {path.resolve() for path in calibration_files}
    agreement_pool = training or calibration_pool
    agreement_files = [path for path in agreement_pool if path.resolve() not in used][:agreement_count]
    if len(calibration_files) < calibration_count or len(agreement_files) < agreement_count:
        where = calibration or source.data_folder or "the checkpoint's config['data'] (absent)"
        raise ExportError(
            f"int8 needs {calibration_count} calibration + {agreement_count} other training images, found "
            f"{len(calibration_files)} + {len(agreement_files)} in {where}; pass --calibration DIR"
        )
    return (
        check.load_graph_inputs(calibration_files, test_scale=source.test_scale),
        check.load_graph_inputs(agreement_files, test_scale=source.test_scale),
    )


def _make_int8(
    fp32_path: Path,
    out_path: Path,
    *,
    calibration_images: np.ndarray,
    agreement_images: np.ndarray,
    min_agreement: float,
    metadata: dict[str, Any],
) -> dict[str, Any]:
    from export.quantize import quantize_int8  # onnxruntime.quantization is slow to import

    try:
        quantize_int8(fp32_path, out_path, calibration_images=calibration_images)
    except Exception as error:  # onnxruntime.quantization raises many types
        raise ExportError(f"int8 quantization failed: {one_line(error)}") from None
    _write(onnx.load(str(out_path)), out_path, metadata, precision="int8")
    fp32 = check.run_onnx(check.session(fp32_path), agreement_images)
    int8 = check.run_onnx(check.session(out_path), agreement_images)
    agreement = check.top1_agreement(int8, fp32)
    message = (
        f"int8 top-1 agreement with fp32: {agreement:.2%} on {len(agreement_images)} images not used for calibration"
    )
    logger.info(message)
    if agreement < min_agreement:
        raise ExportError(f"{message}, below the required {min_agreement:.0%}")
    return {
        "int8_top1_agreement": agreement,
        "int8_agreement_images": len(agreement_images),
        "int8_calibration_images": len(calibration_images),
    }


def _stage_out(model_file: Path, out: str | os.PathLike | None) -> Path | None:
    """Copy ``model_file`` next to ``out`` under a hidden name (renamed once registered)."""
    if out is None:
        return None
    out = Path(out)
    staged = out.with_name(f".{out.name}.partial")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(model_file, staged)
    except OSError as error:
        staged.unlink(missing_ok=True)
        raise ExportError(f"cannot write {out}: {error.strerror or error}") from None
    return staged


def _check_out(out: str | os.PathLike | None) -> None:
    """Refuse an ``out`` that cannot become a file before any work is done."""
    if out is None:
        return
    out = Path(out)
    if out.is_dir():
        raise ExportError(f"--out {out} is a directory; give a file path such as {out / 'model.onnx'}")
    existing = next((parent for parent in out.parents if parent.exists()), None)
    if existing is not None and not existing.is_dir():
        raise ExportError(f"--out {out}: {existing} is not a directory")


def _publish(
    entry_files: dict[str, Path],
    requested: Path,
    *,
    out: str | os.PathLike | None,
    register: bool,
    metadata: dict[str, Any],
    labels: dict[str, str],
) -> tuple[str | None, dict[str, Path]]:
    """Register ``entry_files`` as one store entry and/or write ``requested`` to ``out``, all or nothing.

    Returns the tag (``None`` when not registered) and ``{precision: path}`` of the written models.
    """
    staged_out = _stage_out(requested, out)
    tag, paths = None, {}
    try:
        if register:
            tag = store.register(files=entry_files, labels=labels, metadata=metadata)
            paths = store.model_files(store.latest_model(tag))
    except Exception as error:  # BentoML raises its own types and OSError
        if staged_out is not None:
            staged_out.unlink(missing_ok=True)
        raise ExportError(f"could not register in the BentoML store: {one_line(error)}") from None
    if staged_out is not None:
        try:
            os.replace(staged_out, out)
        except OSError as error:
            staged_out.unlink(missing_ok=True)
            registered = f" ({tag} is registered)" if tag else ""
            raise ExportError(f"cannot write {out}: {error.strerror or error}{registered}") from None
    return tag, paths


def _skip_int8(error: ExportError, *, optional: bool) -> tuple[str, list[str], dict[str, str]]:
    """Re-raise ``error``, or (``optional``) log it and go on with fp32 alone."""
    if not optional:
        raise error
    logger.warning("int8 graph not added, exporting fp32 only: %s", error)
    return "fp32", ["fp32"], {"int8_skipped": str(error)}


def export_checkpoint(
    checkpoint_path: str | os.PathLike,
    *,
    tta: str = "five",
    precision: str = "fp32",
    test_scale: int | None = None,
    test_scales: Sequence[int] | None = None,
    out: str | os.PathLike | None = None,
    register: bool = True,
    check_images: Sequence[os.PathLike | str] | np.ndarray | None = None,
    calibration: str | os.PathLike | None = None,
    calibration_count: int = INT8_CALIBRATION_IMAGES,
    agreement_count: int = INT8_AGREEMENT_IMAGES,
    min_agreement: float = INT8_MIN_AGREEMENT,
    labels: str | os.PathLike | None = None,
    int8_optional: bool = False,
) -> ExportResult:
    """Export a training checkpoint (or a torchvision-layout VGG state dict, see
    :func:`vgg.checkpoint.load_any`) to ONNX, check it against PyTorch, register it.

    The fp32 graph is always built and checked (max abs diff <= :data:`FP32_TOLERANCE` vs the
    PyTorch reference of :mod:`export.reference`); ``precision="fp16"`` or ``"int8"`` adds that graph and its check.
    ``test_scales``: several test scales Q (section 4.2): the graph takes the largest and
    resizes inside, posteriors averaged over the scales (``test_scale`` gives one Q).
    ``check_images``: image files (or uint8 ``[N, Q, Q, 3]`` arrays) for the checks; by default
    the first few of the checkpoint's training folder. Random images are always added.
    ``calibration``: int8 calibration folder (default: the training folder).
    ``labels``: a class-name file (one per line) replacing the checkpoint's names; needed for a
    state dict whose class count is not ImageNet's 1,000.
    ``int8_optional`` (with ``precision="int8"``): when the int8 graph cannot be made (too few
    images) or fails its agreement check, export fp32 alone and log why in one line (also in
    ``checks["int8_skipped"]``) instead of failing.
    Raises :class:`ExportError` (nothing registered, nothing written to ``out``) on any failure.
    """
    if tta not in TTA_MODES:
        raise ExportError(f"unknown tta {tta!r}; choose one of {', '.join(TTA_MODES)}")
    if precision not in PRECISIONS:
        raise ExportError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if not register and out is None:
        raise ExportError("nothing to do: give out=PATH or register=True")
    _check_out(out)
    if calibration_count < 1 or agreement_count < 1:
        raise ExportError(f"int8 image counts must be at least 1, got {calibration_count} and {agreement_count}")
    source = _load_source(Path(checkpoint_path), test_scale=test_scale, labels=labels, test_scales=test_scales)
    metadata = _metadata(source, tta=tta)
    precisions = ["fp32"] if precision == "fp32" else ["fp32", precision]
    classes = [str(name) for name in source.checkpoint["classes"]]
    skipped: dict[str, Any] = {}
    if precision == "int8":  # find (and decode) the images first: fail before the slow part
        try:
            calibration_images, agreement_images = _int8_images(
                source,
                Path(calibration) if calibration else None,
                calibration_count=calibration_count,
                agreement_count=agreement_count,
            )
        except ExportError as error:
            precision, precisions, skipped = _skip_int8(error, optional=int8_optional)
    onnx_metadata = {**metadata, "labels": classes}
    with tempfile.TemporaryDirectory(prefix="vgg-export-") as scratch:
        work = Path(scratch)
        files = {precision_name: work / store.ONNX_FILES[precision_name] for precision_name in precisions}
        images = _check_inputs(source, check_images)
        _write(_export_graph(source, tta=tta, half=False), files["fp32"], onnx_metadata, precision="fp32")
        max_diff, fp32_probs = _check_fp32(files["fp32"], source, images, tta=tta)
        checks: dict[str, Any] = {"fp32_max_abs_diff": max_diff, "check_images": len(images), "opset": OPSET}
        if precision == "fp16":
            _write(_export_graph(source, tta=tta, half=True), files["fp16"], onnx_metadata, precision="fp16")
            checks |= _check_fp16(files["fp16"], images, fp32_probs)
        elif precision == "int8":
            try:
                checks |= _make_int8(
                    files["fp32"],
                    files["int8"],
                    calibration_images=calibration_images,
                    agreement_images=agreement_images,
                    min_agreement=min_agreement,
                    metadata=onnx_metadata,
                )
            except ExportError as error:
                precision, precisions, skipped = _skip_int8(error, optional=int8_optional)
                files.pop("int8").unlink(missing_ok=True)
        checks |= skipped
        classes_file = work / store.CLASSES_FILE
        classes_file.write_text(json.dumps(classes), encoding="utf-8")
        store_metadata = {**metadata, "precisions": precisions}
        entry_files = {**{path.name: path for path in files.values()}, store.CLASSES_FILE: classes_file}
        tag, paths = _publish(
            entry_files,
            files[precision],
            out=out,
            register=register,
            metadata=store_metadata,
            labels={"cfg": metadata["cfg"], "tta": tta, "precisions": ",".join(precisions)},
        )
    onnx_path = Path(out) if out is not None else paths[precision]
    paths = paths or {precision: onnx_path}
    logger.info(
        "exported %s (%s, tta=%s) -> %s", Path(checkpoint_path).name, "+".join(precisions), tta, tag or onnx_path
    )
    return ExportResult(tag=tag, onnx_path=onnx_path, metadata=store_metadata, paths=paths, checks=checks)
