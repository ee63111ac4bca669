"""INT8 Q/DQ ONNX with onnxruntime's static quantization, in two conventions, one per backend.

- `tensorrt`: TensorRT's explicit quantization wants symmetric int8 (zero point 0) for weights,
  per output channel, and for activations, as QuantizeLinear/DequantizeLinear pairs. ONNX Runtime
  runs that file too, but its x86 and ARM kernels are made for uint8 activations: there the
  symmetric int8 file can be slower than FP32.
- `onnxruntime`: what onnxruntime recommends for its CPU kernels: uint8 activations with their
  own zero point, int8 weights per channel (U8S8 Q/DQ), and 7-bit weights (`reduce_range`): x86
  CPUs without VNNI multiply u8 x s8 pairs with VPMADDUBSW, whose 16-bit sums saturate with 8-bit
  weights (2 x 255 x 127 > 32767) and cannot with 7-bit ones (2 x 255 x 63 < 32767). The file is
  meant to run on any CPU the user deploys to, so it is made safe for the ones without VNNI.
"""
from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable

import numpy as np

from rsedge.trainer.records import atomic_write_bytes

CALIB_METHODS = ("minmax", "entropy", "percentile")
TARGETS = ("tensorrt", "onnxruntime")
# the `rsedge.precision` of a file with every compute node in int8, per target
PRECISION = {"tensorrt": "int8-qdq", "onnxruntime": "int8-qdq-u8s8"}


def target_settings(target: str) -> dict[str, Any]:
    """quantize_static's arguments for one target, and their description for the record."""
    from onnxruntime.quantization import QuantType

    if target == "tensorrt":
        return {"args": {"activation_type": QuantType.QInt8, "weight_type": QuantType.QInt8, "reduce_range": False,
                         "extra_options": {"ActivationSymmetric": True, "WeightSymmetric": True}},
                "activations": "int8 symmetric", "weights": "int8 symmetric, per channel"}
    if target == "onnxruntime":
        return {"args": {"activation_type": QuantType.QUInt8, "weight_type": QuantType.QInt8, "reduce_range": True,
                         "extra_options": {"ActivationSymmetric": False, "WeightSymmetric": True}},
                "activations": "uint8 asymmetric", "weights": "int8 symmetric, per channel, 7-bit range (reduce_range)"}
    raise ValueError(f"INT8 target must be one of {', '.join(TARGETS)}, not {target!r}")


def int8_metadata(target: str, coverage: dict[str, Any]) -> dict[str, str]:
    """Labels that say what the file really holds: a file with no compute node in int8 is not
    labelled INT8, one with some in float says how many are int8."""
    q, n = coverage["quantized_nodes"], coverage["quantizable_nodes"]
    if q == 0:
        precision = "fp32 (no node quantized)"
    elif q < n:
        precision = f"{PRECISION[target]} ({q}/{n} nodes int8)"
    else:
        precision = PRECISION[target]
    return {"rsedge.precision": precision, "rsedge.target": target, "rsedge.int8_nodes": f"{q}/{n}",
            "rsedge.int8_fraction": f"{coverage['quantized_fraction']:.4f}"}


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


@contextmanager
def _in_scratch_dir() -> Iterator[None]:
    """Run in a temporary working directory (contextlib.chdir needs Python 3.11)."""
    here = os.getcwd()
    with tempfile.TemporaryDirectory() as scratch:
        os.chdir(scratch)
        try:
            yield
        finally:
            os.chdir(here)


def preprocess_for_quantization(src: str | Path, dst: str | Path, log: Callable[[str], None] = print) -> None:
    """onnxruntime's recommended pass (shape inference, graph optimization) before quantizing. Its
    symbolic shape inference gives up on some graphs (DeepLabV3+'s resizes) and then dumps
    `sym_shape_infer_temp.onnx` and its weights into the current directory: it runs in a temporary
    one, and the pass is retried with ONNX's own shape inference."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    src, dst = Path(src).resolve(), Path(dst).resolve()
    error = None
    for skip_symbolic in (False, True):
        with _in_scratch_dir():
            try:
                quant_pre_process(str(src), str(dst), skip_symbolic_shape=skip_symbolic)
                return
            except Exception as e:  # noqa: BLE001 - the pass is an optimization only
                error = e
    log(f"warning: quantization pre-processing failed ({error}); quantizing the graph as exported")
    dst.write_bytes(src.read_bytes())


def quantize_qdq(
    fp32_onnx: str | Path,
    out_path: str | Path,
    calib_images: np.ndarray,
    method: str = "minmax",
    per_channel: bool = True,
    exclude_nodes: Sequence[str] = (),
    preprocess: bool = True,
    target: str = "tensorrt",
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Quantize `fp32_onnx` to Q/DQ for `target` (tensorrt or onnxruntime). `exclude_nodes` names
    nodes of the graph after onnxruntime's pre-processing pass; a caller that names nodes runs
    `preprocess_for_quantization` itself and passes its output with `preprocess=False`."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, quantize_static

    from .onnx_graph import int8_coverage

    settings = target_settings(target)
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
            calibrate_method=cal, nodes_to_exclude=list(exclude_nodes), **settings["args"],
        )
        q = onnx.load(str(q_tmp))
        coverage = int8_coverage(q_tmp)
    # metadata_props survive neither pass reliably: copy them from the FP32 graph
    from .onnx_export import set_metadata

    props = {p.key: p.value for p in model.metadata_props}
    props.update(int8_metadata(target, coverage))
    set_metadata(q, props)
    atomic_write_bytes(out_path, q.SerializeToString())
    return {
        "format": "QDQ",
        "target": target,
        "weights": settings["weights"] if per_channel else settings["weights"].replace("per channel", "per tensor"),
        "activations": settings["activations"],
        "calibration_method": method,
        "calibration_images": int(len(calib_images)),
        "excluded_nodes": list(exclude_nodes),
        **coverage,
    }
