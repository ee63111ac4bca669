"""Read what the device needs from an ONNX file without the `onnx` package.

The TensorRT path must not depend on `onnx` (it is not on a JetPack 4 image), yet the engine
builder needs the model's `metadata_props` (to carry preprocessing into the engine's sidecar)
and the node names and operators (TensorRT 8.x parser errors give only a node index). ONNX is
a protobuf; the few fields we need are read here with a minimal wire-format decoder that skips
everything else (initializers included) by length, so even large models read quickly.

Field numbers are those of onnx.proto (ModelProto, GraphProto, NodeProto, ValueInfoProto,
TypeProto.Tensor, TensorShapeProto, StringStringEntryProto).
"""

from ..errors import RuntimeToolError

# ModelProto
_MODEL_IR_VERSION = 1
_MODEL_PRODUCER = 2
_MODEL_GRAPH = 7
_MODEL_OPSET = 8
_MODEL_METADATA = 14
# GraphProto
_GRAPH_NODE = 1
_GRAPH_INITIALIZER = 5
_GRAPH_INPUT = 11
_GRAPH_OUTPUT = 12
# NodeProto
_NODE_NAME = 3
_NODE_OP_TYPE = 4
# ValueInfoProto / TypeProto / TypeProto.Tensor / TensorShapeProto / Dimension
_VI_NAME = 1
_VI_TYPE = 2
_TYPE_TENSOR = 1
_TENSOR_ELEM_TYPE = 1
_TENSOR_SHAPE = 2
_SHAPE_DIM = 1
_DIM_VALUE = 1
_DIM_PARAM = 2
# TensorProto (initializer) name
_TENSOR_NAME = 8
# OperatorSetIdProto
_OPSET_DOMAIN = 1
_OPSET_VERSION = 2

ELEM_TYPES = {1: "float32", 2: "uint8", 3: "int8", 5: "int16", 6: "int32", 7: "int64", 9: "bool", 10: "float16",
              11: "float64", 16: "bfloat16"}


class OnnxFormatError(RuntimeToolError):
    pass


def _varint(buf, pos):
    result = 0
    shift = 0
    while True:
        if pos >= len(buf):
            raise OnnxFormatError("truncated varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7
        if shift > 70:
            raise OnnxFormatError("varint too long")


def iter_fields(buf, start=0, end=None):
    """Yield (field number, wire type, value) where value is an int or a (start, end) slice."""
    pos = start
    end = len(buf) if end is None else end
    while pos < end:
        key, pos = _varint(buf, pos)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 1:
            value, pos = (pos, pos + 8), pos + 8
        elif wire == 2:
            length, pos = _varint(buf, pos)
            value, pos = (pos, pos + length), pos + length
        elif wire == 5:
            value, pos = (pos, pos + 4), pos + 4
        else:
            raise OnnxFormatError(f"unsupported protobuf wire type {wire} (not an ONNX file?)")
        if pos > end:
            raise OnnxFormatError(f"field {field} runs past the end of its message (truncated file?)")
        yield field, wire, value


def _text(buf, span):
    return bytes(buf[span[0]:span[1]]).decode("utf-8", "replace")


def _signed64(value):
    return value - (1 << 64) if value >= 1 << 63 else value


def _value_info(buf, span):
    name, elem, dims = None, None, None
    for f, w, v in iter_fields(buf, *span):
        if f == _VI_NAME and w == 2:
            name = _text(buf, v)
        elif f == _VI_TYPE and w == 2:
            for tf, tw, tv in iter_fields(buf, *v):
                if tf != _TYPE_TENSOR or tw != 2:
                    continue
                for ef, ew, ev in iter_fields(buf, *tv):
                    if ef == _TENSOR_ELEM_TYPE and ew == 0:
                        elem = ELEM_TYPES.get(ev, str(ev))
                    elif ef == _TENSOR_SHAPE and ew == 2:
                        dims = []
                        for sf, sw, sv in iter_fields(buf, *ev):
                            if sf != _SHAPE_DIM or sw != 2:
                                continue
                            dim = None
                            for df, dw, dv in iter_fields(buf, *sv):
                                if df == _DIM_VALUE and dw == 0:
                                    dim = _signed64(dv)
                                elif df == _DIM_PARAM and dw == 2:
                                    dim = _text(buf, dv)
                            dims.append(dim)
    return {"name": name, "dtype": elem, "shape": dims}


def read_onnx_info(path):
    """{ir_version, producer, opsets, metadata, inputs, outputs, nodes} of an ONNX file.

    `inputs` leaves out initializers (old exporters list weights as graph inputs); a shape
    entry is an int, a symbolic name (str) for a dynamic axis, or None when unknown;
    `nodes` is [(name, op_type)] in graph order, the index TensorRT's parser reports.
    """
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise RuntimeToolError(f"cannot read ONNX file {path}: {e}") from e
    try:
        return _parse_model(memoryview(data), path)
    except OnnxFormatError as e:
        raise OnnxFormatError(f"{path} is not an ONNX model, or is damaged: {e}") from e


def _parse_model(buf, path):
    info = {"ir_version": None, "producer": None, "opsets": {}, "metadata": {}, "inputs": [], "outputs": [],
            "nodes": []}
    graph_span = None
    for f, w, v in iter_fields(buf):
        if f == _MODEL_IR_VERSION and w == 0:
            info["ir_version"] = v
        elif f == _MODEL_PRODUCER and w == 2:
            info["producer"] = _text(buf, v)
        elif f == _MODEL_GRAPH and w == 2:
            graph_span = v
        elif f == _MODEL_OPSET and w == 2:
            domain, version = "", None
            for of, ow, ov in iter_fields(buf, *v):
                if of == _OPSET_DOMAIN and ow == 2:
                    domain = _text(buf, ov)
                elif of == _OPSET_VERSION and ow == 0:
                    version = ov
            info["opsets"][domain or "ai.onnx"] = version
        elif f == _MODEL_METADATA and w == 2:
            key, value = None, ""
            for mf, mw, mv in iter_fields(buf, *v):
                if mf == 1 and mw == 2:
                    key = _text(buf, mv)
                elif mf == 2 and mw == 2:
                    value = _text(buf, mv)
            if key is not None:
                info["metadata"][key] = value
    if info["ir_version"] is None or graph_span is None:
        raise OnnxFormatError("no ir_version or graph")
    initializers = set()
    inputs = []
    for f, w, v in iter_fields(buf, *graph_span):
        if w != 2:
            continue
        if f == _GRAPH_NODE:
            name, op = "", ""
            for nf, nw, nv in iter_fields(buf, *v):
                if nf == _NODE_NAME and nw == 2:
                    name = _text(buf, nv)
                elif nf == _NODE_OP_TYPE and nw == 2:
                    op = _text(buf, nv)
            info["nodes"].append((name, op))
        elif f == _GRAPH_INITIALIZER:
            for tf, tw, tv in iter_fields(buf, *v):
                if tf == _TENSOR_NAME and tw == 2:
                    initializers.add(_text(buf, tv))
        elif f == _GRAPH_INPUT:
            inputs.append(_value_info(buf, v))
        elif f == _GRAPH_OUTPUT:
            info["outputs"].append(_value_info(buf, v))
    info["inputs"] = [i for i in inputs if i["name"] not in initializers]
    return info


def describe_node(info, index):
    """'node 12 'Conv_12' (Conv)' for a parser error's node index, using the file's own names."""
    if info is None or index is None or not 0 <= index < len(info["nodes"]):
        return f"node {index}"
    name, op = info["nodes"][index]
    return "node {} '{}' ({})".format(index, name or "<unnamed>", op)

