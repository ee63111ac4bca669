"""ONNX of an MSB fixed-point model (`rsedge quantize --scheme msb-fixed`): int8 weight
initializers behind DequantizeLinear, activations and arithmetic float.

The model is exported as any float model (its weights are q * 2^-f, exactly) and simplified;
only then is each float initializer that holds a quantized tensor replaced by its int8 integers,
a scale and a zero point 0 feeding a DequantizeLinear whose output keeps the initializer's name,
so every consumer is unchanged and no simplifier runs afterwards to fold it back into float.
The file holds a quarter of the bytes; it is not an INT8 engine (no activation is quantized, the
convolutions run in float after the weights are dequantized; `rsedge.precision` stays fp32).

The exporter folds a BatchNorm into the convolution before it: W' = W * g per output channel,
g = gamma / sqrt(var + eps). The integers are the same; such a tensor gets a per-channel
DequantizeLinear (axis 0, scale 2^-f * |g_c|, the integers' sign flipped where g_c < 0, which
the symmetric range allows). A tensor the graph holds unchanged gets the per-tensor power-of-two
scale 2^-f. Each rewritten initializer is checked against the values it replaces (within a few
float32 ulps) and the file against the float graph on the check images; a file whose outputs
moved is not kept. Opset 13 DequantizeLinear takes int8 only: above 8 bits the weights stay float.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import numpy as np
from torch import nn

from rsedge.compress.msb_fixed import QuantizedTensor, QuantizedWeights, quantized_weights
from rsedge.trainer.modelfile import QUANT_KEY
from rsedge.trainer.records import atomic_write_bytes

from .onnx_export import parity, run_onnx_outputs, run_torch_outputs, set_metadata
from .onnx_graph import graph_stats

RELATIVE_TOLERANCE = 1e-6  # of a channel's largest |value|: a folded BatchNorm factor is a few ulps off
OUTPUT_TOLERANCE = 1e-4  # max abs difference to the float graph's outputs, as the simplifier's check


def _per_tensor(value: np.ndarray, q: QuantizedTensor) -> tuple[np.ndarray, np.ndarray, int | None] | None:
    ints = q.ints.numpy()
    scale = np.float32(q.scale)
    if np.array_equal(ints.astype(np.float32) * scale, value):
        return ints.astype(np.int8), np.array(scale, np.float32), None
    return None


def _per_channel(value: np.ndarray, ints: np.ndarray, base: float, axis: int
                 ) -> tuple[np.ndarray, np.ndarray, int | None] | None:
    """Integers and per-channel scales (along `axis`) with ints * scale == value within the
    tolerance, when `value` is `ints * base` times one factor per channel (a folded BatchNorm)."""
    v = np.moveaxis(value, axis, 0).reshape(value.shape[axis], -1).astype(np.float64)
    i = np.moveaxis(ints, axis, 0).reshape(value.shape[axis], -1).astype(np.float64)
    rows = np.arange(len(v))
    pivot = np.abs(i).argmax(1)
    pi, pv = i[rows, pivot], v[rows, pivot]
    factor = np.where(pi != 0, pv / np.where(pi != 0, pi, 1) / base, 0.0)
    sign = np.where(factor < 0, -1.0, 1.0)
    i = i * sign[:, None]
    i[factor == 0] = 0  # a channel the graph zeroed (gamma 0) or that is zero already
    scale = np.where(factor != 0, np.abs(factor) * base, base).astype(np.float32)
    recon = i.astype(np.float32) * scale[:, None]
    tol = RELATIVE_TOLERANCE * np.abs(v).max(1, initial=0.0) + 1e-30
    if not (np.abs(recon - v) <= tol[:, None]).all():
        return None
    out = np.moveaxis(i.reshape(np.moveaxis(ints, axis, 0).shape), 0, axis).astype(np.int8)
    return out, scale, axis


def match(value: np.ndarray, q: QuantizedTensor) -> tuple[np.ndarray, np.ndarray, int | None] | None:
    """(int8 integers, scale, axis or None for per-tensor) that reproduce the float initializer
    `value` from the quantized tensor `q`, or None when `value` is not (a folded form of) it."""
    ints = q.ints.numpy()
    if value.shape == ints.shape:
        found = _per_tensor(value, q)
        if found is None and value.ndim >= 2:
            found = _per_channel(value, ints, q.scale, 0)
        return found
    if value.ndim == 2 and value.shape == ints.shape[::-1]:  # a Linear weight as a MatMul's (in, out)
        return _per_channel(value, ints.T, q.scale, 1)
    return None


def _unique(name: str, taken: set[str]) -> str:
    out, i = name, 1
    while out in taken:
        out, i = f"{name}_{i}", i + 1
    taken.add(out)
    return out


def rewrite_initializers(proto, weights: QuantizedWeights) -> dict[str, Any]:
    """Replace, in place, each float initializer of `proto` that holds one of `weights` by int8
    integers -> DequantizeLinear (placed first in the graph, output under the old name)."""
    from onnx import TensorProto, helper, numpy_helper

    g = proto.graph
    by_shape: dict[tuple[int, ...], list[QuantizedTensor]] = {}
    for q in weights.tensors.values():
        by_shape.setdefault(tuple(q.ints.shape), []).append(q)
    taken = {i.name for i in g.initializer} | {o for n in g.node for o in n.output} | {i.name for i in g.input}
    replaced, nodes, new_inits, kinds = set(), [], [], {"per_tensor": 0, "per_channel": 0}
    for init in g.initializer:
        if init.data_type != TensorProto.FLOAT or len(init.dims) == 0:
            continue
        shape = tuple(init.dims)
        candidates = by_shape.get(shape, []) + (by_shape.get(shape[::-1], []) if len(shape) == 2 else [])
        if not candidates:
            continue
        value = numpy_helper.to_array(init)
        found = next((m for m in (match(value, q) for q in candidates) if m is not None), None)
        if found is None:
            continue
        ints, scale, axis = found
        names = [_unique(f"{init.name}_{s}", taken) for s in ("quantized", "scale", "zero_point")]
        new_inits += [numpy_helper.from_array(ints, names[0]), numpy_helper.from_array(scale, names[1]),
                      numpy_helper.from_array(np.zeros(scale.shape, np.int8), names[2])]
        extra = {} if axis is None else {"axis": axis}
        nodes.append(helper.make_node("DequantizeLinear", names, [init.name], name=f"{names[0]}_dequantize", **extra))
        replaced.add(init.name)
        kinds["per_tensor" if axis is None else "per_channel"] += 1
    keep = [i for i in g.initializer if i.name not in replaced] + new_inits
    del g.initializer[:]
    g.initializer.extend(keep)
    inputs = [i for i in g.input if i.name not in replaced]
    del g.input[:]
    g.input.extend(inputs)
    order = nodes + list(g.node)
    del g.node[:]
    g.node.extend(order)
    return {"int8_initializers": len(replaced), **kinds}


def int8_weight_onnx(onnx_path: str | Path, model: nn.Module, meta: dict[str, Any], check_images: np.ndarray,
                     log: Callable[[str], None] = print) -> dict[str, Any]:
    """`rsedge export` of an msb-fixed model: rewrite `onnx_path` (already simplified, with
    metadata) to int8 weight initializers; the record fields it changes (`parity`, `graph`) and
    `weights` (what was rewritten, file sizes). A float model: {} and nothing done."""
    import onnx

    quant = meta.get(QUANT_KEY)
    if not quant:
        return {}
    from rsedge.trainer.tasks import task_for

    onnx_path = Path(onnx_path)
    weights = quantized_weights(model, quant)
    info: dict[str, Any] = {"scheme": quant["scheme"], "bits": weights.bits, "quantized_tensors": len(weights.tensors),
                            "float_file_bytes": onnx_path.stat().st_size}
    if weights.bits > 8:
        log(f"warning: {weights.bits}-bit weights stay float in the ONNX: opset 13 DequantizeLinear reads int8 only")
        return {"weights": {**info, "int8_initializers": 0, "reason": "bits above 8 (opset 13 has no int16 input)"}}
    float_bytes = onnx_path.read_bytes()
    float_out = run_onnx_outputs(onnx_path, check_images)
    proto = onnx.load(str(onnx_path))
    info.update(rewrite_initializers(proto, weights))
    info["activations"] = "float32 (weights dequantized in the graph; not an INT8 engine)"
    set_metadata(proto, {"rsedge.weight_quantization": json.dumps({k: info[k] for k in (
        "scheme", "bits", "int8_initializers", "per_tensor", "per_channel", "activations")})})
    onnx.checker.check_model(proto)
    atomic_write_bytes(onnx_path, proto.SerializeToString())
    task = task_for(meta)
    moved = parity(float_out, run_onnx_outputs(onnx_path, check_images), task=task.name)
    if moved["max_abs_diff"] > OUTPUT_TOLERANCE:
        atomic_write_bytes(onnx_path, float_bytes)
        log(f"warning: int8 weights changed the ONNX outputs (max abs diff {moved['max_abs_diff']:.3g}): "
            f"{onnx_path.name} keeps float weights")
        return {"weights": {**info, "int8_initializers": 0, "reason": "outputs moved", "moved": moved}}
    info["file_bytes"] = onnx_path.stat().st_size
    info["size_vs_float"] = info["file_bytes"] / info["float_file_bytes"]
    module = task.export_module(model, meta)  # every output the graph has (a detector's decoded boxes too)
    result = parity(run_torch_outputs(module, check_images, task.export_outputs(meta)),
                    run_onnx_outputs(onnx_path, check_images), task=task.name)
    log(f"{onnx_path.name}: {info['int8_initializers']} of {len(weights.tensors)} quantized tensors stored as int8 "
        f"behind DequantizeLinear ({info['per_tensor']} per-tensor 2^-f, {info['per_channel']} per-channel with a "
        f"folded BatchNorm), {info['float_file_bytes'] / 1e6:.2f} MB -> {info['file_bytes'] / 1e6:.2f} MB; "
        f"parity with PyTorch: max abs diff {result['max_abs_diff']:.2e}")
    return {"parity": result, "graph": graph_stats(onnx_path), "weights": info}

