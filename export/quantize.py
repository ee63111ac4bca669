"""INT8 Q/DQ ONNX with onnxruntime's static quantization, in TensorRT's convention.

TensorRT's explicit quantization wants symmetric int8 (zero point 0) for weights, per output
channel, and for activations, as QuantizeLinear/DequantizeLinear pairs: exactly what this writes,
so the same file runs in ONNX Runtime on the host and builds an INT8 engine on the device.
"""
from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Callable

import numpy as np

from rsedge.trainer.records import atomic_write_bytes

CALIB_METHODS = ("minmax", "entropy", "percentile")


class _ArrayReader:
    """onnxruntime's CalibrationDataReader protocol over an in-memory array, one image a call
    (the exported graph may have a static batch of 1)."""

    def __init__(self, input_name: str, images: np.ndarray, batch: int):
        self.input_name, self.images, self.batch, self.pos = input_name, images, batch, 0

    def get_next(self):
        if self.pos >= len(self.images):
            return None
        chunk = self.images[self.pos : self.pos + self.batch]
        self.pos += self.batch
        return {self.input_name: chunk}

    def rewind(self) -> None:
        self.pos = 0


def preprocess_for_quantization(src: str | Path, dst: str | Path, log: Callable[[str], None] = print) -> None:
    """onnxruntime's recommended pass (shape inference, graph optimization) before quantizing."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    try:
        quant_pre_process(str(src), str(dst), skip_symbolic_shape=False)
    except Exception as e:  # noqa: BLE001 - the pass is an optimization only
        log(f"warning: quantization pre-processing failed ({e}); quantizing the graph as exported")
        Path(dst).write_bytes(Path(src).read_bytes())


def quantize_qdq(
    fp32_onnx: str | Path,
    out_path: str | Path,
    calib_images: np.ndarray,
    method: str = "minmax",
    per_channel: bool = True,
    exclude_nodes: Sequence[str] = (),
    preprocess: bool = True,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Quantize `fp32_onnx` to Q/DQ. `exclude_nodes` names nodes of the graph after
    onnxruntime's pre-processing pass; a caller that names nodes runs `preprocess_for_quantization`
    itself and passes its output with `preprocess=False`."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    if method not in CALIB_METHODS:
        raise ValueError(f"calibration method must be one of {', '.join(CALIB_METHODS)}, not {method!r}")
    if len(calib_images) == 0:
        raise ValueError("no calibration images")
    fp32_onnx, out_path = Path(fp32_onnx), Path(out_path)
    model = onnx.load(str(fp32_onnx))
    input_name = model.graph.input[0].name
    dim0 = model.graph.input[0].type.tensor_type.shape.dim[0]
    batch = dim0.dim_value if dim0.HasField("dim_value") and dim0.dim_value > 0 else 16
    cal = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
           "percentile": CalibrationMethod.Percentile}[method]
    with tempfile.TemporaryDirectory() as tmp:
        pre = Path(tmp) / "pre.onnx"
        if preprocess:
            preprocess_for_quantization(fp32_onnx, pre, log)
        else:
            pre.write_bytes(fp32_onnx.read_bytes())
        q_tmp = Path(tmp) / "q.onnx"
        quantize_static(
            str(pre), str(q_tmp), _ArrayReader(input_name, calib_images.astype(np.float32), batch),
            quant_format=QuantFormat.QDQ, per_channel=per_channel,
            activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
            calibrate_method=cal, nodes_to_exclude=list(exclude_nodes),
            extra_options={"ActivationSymmetric": True, "WeightSymmetric": True},
        )
        q = onnx.load(str(q_tmp))
    # metadata_props survive neither pass reliably: copy them from the FP32 graph
    from .onnx_export import set_metadata

    props = {p.key: p.value for p in model.metadata_props}
    props["rsedge.precision"] = "int8-qdq"
    set_metadata(q, props)
    atomic_write_bytes(out_path, q.SerializeToString())
    return {
        "format": "QDQ",
        "weights": "int8 symmetric, per channel" if per_channel else "int8 symmetric, per tensor",
        "activations": "int8 symmetric",
        "calibration_method": method,
        "calibration_images": int(len(calib_images)),
        "excluded_nodes": list(exclude_nodes),
    }
