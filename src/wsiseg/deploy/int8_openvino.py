"""INT8 for ``export.format=openvino``: NNCF (OpenVINO's own quantiser) quantises the OpenVINO model and the IR pair
(``.xml`` + ``.bin``) is written: INT8 per-channel weights, asymmetric INT8 activations (NNCF's ``mixed`` preset),
min-max ranges. OpenVINO only; the fastest CPU path measured (docs/performance.md). NNCF is an extra
(``pip install 'wsiseg[int8]'``). Tiles and the check against FP32: :mod:`~wsiseg.deploy.calibration`; the run-time
INT8 of ``model.runtime=openvino_int8`` (:mod:`wsiseg.pipeline.int8`) uses the same quantiser."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from wsiseg.deploy.calibration import Int8Quantizer
from wsiseg.errors import UserInputError

__all__ = ["NNCF_MISSING", "NncfQuantizer", "nncf_available", "quantize_int8_nncf"]

NNCF_MISSING = (
    "export.format=openvino export.quantize=int8 needs NNCF: pip install 'wsiseg[int8]' (or export.format=onnx for "
    "onnxruntime's quantiser)"
)


def nncf_available() -> bool:
    """Whether NNCF can be imported here (looked up, not imported: importing it loads much of torch's tooling)."""
    import importlib.util

    try:
        return importlib.util.find_spec("nncf") is not None
    except ValueError:  # an entry of None in sys.modules: import blocked
        return False


def quantize_int8_nncf(fp32: Path, calibration: np.ndarray, batch: int = 1) -> Any:
    """The static INT8 ``openvino.Model`` of the ONNX file ``fp32`` quantised by NNCF, ranges from ``calibration``
    (normalised float32 N×3×H×W): per-channel weights, asymmetric activations (``mixed`` preset), min-max ranges of
    the whole set (NNCF's default, the mean of per-batch extremes, moved masks further from FP32 on held-out tissue).

    Raises:
        UserInputError: NNCF is not installed.
    """
    # NNCF imports torch's extension builder, which warns that this machine has no CUDA: not a problem here
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    try:
        import nncf
    except ImportError:
        raise UserInputError(NNCF_MISSING) from None
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters
    from nncf.quantization.range_estimator import RangeEstimatorParametersSet

    from wsiseg.runtimes.openvino import openvino_core

    nncf.set_log_level(logging.ERROR)
    model = openvino_core().read_model(str(fp32))
    batches = [calibration[i : i + batch] for i in range(0, len(calibration), batch)]
    return nncf.quantize(
        model,
        nncf.Dataset(batches),
        subset_size=len(batches),
        preset=nncf.QuantizationPreset.MIXED,
        advanced_parameters=AdvancedQuantizationParameters(
            activations_range_estimator_params=RangeEstimatorParametersSet.MINMAX
        ),
    )


class NncfQuantizer(Int8Quantizer):
    """NNCF's static INT8 of the OpenVINO model, written as an IR pair."""

    scheme = (
        "static int8: int8 per-channel weights, asymmetric int8 activations, min-max ranges (NNCF, mixed preset, "
        "OpenVINO IR)"
    )
    file_name = "int8.xml"

    def check_available(self) -> None:
        if not nncf_available():
            raise UserInputError(NNCF_MISSING)

    def quantize(self, fp32: Path, out: Path, calibration: np.ndarray) -> None:
        from wsiseg.runtimes.openvino import save_ir

        save_ir(quantize_int8_nncf(fp32, calibration), out)
