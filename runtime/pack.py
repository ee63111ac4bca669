"""The .rspack uplink format: a quantized model as few bytes as a thin radio link allows.

A satellite or a drone receives a pack, checks it, and unpacks it with numpy and the standard
library only (Python 3.6) into an ONNX model that TensorRT's parser or ONNX Runtime reads:

- `model.onnx`: the graph bytes the host stored, verbatim. Every initializer in it is ONNX
  *external data* (`data_location = EXTERNAL`, `location = weights.bin`, `offset`, `length`),
  so no protobuf is edited, or even parsed, on the device.
- `weights.bin`: written by the unpacker, each tensor at the offset its graph entry names:
  quantized weights dequantized by `dequantize` (the one definition the host's quantizer uses
  too), the other tensors copied. TensorRT's `parse_from_file` and ONNX Runtime read external
  data from the model's own folder, so the two files must stay side by side.

Byte layout (integers little-endian):

    offset  size  field
    0       8     magic  b"\\x89RSPACK\\n"  (the high-bit byte and the newline catch 7-bit or
                  text-mode transfers, as PNG's magic does)
    8       2     format version, uint16 (this module reads and writes 1)
    10      2     flags, uint16, 0 (reserved)
    12      4     header length H, uint32
    16      32    SHA-256 of the header bytes
    48      H     header: UTF-8 JSON (below)
    48+H    P     payload: one xz stream (standard library `lzma`), P = header["payload"]["length"]

The header (JSON object):

    format          "rspack"
    model           model metadata: name, task, classes, input_size, mean, std, ... (the ONNX's
                    rsedge.* metadata plus what the host adds)
    graph           {"file": "model.onnx", "data": [offset, length]} in the decompressed payload
    weights         {"file": "weights.bin", "length": bytes of weights.bin}
    tensors         [entry, ...] in weights.bin order (below)
    fp32_bytes      size of the FP32 model this pack replaces, and fp32_reference its kind
                    ("safetensors" or "onnx"): CR = fp32_bytes / pack file size
    payload         {"codec": "xz", "length": P, "raw_length": decompressed bytes,
                     "sha256": hex SHA-256 of the P payload bytes as stored (before decompression)}

A tensor entry: name, shape, dtype (its ONNX type in weights.bin: float32, float16, int64, ...),
weights [offset, length] (its bytes in weights.bin) and storage, one of:

    raw        data [offset, length]: the tensor's bytes, little-endian, in its own dtype
    float16    data [offset, length]: a float32 tensor stored as float16, widened on unpacking
    quantized  a float32 tensor as symmetric integer codes: bits (1..8), axis (null: one scale;
               0: one scale per output channel), scale [offset, length] (float32), count (codes
               stored), codes [offset, length], mask (null, or {"coding": "bitmap",
               "data": [offset, length]})

Spans ([offset, length]) are bytes of the decompressed payload. Codes are stored unsigned,
code + 2**(bits-1) (bits >= 2) or 0 for -1 and 1 for +1 (bits == 1), bit-packed most significant
bit first with no padding between codes (`pack_bits`); a section ends on a byte boundary (zero
bits pad it). With a mask, the bitmap holds one bit per weight in C order (1 = kept, packed like
1-bit codes) and only the kept weights' codes are stored, in C order; the others dequantize to 0.
value = code * scale (the scale broadcast along `axis`), in float32.

`read_pack` refuses, with a PackError naming the file, a pack that is truncated, has trailing
bytes, a wrong magic, an unknown version, a header or payload whose SHA-256 does not match, or
entries that point outside the payload. The SHA-256 sums detect damage and tampering in transit;
they do not authenticate the sender (anyone can write a valid pack): sign the pack, or send it
over an authenticated link, where that matters.
"""

import hashlib
import json
import os
import struct

import numpy as np

from .errors import RuntimeToolError
from .fileio import atomic_write_bytes

MAGIC = b"\x89RSPACK\n"
VERSION = 1
_PREFIX = struct.Struct("<8sHHI32s")
PREFIX_SIZE = _PREFIX.size
FORMAT_NAME = "rspack"
CODEC = "xz"
GRAPH_FILE = "model.onnx"
WEIGHTS_FILE = "weights.bin"
MASK_BITMAP = "bitmap"
STORAGES = ("raw", "float16", "quantized")
DTYPES = {"float32": "<f4", "float16": "<f2", "float64": "<f8", "int8": "i1", "uint8": "u1", "int16": "<i2",
          "uint16": "<u2", "int32": "<i4", "uint32": "<u4", "int64": "<i8", "uint64": "<u8", "bool": "?"}
_CHUNK = 1 << 20  # codes per block: bounds the 8x bit matrix on a device with little memory


class PackError(RuntimeToolError):
    """A pack that cannot be trusted or read: the message names the file and what is wrong."""


# ---- bit packing -------------------------------------------------------------------------------

def _check_bits(bits):
    try:
        valid = not isinstance(bits, bool) and int(bits) == bits and 1 <= int(bits) <= 8
    except (TypeError, ValueError):
        valid = False
    if not valid:
        raise ValueError("bits must be an integer from 1 to 8, got {!r}".format(bits))
    return int(bits)


def pack_bits(codes, bits):
    """Unsigned codes (each < 2**bits) -> bytes, `bits` per code, most significant bit first."""
    bits = _check_bits(bits)
    flat = np.asarray(codes).reshape(-1)
    if flat.size and (flat.dtype.kind not in "iub" or flat.min() < 0 or flat.max() >= 1 << bits):
        raise ValueError("codes must be integers in [0, {}] to pack at {} bits".format((1 << bits) - 1, bits))
    flat = flat.astype(np.uint8)
    chunks = []
    for start in range(0, flat.size, _CHUNK):
        block = np.unpackbits(flat[start:start + _CHUNK].reshape(-1, 1), axis=1)[:, 8 - bits:]
        chunks.append(np.packbits(block.reshape(-1)).tobytes())
    return b"".join(chunks)


def packed_size(count, bits):
    return (int(count) * int(bits) + 7) // 8


def unpack_bits(data, bits, count):
    """The inverse of `pack_bits`: `count` codes as a uint8 array."""
    bits = _check_bits(bits)
    count = int(count)
    buf = np.frombuffer(data, dtype=np.uint8)
    if buf.size != packed_size(count, bits):
        raise ValueError("{} codes at {} bits take {} bytes, got {}".format(
            count, bits, packed_size(count, bits), buf.size))
    out = np.empty(count, dtype=np.uint8)
    step = _CHUNK * bits // 8
    for i, start in enumerate(range(0, count, _CHUNK)):
        n = min(_CHUNK, count - start)
        block = np.unpackbits(buf[i * step:i * step + packed_size(n, bits)])[:n * bits].reshape(n, bits)
        wide = np.zeros((n, 8), dtype=np.uint8)
        wide[:, 8 - bits:] = block
        out[start:start + n] = np.packbits(wide, axis=1).reshape(n)
    return out


def to_unsigned(codes, bits):
    """Signed codes -> the unsigned codes a pack stores (bits == 1: -1 -> 0, +1 -> 1)."""
    bits = _check_bits(bits)
    codes = np.asarray(codes)
    if bits == 1:
        if codes.size and not np.all(np.abs(codes) == 1):
            raise ValueError("1-bit codes must be -1 or +1 (a pruned weight needs a mask)")
        return (codes > 0).astype(np.uint8)
    low, high = code_range(bits)
    if codes.size and (codes.min() < low or codes.max() > high):
        raise ValueError("{}-bit codes must lie in [{}, {}]".format(bits, low, high))
    return (codes.astype(np.int16) - low).astype(np.uint8)


def from_unsigned(unsigned, bits):
    bits = _check_bits(bits)
    unsigned = np.asarray(unsigned, dtype=np.int16)
    if bits == 1:
        return (unsigned * 2 - 1).astype(np.int8)
    return (unsigned + code_range(bits)[0]).astype(np.int8)


def code_range(bits):
    """(lowest, highest) signed code at `bits`; 1 bit is {-1, +1}."""
    bits = _check_bits(bits)
    return (-1, 1) if bits == 1 else (-(1 << (bits - 1)), (1 << (bits - 1)) - 1)


# ---- dequantization ----------------------------------------------------------------------------

def _broadcast_scale(scale, axis, shape):
    scale = np.asarray(scale, dtype=np.float32).reshape(-1)
    if axis is None:
        if scale.size != 1:
            raise ValueError("a per-tensor scale has one value, got {}".format(scale.size))
        return scale.reshape(())
    axis = int(axis)
    if not -len(shape) <= axis < len(shape):
        raise ValueError("axis {} is outside a tensor of shape {}".format(axis, tuple(shape)))
    if scale.size != shape[axis]:
        raise ValueError("{} scales for {} channels on axis {}".format(scale.size, shape[axis], axis))
    view = [1] * len(shape)
    view[axis] = scale.size
    return scale.reshape(view)


def dequantize(codes, scale=None, axis=None, bits=None, mask=None):
    """value = codes * scale (broadcast along `axis`; None: one scale), float32; weights where
    `mask` is False are 0. The single definition the host's quantizer and the device share.

    `codes`: signed integers in [-(2**(bits-1)), 2**(bits-1) - 1] (1 bit: -1 or +1). A
    QuantizedTensor-like object (attributes codes, scale, axis, bits, mask) may be passed alone.
    """
    if scale is None and hasattr(codes, "codes"):
        q = codes
        codes, scale, axis, bits, mask = q.codes, q.scale, q.axis, q.bits, getattr(q, "mask", None)
    codes = np.asarray(codes)
    if codes.dtype.kind not in "iu":
        raise ValueError("codes must be integers, got {}".format(codes.dtype))
    low, high = code_range(bits)
    if codes.size and (codes.min() < low or codes.max() > high):
        raise ValueError("{}-bit codes must lie in [{}, {}]".format(int(bits), low, high))
    value = codes.astype(np.float32) * _broadcast_scale(scale, axis, codes.shape)
    if mask is not None:
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != codes.shape:
            raise ValueError("mask shape {} differs from codes shape {}".format(mask.shape, codes.shape))
        value = np.where(mask, value, np.float32(0))
    return value.astype(np.float32, copy=False)


# ---- writing -----------------------------------------------------------------------------------

class PackOptions(object):
    """How a pack is written. float16: store the float32 tensors that are not quantized as float16
    (halves their bytes; the unpacked model then differs by float16 rounding). fp32_bytes /
    fp32_reference: the FP32 model the pack replaces, recorded so CR can be read off the pack."""

    def __init__(self, float16=False, fp32_bytes=None, fp32_reference=None, preset=None,
                 graph_file=GRAPH_FILE, weights_file=WEIGHTS_FILE):
        self.float16 = bool(float16)
        self.fp32_bytes = None if fp32_bytes is None else int(fp32_bytes)
        self.fp32_reference = fp32_reference
        self.preset = preset
        self.graph_file = graph_file
        self.weights_file = weights_file


class _Payload(object):
    def __init__(self):
        self.parts = []
        self.size = 0

    def add(self, data):
        data = bytes(data)
        self.parts.append(data)
        self.size += len(data)
        return [self.size - len(data), len(data)]

    def bytes(self):
        return b"".join(self.parts)


def _nbytes(shape, dtype):
    n = 1
    for d in shape:
        n *= int(d)
    return n * np.dtype(DTYPES[dtype]).itemsize


def layout_offsets(sizes, align=64):
    """Offsets of consecutive blobs of `sizes` bytes in weights.bin, each aligned to `align`
    bytes, and the file's total length (what the host writes into the graph's external data)."""
    offsets, end = [], 0
    for size in sizes:
        start = -(-end // align) * align
        offsets.append(start)
        end = start + int(size)
    return offsets, end


def _quantized_entry(payload, q):
    bits = _check_bits(q.bits)
    codes = np.asarray(q.codes)
    axis = None if q.axis is None else int(q.axis)
    scale = np.asarray(q.scale, dtype=np.float32).reshape(-1)
    _broadcast_scale(scale, axis, codes.shape)
    mask = getattr(q, "mask", None)
    mask = None if mask is None else np.asarray(mask, dtype=bool)
    if mask is not None and mask.shape != codes.shape:
        raise ValueError("mask shape {} differs from codes shape {}".format(mask.shape, codes.shape))
    if mask is not None and mask.all():
        mask = None
    kept = codes.reshape(-1) if mask is None else codes[mask]
    entry = {"storage": "quantized", "bits": bits, "axis": axis,
             "scale": payload.add(scale.astype("<f4").tobytes()), "count": int(kept.size),
             "codes": payload.add(pack_bits(to_unsigned(kept, bits), bits)), "mask": None}
    if mask is not None:
        entry["mask"] = {"coding": MASK_BITMAP, "data": payload.add(pack_bits(mask.reshape(-1), 1))}
    return entry, list(codes.shape), "float32"


def _tensor_entry(payload, name, offset, value, options):
    """(header entry) for one tensor: `value` an array (raw / float16) or QuantizedTensor-like."""
    if hasattr(value, "codes"):
        entry, shape, dtype = _quantized_entry(payload, value)
    else:
        array = np.asarray(value)
        dtype = array.dtype.name
        if dtype not in DTYPES:
            raise ValueError("tensor {}: dtype {} cannot be packed".format(name, dtype))
        shape = list(array.shape)
        if options.float16 and dtype == "float32":
            entry = {"storage": "float16", "data": payload.add(array.astype("<f2").tobytes())}
        else:
            entry = {"storage": "raw", "data": payload.add(array.astype(DTYPES[dtype]).tobytes())}
    head = {"name": str(name), "shape": shape, "dtype": dtype, "weights": [int(offset), _nbytes(shape, dtype)]}
    head.update(entry)
    return head


def _compress(raw, preset):
    import lzma

    preset = (9 | lzma.PRESET_EXTREME) if preset is None else preset
    return lzma.compress(raw, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC64, preset=preset)


def encode_pack(graph_bytes, tensors, model=None, options=None):
    """The bytes of a pack. tensors: [(name, offset in weights.bin, array or QuantizedTensor-like)]
    in weights.bin order; graph_bytes: an ONNX model whose initializers are external data at
    those offsets in `options.weights_file`; model: the metadata the header carries."""
    options = options or PackOptions()
    payload = _Payload()
    graph = {"file": options.graph_file, "data": payload.add(graph_bytes)}
    entries = [_tensor_entry(payload, name, offset, value, options) for name, offset, value in tensors]
    weights_length = max([e["weights"][0] + e["weights"][1] for e in entries] or [0])
    raw = payload.bytes()
    stored = _compress(raw, options.preset)
    header = {"format": FORMAT_NAME, "model": model or {}, "graph": graph,
              "weights": {"file": options.weights_file, "length": weights_length}, "tensors": entries,
              "fp32_bytes": options.fp32_bytes, "fp32_reference": options.fp32_reference,
              "payload": {"codec": CODEC, "length": len(stored), "raw_length": len(raw),
                          "sha256": hashlib.sha256(stored).hexdigest()}}
    head = json.dumps(header, separators=(",", ":"), allow_nan=False).encode("utf-8")
    prefix = _PREFIX.pack(MAGIC, VERSION, 0, len(head), hashlib.sha256(head).digest())
    return prefix + head + stored


def write_pack_file(path, graph_bytes, tensors, model=None, options=None):
    """`encode_pack` written atomically to `path`; returns the number of bytes written."""
    data = encode_pack(graph_bytes, tensors, model, options)
    atomic_write_bytes(path, data)
    return len(data)


# ---- reading -----------------------------------------------------------------------------------

def _fail(path, message):
    return PackError("{}: {}".format(path, message))


def _read_prefix(path, data):
    if len(data) < PREFIX_SIZE:
        if MAGIC.startswith(data[:len(MAGIC)]):
            raise _fail(path, "truncated pack: {} bytes, shorter than its {}-byte fixed header".format(
                len(data), PREFIX_SIZE))
        raise _fail(path, "not an rsedge pack (wrong magic bytes)")
    magic, version, _flags, head_len, head_sha = _PREFIX.unpack(data[:PREFIX_SIZE])
    if magic != MAGIC:
        raise _fail(path, "not an rsedge pack (wrong magic bytes)")
    if version != VERSION:
        raise _fail(path, "unknown pack format version {} (this reader knows version {})".format(version, VERSION))
    if len(data) < PREFIX_SIZE + head_len:
        raise _fail(path, "truncated pack: {} bytes, its header alone needs {}".format(
            len(data), PREFIX_SIZE + head_len))
    head = data[PREFIX_SIZE:PREFIX_SIZE + head_len]
    if hashlib.sha256(head).digest() != head_sha:
        raise _fail(path, "header sha256 mismatch: the pack was tampered with or damaged in transit")
    try:
        header = json.loads(head.decode("utf-8"))
    except ValueError as e:
        raise _fail(path, "header is not valid JSON ({})".format(e)) from None
    if not isinstance(header, dict) or header.get("format") != FORMAT_NAME:
        raise _fail(path, "header does not describe an {} pack".format(FORMAT_NAME))
    return version, header, PREFIX_SIZE + head_len


def _read_payload(path, data, start, header):
    spec = header.get("payload") or {}
    try:
        length, raw_length, digest = int(spec["length"]), int(spec["raw_length"]), str(spec["sha256"])
    except (KeyError, TypeError, ValueError):
        raise _fail(path, "malformed header: payload length, raw_length and sha256 are required") from None
    if spec.get("codec") != CODEC:
        raise _fail(path, "unknown payload codec {!r} (this reader knows {!r})".format(spec.get("codec"), CODEC))
    have = len(data) - start
    if have < length:
        raise _fail(path, "truncated pack: payload has {} of its {} bytes".format(have, length))
    if have > length:
        raise _fail(path, "{} unexpected bytes after the payload".format(have - length))
    stored = data[start:]
    if hashlib.sha256(stored).hexdigest() != digest:
        raise _fail(path, "payload sha256 mismatch: the pack was tampered with or damaged in transit")
    return _decompress(path, stored, raw_length)


def _decompress(path, stored, raw_length):
    try:
        import lzma
    except ImportError:
        raise _fail(path, "this Python has no lzma module (standard library built without liblzma)") from None
    decompressor = lzma.LZMADecompressor(format=lzma.FORMAT_XZ)
    try:
        raw = decompressor.decompress(stored, max_length=raw_length + 1)
    except lzma.LZMAError as e:
        raise _fail(path, "payload does not decompress ({})".format(e)) from None
    if len(raw) != raw_length or not decompressor.eof:
        raise _fail(path, "payload decompresses to the wrong size (expected {} bytes)".format(raw_length))
    return raw


def read_pack(path):
    """A checked Pack: magic, version, lengths, header and payload SHA-256, entry bounds."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except (IOError, OSError) as e:
        raise _fail(path, "cannot read the pack ({})".format(e)) from None
    version, header, start = _read_prefix(path, data)
    payload = _read_payload(path, data, start, header)
    pack = Pack(path, version, header, payload)
    pack.check()
    return pack


def _span(entry, key, limit):
    span = entry.get(key)
    if not (isinstance(span, list) and len(span) == 2 and all(isinstance(v, int) and v >= 0 for v in span)):
        raise ValueError("{} must be [offset, length]".format(key))
    if span[0] + span[1] > limit:
        raise ValueError("{} [{}, {}] ends past {} bytes".format(key, span[0], span[1], limit))
    return span


def _safe_name(name, what):
    if not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name:
        raise ValueError("{} file name {!r} must be a plain file name".format(what, name))
    return name


def _nelem(shape):
    n = 1
    for d in shape:
        n *= d
    return n


def _check_quantized(entry, n, limit):
    _check_bits(entry.get("bits"))
    axis, shape = entry.get("axis"), entry["shape"]
    if axis is not None and not (isinstance(axis, int) and 0 <= axis < len(shape)):
        raise ValueError("axis {!r} is outside shape {}".format(axis, shape))
    scales = 1 if axis is None else shape[axis]
    if _span(entry, "scale", limit)[1] != 4 * scales:
        raise ValueError("scale must hold {} float32 values".format(scales))
    count, mask = entry.get("count"), entry.get("mask")
    if not isinstance(count, int) or not 0 <= count <= n:
        raise ValueError("count must be an integer from 0 to {}".format(n))
    if mask is None and count != n:
        raise ValueError("a dense tensor stores all {} codes, not {}".format(n, count))
    if mask is not None:
        if not isinstance(mask, dict) or mask.get("coding") != MASK_BITMAP:
            raise ValueError("unknown mask coding {!r}".format(mask))
        if _span(mask, "data", limit)[1] != packed_size(n, 1):
            raise ValueError("mask bitmap must take {} bytes".format(packed_size(n, 1)))
    if _span(entry, "codes", limit)[1] != packed_size(count, entry["bits"]):
        raise ValueError("codes must take {} bytes".format(packed_size(count, entry["bits"])))


def check_entry(entry, payload_length, weights_length):
    """Raise ValueError unless a tensor entry is complete and points inside payload and weights."""
    shape, dtype, storage = entry.get("shape"), entry.get("dtype"), entry.get("storage")
    if not isinstance(entry.get("name"), str):
        raise ValueError("a tensor entry has no name")
    if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
        raise ValueError("shape must be a list of sizes")
    if dtype not in DTYPES or storage not in STORAGES:
        raise ValueError("unknown dtype {!r} or storage {!r}".format(dtype, storage))
    if _span(entry, "weights", weights_length)[1] != _nbytes(shape, dtype):
        raise ValueError("weights length differs from its shape and dtype ({} bytes)".format(_nbytes(shape, dtype)))
    if storage != "raw" and dtype != "float32":
        raise ValueError("{} storage is for float32 tensors, not {}".format(storage, dtype))
    n = _nelem(shape)
    if storage == "raw" and _span(entry, "data", payload_length)[1] != _nbytes(shape, dtype):
        raise ValueError("data must take {} bytes".format(_nbytes(shape, dtype)))
    if storage == "float16" and _span(entry, "data", payload_length)[1] != 2 * n:
        raise ValueError("float16 data must take {} bytes".format(2 * n))
    if storage == "quantized":
        _check_quantized(entry, n, payload_length)


class Pack(object):
    """A pack read and checked by `read_pack`: its header (dict), decompressed payload (bytes)
    and the tensors it describes."""

    def __init__(self, path, version, header, payload):
        self.path = path
        self.version = version
        self.header = header
        self.payload = payload

    @property
    def model(self):
        return self.header.get("model") or {}

    @property
    def entries(self):
        return self.header.get("tensors") or []

    @property
    def graph_file(self):
        return self.header["graph"]["file"]

    @property
    def weights_file(self):
        return self.header["weights"]["file"]

    def check(self):
        """PackError unless every span lies inside the payload and weights.bin, names are plain."""
        try:
            graph, weights = self.header["graph"], self.header["weights"]
            _safe_name(graph.get("file"), "graph")
            if _safe_name(weights.get("file"), "weights") == graph["file"]:
                raise ValueError("the graph and the weights cannot share the file name {!r}".format(graph["file"]))
            _span(graph, "data", len(self.payload))
            length = weights.get("length")
            if not isinstance(length, int) or length < 0:
                raise ValueError("weights length must be a byte count")
            if not isinstance(self.header.get("tensors"), list):
                raise ValueError("tensors must be a list")
            for entry in self.entries:
                if not isinstance(entry, dict):
                    raise ValueError("a tensor entry is not an object")
                try:
                    check_entry(entry, len(self.payload), length)
                except ValueError as e:
                    raise ValueError("tensor {!r}: {}".format(entry.get("name"), e)) from None
            _check_disjoint(self.entries)
        except (KeyError, TypeError, AttributeError, ValueError) as e:
            raise _fail(self.path, "malformed header: {}".format(e)) from None

    def _bytes(self, span):
        return self.payload[span[0]:span[0] + span[1]]

    def graph_bytes(self):
        return self._bytes(self.header["graph"]["data"])

    def quantized(self, entry):
        """(codes int8, scale float32, axis, bits, mask or None) of a quantized entry."""
        bits, shape, n = entry["bits"], tuple(entry["shape"]), _nelem(entry["shape"])
        kept = from_unsigned(unpack_bits(self._bytes(entry["codes"]), bits, entry["count"]), bits)
        scale = np.frombuffer(self._bytes(entry["scale"]), dtype="<f4").astype(np.float32)
        if entry.get("mask") is None:
            return kept.reshape(shape), scale, entry["axis"], bits, None
        mask = unpack_bits(self._bytes(entry["mask"]["data"]), 1, n).astype(bool)
        if int(mask.sum()) != entry["count"]:
            raise _fail(self.path, "malformed pack: tensor {!r} has {} kept weights in its mask but {} codes".format(
                entry["name"], int(mask.sum()), entry["count"]))
        codes = np.zeros(n, dtype=np.int8)
        codes[mask] = kept
        return codes.reshape(shape), scale, entry["axis"], bits, mask.reshape(shape)

    def array(self, entry):
        """The tensor as the unpacked model holds it: its dtype and shape, quantized ones dequantized."""
        if isinstance(entry, str):
            entry = self.entry(entry)
        shape, storage = tuple(entry["shape"]), entry["storage"]
        if storage == "quantized":
            return dequantize(*self.quantized(entry))
        if storage == "float16":
            return np.frombuffer(self._bytes(entry["data"]), dtype="<f2").astype(np.float32).reshape(shape)
        return np.frombuffer(self._bytes(entry["data"]), dtype=DTYPES[entry["dtype"]]).reshape(shape).copy()

    def entry(self, name):
        for entry in self.entries:
            if entry["name"] == name:
                return entry
        raise KeyError("{} holds no tensor named {!r}".format(self.path, name))

    def weights_bytes(self):
        """weights.bin: every tensor at its offset, little-endian, zero bytes between them."""
        out = bytearray(self.header["weights"]["length"])
        for entry in self.entries:
            offset, length = entry["weights"]
            out[offset:offset + length] = self.array(entry).astype(DTYPES[entry["dtype"]]).tobytes()
        return bytes(out)


def _check_disjoint(entries):
    spans = sorted(tuple(e["weights"]) for e in entries if e["weights"][1])
    for (a, alen), (b, _) in zip(spans, spans[1:]):
        if a + alen > b:
            raise ValueError("tensors overlap in the weights file at byte {}".format(b))


def unpack_to_onnx(pack_path, out_dir):
    """Check a pack and write its ONNX model into out_dir (created if needed): weights.bin first,
    then model.onnx, whose initializers point at it. Returns the path of model.onnx."""
    pack = pack_path if isinstance(pack_path, Pack) else read_pack(pack_path)
    if not os.path.isdir(out_dir):
        os.makedirs(out_dir)
    atomic_write_bytes(os.path.join(out_dir, pack.weights_file), pack.weights_bytes())
    return atomic_write_bytes(os.path.join(out_dir, pack.graph_file), pack.graph_bytes())


def describe(pack):
    """A short summary of a checked pack (for logs and the manifest)."""
    entries = pack.entries
    quantized = [e for e in entries if e["storage"] == "quantized"]
    size = os.path.getsize(pack.path) if isinstance(pack.path, str) and os.path.isfile(pack.path) else None
    fp32 = pack.header.get("fp32_bytes")
    return {"file": pack.path, "bytes": size, "version": pack.version, "model": pack.model.get("name"),
            "tensors": len(entries), "quantized": len(quantized),
            "bits": sorted(set(e["bits"] for e in quantized)), "weights_bytes": pack.header["weights"]["length"],
            "fp32_bytes": fp32, "fp32_reference": pack.header.get("fp32_reference"),
            "cr": (float(fp32) / size) if fp32 and size else None}
