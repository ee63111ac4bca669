"""Parameters and MACs counted from an ONNX graph itself.

A PyTorch count says what the model *was*; this says what the device will run (BatchNorm
folded into convolutions, Q/DQ weights as int8), so both are recorded side by side.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def _numel(init) -> int:
    return int(np.prod(init.dims)) if len(init.dims) else 1


def graph_stats(path: str | Path) -> dict[str, Any]:
    import onnx
    from onnx import shape_inference

    model = onnx.load(str(path))
    try:
        model = shape_inference.infer_shapes(model)
    except Exception:  # noqa: BLE001 - counts of parameters still work without shapes
        pass
    g = model.graph
    inits = {i.name: i for i in g.initializer}
    consts = {}
    for n in g.node:
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value":
                    consts[n.output[0]] = a.t
    dq_source = {n.output[0]: n.input[0] for n in g.node if n.op_type == "DequantizeLinear"}

    def weight_of(name: str):
        name = dq_source.get(name, name)
        return inits.get(name) or consts.get(name)

    shapes: dict[str, list[int]] = {}
    for vi in list(g.value_info) + list(g.output) + list(g.input):
        dims = [d.dim_value if d.HasField("dim_value") else 1 for d in vi.type.tensor_type.shape.dim]
        shapes[vi.name] = dims

    counted: set[str] = set()
    params = 0
    macs = 0
    weight_bytes = 0
    for n in g.node:
        if n.op_type not in ("Conv", "Gemm", "MatMul", "ConvTranspose"):
            continue
        for inp in n.input[1:] if n.op_type != "MatMul" else n.input:
            w = weight_of(inp) if inp else None
            if w is not None and w.name not in counted:
                counted.add(w.name)
                params += _numel(w)
                weight_bytes += _numel(w) * onnx.helper.tensor_dtype_to_np_dtype(w.data_type).itemsize
        w = weight_of(n.input[1]) if len(n.input) > 1 else None
        out = shapes.get(n.output[0])
        if n.op_type == "Conv" and w is not None and out:
            # W is [out_ch, in_ch/groups, kh, kw]: every output element costs in_ch/groups*kh*kw
            macs += int(np.prod(out[1:])) * int(np.prod(w.dims[1:]))
        elif n.op_type == "Gemm" and w is not None and out:
            trans_b = next((a.i for a in n.attribute if a.name == "transB"), 0)
            k = w.dims[1] if trans_b else w.dims[0]
            macs += int(np.prod(out[1:])) * int(k)
        elif n.op_type == "MatMul" and w is not None and out:
            macs += int(np.prod(out[1:])) * int(w.dims[0])
    return {
        "params": params,
        "macs": macs,
        "weight_bytes": weight_bytes,
        "nodes": len(g.node),
        "opset": max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=None),
        "file_bytes": Path(path).stat().st_size,
    }


COMPUTE_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
# onnxruntime's QOperator format: compute nodes that are int8 by their operator
INTEGER_OPS = ("QLinearConv", "QLinearMatMul", "QGemm", "ConvInteger", "MatMulInteger")


def int8_coverage(path: str | Path) -> dict[str, Any]:
    """How much of a quantized graph really runs in int8: its compute nodes (Conv, ConvTranspose,
    Gemm, MatMul) whose data and weight inputs both come from a DequantizeLinear, plus integer
    operators (QLinearConv...), out of all its compute nodes. Quantization keeps every compute node
    of the FP32 graph, so the denominator is the FP32 graph's count; a node kept in float by the
    guard has float inputs."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    producer = {o: n.op_type for n in graph.node for o in n.output}
    compute = [n for n in graph.node if n.op_type in COMPUTE_OPS + INTEGER_OPS]
    quantized = [n for n in compute if n.op_type in INTEGER_OPS or (
        len(n.input) > 1 and all(producer.get(i) == "DequantizeLinear" for i in n.input[:2]))]
    inits = {i.name: i.data_type for i in graph.initializer}
    # the zero point of an activation QuantizeLinear says its type: int8 (TensorRT) or uint8 (CPU)
    activation_types = sorted({onnx.helper.tensor_dtype_to_np_dtype(inits[n.input[2]]).name for n in graph.node
                               if n.op_type == "QuantizeLinear" and len(n.input) > 2 and n.input[2] in inits
                               and n.input[0] not in inits})
    return {"quantized_nodes": len(quantized), "quantizable_nodes": len(compute),
            "quantized_fraction": len(quantized) / len(compute) if compute else 0.0,
            "activation_types": activation_types}
