"""Host side of the .rspack uplink format (runtime/pack.py defines the bytes and reads them).

A pack is made from the ONNX export of the *fake-quantized* model: the PyTorch model whose
quantized weights were replaced by `dequantize(codes, scale)`, exported by rsedge's exporter
(export/onnx_export.py) like any model. That graph is what the device must run, so packing it
cannot drift from the export; what packing needs is the integer codes of each weight, which the
quantizer gives (a QuantizedTensor: codes, scale, axis, bits, mask).

The exporter renames and changes weights: in eval mode its constant folding fuses BatchNorm into
the convolution before it, so a conv weight in the graph is codes * scale * gamma_c / sqrt(var_c
+ eps): the same integer codes on a per-output-channel grid whose scale moved. So each graph
initializer is matched to a quantized tensor by name, else by value (`torch_to_onnx_names`), and
put back on its grid (`regrid`): the given scale when the values are exactly codes * scale, else
one least-squares scale per output channel, accepted only when every weight is reproduced within
`rtol` of its channel's largest (float32 rounding of the fold); anything else is refused. A
per-tensor scale becomes per-channel when BatchNorm was folded into it; a negative BatchNorm gamma
gives a negative scale (value = code * scale holds either way).

The graph is then rewritten with every initializer as ONNX external data pointing into
weights.bin at offsets computed here (nothing is written to weights.bin on the host: the device
writes it when it unpacks), and the graph bytes and tensors go into the pack.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from rsedge.runtime import pack as rpack
from rsedge.runtime.preprocess import normalize_metadata

DEFAULT_RTOL = 1e-5


@dataclass
class PackQuantized:
    """A QuantizedTensor on the graph's grid (the fields the pack format reads)."""

    codes: np.ndarray
    scale: np.ndarray
    axis: int | None
    bits: int
    mask: np.ndarray | None = None


@dataclass
class WritePackOptions:
    """float16: store the unquantized float32 tensors as float16. fp32_reference: the FP32 model
    file (safetensors) the pack replaces, the basis of CR; without it, the FP32 ONNX's size.
    rtol: how far a folded weight may be from codes * its refitted channel scale (relative)."""

    float16: bool = False
    fp32_reference: str | Path | None = None
    rtol: float = DEFAULT_RTOL
    align: int = 64
    preset: int | None = None


def load_onnx(model: Any):
    """A copy of an ONNX ModelProto (a path or a proto), its external data loaded."""
    import onnx

    if isinstance(model, (str, os.PathLike)):
        return onnx.load(str(model))
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return copy


def _is_quantized(value: Any) -> bool:
    return hasattr(value, "codes") and hasattr(value, "scale") and hasattr(value, "bits")


def _reference(value: Any) -> np.ndarray:
    """What a graph tensor must be proportional to, channel by channel: the kept codes, or the array."""
    if not _is_quantized(value):
        return np.asarray(value, dtype=np.float64)
    codes = np.asarray(value.codes, dtype=np.float64)
    mask = getattr(value, "mask", None)
    return codes if mask is None else codes * np.asarray(mask, dtype=bool)


def fit_channels(value: np.ndarray, reference: np.ndarray, axis: int = 0, rtol: float = DEFAULT_RTOL
                 ) -> np.ndarray | None:
    """Per-channel factors k (along `axis`) with value ~= k * reference, or None when no such k
    reproduces every element within rtol of its channel's largest magnitude."""
    v = np.moveaxis(np.asarray(value, dtype=np.float64), axis, 0)
    r = np.moveaxis(np.asarray(reference, dtype=np.float64), axis, 0)
    if v.shape != r.shape or v.ndim == 0:
        return None
    v, r = v.reshape(len(v), -1), r.reshape(len(r), -1)
    den = (r * r).sum(1)
    k = np.where(den > 0, (v * r).sum(1) / np.where(den > 0, den, 1.0), 0.0)
    k32 = k.astype(np.float32).astype(np.float64)
    err = np.abs(v - k32[:, None] * r).max(1) if v.shape[1] else np.zeros(len(v))
    ok = err <= rtol * np.abs(v).max(1, initial=0.0)
    return k32 if bool(np.all(ok)) else None


def _orientations(value: np.ndarray, q: Any):
    """(codes, mask, axis) of q as the graph may hold it: as is, or transposed (a 2-D weight the
    exporter wrote as MatMul's (in, out))."""
    codes, mask = np.asarray(q.codes), getattr(q, "mask", None)
    if value.shape == codes.shape:
        yield codes, mask, 0
    if codes.ndim == 2 and value.shape == codes.shape[::-1] and codes.shape[0] != codes.shape[1]:
        yield codes.T, None if mask is None else np.asarray(mask).T, 1


def regrid(value: np.ndarray, q: Any, rtol: float = DEFAULT_RTOL) -> PackQuantized | None:
    """q's codes on the grid of the graph tensor `value`: with q's own scale when value equals
    dequantize(q) exactly, else with one refitted scale per output channel; None when value is not
    q's codes times per-channel scales."""
    value = np.asarray(value)
    if value.dtype != np.float32:
        return None
    for codes, mask, axis in _orientations(value, q):
        scale, q_axis = np.asarray(q.scale, dtype=np.float32).reshape(-1), q.axis
        if axis == 1 and q_axis is not None:
            q_axis = 1 - int(q_axis)
        candidate = PackQuantized(codes, scale, q_axis, int(q.bits), mask)
        if np.array_equal(rpack.dequantize(candidate), value):
            return candidate
        masked = codes.astype(np.float64) if mask is None else codes * np.asarray(mask, dtype=bool)
        k = fit_channels(value, masked, axis, rtol)
        if k is not None:
            empty = ~np.moveaxis(masked != 0, axis, 0).reshape(len(k), -1).any(1)
            k = np.where(empty, 1.0, k)  # a channel with no nonzero code: any scale fits, keep a plain one
            return PackQuantized(codes, k.astype(np.float32), axis, int(q.bits), mask)
    return None


def initializer_arrays(model) -> dict[str, np.ndarray]:
    from onnx import numpy_helper

    return {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}


def torch_to_onnx_names(model: Any, tensors: dict[str, Any], rtol: float = DEFAULT_RTOL) -> dict[str, str]:
    """{PyTorch name: ONNX initializer name} for the tensors (arrays or QuantizedTensor-like) the
    graph holds: by name, else the first unclaimed initializer equal to the tensor up to one factor
    per output channel (a BatchNorm folded into a conv, an exporter's `onnx::Conv_12` name).
    Tensors the graph does not hold are left out."""
    inits = initializer_arrays(load_onnx(model) if not hasattr(model, "graph") else model)
    names: dict[str, str] = {}
    for name in tensors:
        if name in inits and _matches(inits[name], tensors[name], rtol):
            names[name] = name
    claimed = set(names.values())
    for name, value in tensors.items():
        if name in names:
            continue
        for init_name, array in inits.items():
            if init_name not in claimed and _matches(array, value, rtol):
                names[name] = init_name
                claimed.add(init_name)
                break
    return names


def _matches(array: np.ndarray, value: Any, rtol: float) -> bool:
    if _is_quantized(value):
        return regrid(array, value, rtol) is not None
    return fit_channels(array, _reference(value), 0, rtol) is not None if array.shape == np.shape(value) else False


def quantized_for_graph(model, quantized: dict[str, Any], rtol: float = DEFAULT_RTOL) -> dict[str, PackQuantized]:
    """{initializer name: PackQuantized} for every quantized tensor (keyed by ONNX or PyTorch name);
    ValueError naming those the graph does not hold on their grid."""
    inits = initializer_arrays(model)
    names = torch_to_onnx_names(model, quantized, rtol)
    missing = sorted(set(quantized) - set(names))
    if missing:
        raise ValueError(f"no initializer of the ONNX graph holds the quantized weights of {', '.join(missing)} "
                         "(pack the ONNX export of the fake-quantized model: its weights are codes * scale)")
    return {names[n]: regrid(inits[names[n]], q, rtol) for n, q in quantized.items()}


def externalize(model, weights_file: str = rpack.WEIGHTS_FILE, align: int = 64) -> list[tuple[str, int, np.ndarray]]:
    """Rewrite every initializer of `model` (in place) as external data in `weights_file`, at
    offsets computed here; returns [(name, offset, array)] in file order."""
    import onnx

    arrays = initializer_arrays(model)
    inits = [i for i in model.graph.initializer if i.data_type != onnx.TensorProto.STRING]
    offsets, _ = rpack.layout_offsets([arrays[i.name].nbytes for i in inits], align)
    out = []
    for init, offset in zip(inits, offsets):
        array = arrays[init.name]
        fresh = onnx.TensorProto(name=init.name, data_type=init.data_type, dims=list(init.dims))
        fresh.data_location = onnx.TensorProto.EXTERNAL
        for key, val in (("location", weights_file), ("offset", str(offset)), ("length", str(array.nbytes))):
            entry = fresh.external_data.add()
            entry.key, entry.value = key, val
        init.CopyFrom(fresh)
        out.append((init.name, offset, array))
    return out


def pack_metadata(model, meta: dict[str, Any] | None) -> dict[str, Any]:
    """The header's model table: the graph's rsedge.* metadata, then `meta` (name, arch, recipe...)."""
    table = normalize_metadata({p.key: p.value for p in model.metadata_props})
    table.update(meta or {})
    try:
        json.dumps(table, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise ValueError(f"pack metadata must be plain JSON values: {e}") from e
    return table


def write_pack(onnx_model: Any, quantized: dict[str, Any], out_path: str | Path, meta: dict[str, Any] | None = None,
               options: WritePackOptions | None = None) -> dict[str, Any]:
    """Pack an FP32 ONNX model (path or proto; the export of the fake-quantized model) with the
    codes of `quantized` ({ONNX or PyTorch name: QuantizedTensor-like}) into `out_path`, read it
    back, and report its bytes and the measured CR (FP32 size / pack file size)."""
    options = options or WritePackOptions()
    model = load_onnx(onnx_model)
    onnx_fp32_bytes = model.ByteSize()
    on_grid = quantized_for_graph(model, quantized, options.rtol)
    table = pack_metadata(model, meta)
    tensors = externalize(model, rpack.WEIGHTS_FILE, options.align)
    fp32_bytes, basis = onnx_fp32_bytes, "onnx"
    if options.fp32_reference is not None:
        fp32_bytes, basis = os.path.getsize(options.fp32_reference), "safetensors"
    runtime_options = rpack.PackOptions(float16=options.float16, fp32_bytes=fp32_bytes, fp32_reference=basis,
                                        preset=options.preset)
    graph_bytes = model.SerializeToString()
    size = rpack.write_pack_file(str(out_path), graph_bytes,
                                 [(n, off, on_grid.get(n, a)) for n, off, a in tensors], table, runtime_options)
    pack = rpack.read_pack(str(out_path))
    return _report(pack, tensors, on_grid, size, onnx_fp32_bytes, fp32_bytes, basis, len(graph_bytes))


def _report(pack, tensors, on_grid, size, onnx_fp32_bytes, fp32_bytes, basis, graph_bytes) -> dict[str, Any]:
    originals = {n: a for n, _, a in tensors}
    error = max([float(np.abs(pack.array(e).astype(np.float64) - originals[e["name"]]).max(initial=0.0))
                 for e in pack.entries if e["dtype"].startswith("float")] or [0.0])
    layers = [{"name": n, "bits": q.bits, "axis": q.axis, "params": int(np.size(q.codes)),
               "kept": int(np.size(q.codes) if q.mask is None else np.count_nonzero(q.mask))}
              for n, q in on_grid.items()]
    header = pack.header
    return {"pack": str(pack.path), "pack_bytes": size, "cr": fp32_bytes / size, "cr_basis": basis,
            "fp32_bytes": fp32_bytes, "onnx_fp32_bytes": onnx_fp32_bytes, "graph_bytes": graph_bytes,
            "header_bytes": size - rpack.PREFIX_SIZE - header["payload"]["length"],
            "payload_bytes": header["payload"]["length"], "payload_raw_bytes": header["payload"]["raw_length"],
            "weights_bin_bytes": header["weights"]["length"], "tensors": len(pack.entries),
            "quantized_tensors": len(on_grid), "params": int(sum(np.size(a) for a in originals.values())),
            "quantized_params": int(sum(layer["params"] for layer in layers)),
            "max_weight_error": error, "layers": layers, "sha256": header["payload"]["sha256"]}
