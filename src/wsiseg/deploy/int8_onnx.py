"""INT8 for ``export.format=onnx``: onnxruntime's static quantiser writes a QDQ ONNX model (INT8 per-channel weights,
UINT8 activations, min-max ranges), which OpenVINO and onnxruntime both run. Tiles and the check against FP32:
:mod:`~wsiseg.deploy.calibration`."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

from wsiseg.deploy.calibration import Int8Quantizer
from wsiseg.runtimes.onnx_graph import INPUT_NAME

__all__ = ["OnnxRuntimeQuantizer", "quantize_int8"]


def quantize_int8(fp32: Path, out: Path, calibration: np.ndarray, input_name: str, batch: int = 1) -> None:
    """Write the static INT8 (QDQ) version of the ONNX file ``fp32`` to ``out``, ranges from ``calibration``
    (normalised float32 N×3×H×W)."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches: Iterator[np.ndarray] = iter(
                calibration[i : i + batch] for i in range(0, len(calibration), batch)
            )

        def get_next(self) -> dict[str, np.ndarray] | None:
            chunk = next(self.batches, None)
            return None if chunk is None else {input_name: chunk}

    prepared = out.with_name(out.name + ".pre.onnx")
    try:
        quant_pre_process(str(fp32), str(prepared), skip_symbolic_shape=True)
        quantize_static(
            str(prepared),
            str(out),
            Reader(),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,  # the calibrating graph keeps each tensor's min/max per tile
        )
    finally:
        prepared.unlink(missing_ok=True)


class OnnxRuntimeQuantizer(Int8Quantizer):
    """onnxruntime's static QDQ quantiser (installed with wsiseg), calibrated one tile at a time."""

    scheme = "static QDQ: int8 per-channel weights, uint8 activations, min-max ranges (onnxruntime quantiser)"
    file_name = "int8.onnx"

    def quantize(self, fp32: Path, out: Path, calibration: np.ndarray) -> None:
        quantize_int8(fp32, out, calibration, INPUT_NAME)
