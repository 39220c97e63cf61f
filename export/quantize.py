"""int8 for the CPU: ONNX Runtime static quantization, QDQ format, per-channel weights.

Following ONNX Runtime's guidance for x86 CPUs with VNNI: uint8 activations, int8 weights
(symmetric, one scale per output channel), no range reduction; the model is first run
through ``quant_pre_process`` (symbolic shape inference + graph optimisation), as the
quantization guide recommends. Only the network's heavy ops (Conv, Gemm/MatMul) and
MaxPool are quantized: the uint8 -> float normalisation, crops, softmax and the average
over views stay float32, so the graph's interface is unchanged.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import numpy as np
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_static,
)
from onnxruntime.quantization.shape_inference import quant_pre_process

from export.onnx_io import quiet_exporter_logs

__all__ = ["QUANTIZED_OPS", "quantize_int8"]

logger = logging.getLogger(__name__)

QUANTIZED_OPS = ["Conv", "Gemm", "MatMul", "MaxPool"]


class _ImageReader(CalibrationDataReader):
    """Feeds calibration images one at a time as the graph's ``images`` input."""

    def __init__(self, images: np.ndarray) -> None:
        self._batches = iter([images[i : i + 1] for i in range(len(images))])

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._batches, None)
        return None if batch is None else {"images": batch}


def quantize_int8(fp32_path: Path, out_path: Path, *, calibration_images: np.ndarray) -> Path:
    """Write the int8 (QDQ) version of the fp32 ONNX model ``fp32_path`` to ``out_path``.

    Activation ranges are calibrated (min/max) on ``calibration_images``
    (uint8 ``[N, Q, Q, 3]``, training images).
    """
    if len(calibration_images) == 0:
        raise ValueError("int8 calibration needs at least one image")
    with tempfile.TemporaryDirectory(prefix="vgg-quant-") as scratch, quiet_exporter_logs():
        prepared = Path(scratch) / "prepared.onnx"
        quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=False)
        quantize_static(
            str(prepared),
            str(out_path),
            calibration_data_reader=_ImageReader(calibration_images),
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=QUANTIZED_OPS,
            per_channel=True,
            reduce_range=False,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
        )
    logger.info("int8 model calibrated on %d images: %s", len(calibration_images), out_path)
    return out_path
