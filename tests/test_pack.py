"""The .rspack uplink format: bit packing, dequantization, tamper refusal, and the round trip
quantized PyTorch model -> ONNX export -> pack -> numpy-only unpack -> ONNX Runtime."""
import os
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest

from rsedge.runtime import pack as rpack

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---- bit packing and dequantization -------------------------------------------------------------

@pytest.mark.parametrize("bits", range(1, 9))
def test_bit_packing_round_trip_at_every_width(bits):
    rng = np.random.default_rng(bits)
    for count in (0, 1, 7, 8, 13, 1001):
        codes = rng.integers(0, 1 << bits, count).astype(np.uint8)
        codes[:2] = [0, (1 << bits) - 1][:count]  # both extremes
        data = rpack.pack_bits(codes, bits)
        assert len(data) == (count * bits + 7) // 8
        assert np.array_equal(rpack.unpack_bits(data, bits, count), codes)
    signed = np.array(rpack.code_range(bits) * 3, dtype=np.int8)
    assert np.array_equal(rpack.from_unsigned(rpack.to_unsigned(signed, bits), bits), signed)


def test_bits_are_most_significant_first_with_no_padding_between_codes():
    assert rpack.pack_bits([1, 0, 1], 1) == b"\xa0"
    assert rpack.pack_bits([15, 0, 9], 4) == b"\xf0\x90"
    assert rpack.pack_bits([0b101, 0b011, 0b111], 3) == bytes([0b10101111, 0b10000000])
    assert rpack.to_unsigned(np.array([-8, 0, 7]), 4).tolist() == [0, 8, 15]
    assert rpack.to_unsigned(np.array([-1, 1]), 1).tolist() == [0, 1]


def test_bit_packing_refuses_codes_out_of_range_and_wrong_lengths():
    with pytest.raises(ValueError, match=r"\[0, 7\]"):
        rpack.pack_bits([8], 3)
    for bits in (0, 9, None, 2.5):
        with pytest.raises(ValueError, match="bits must be"):
            rpack.pack_bits([0], bits)
    with pytest.raises(ValueError, match="take 2 bytes"):
        rpack.unpack_bits(b"\x00", 4, 3)
    with pytest.raises(ValueError, match="-1 or \\+1"):
        rpack.to_unsigned(np.array([0, 1]), 1)
    with pytest.raises(ValueError, match=r"\[-8, 7\]"):
        rpack.to_unsigned(np.array([8]), 4)


def test_dequantize_per_tensor_per_channel_and_mask():
    codes = np.array([[-8, 7], [3, -1]], dtype=np.int8)
    per_tensor = rpack.dequantize(codes, np.array([0.5], np.float32), None, 4)
    assert per_tensor.dtype == np.float32 and per_tensor.tolist() == [[-4.0, 3.5], [1.5, -0.5]]
    per_channel = rpack.dequantize(codes, np.array([1.0, 0.25], np.float32), 0, 4)
    assert per_channel.tolist() == [[-8.0, 7.0], [0.75, -0.25]]
    on_axis1 = rpack.dequantize(codes, np.array([1.0, 0.25], np.float32), 1, 4)
    assert on_axis1.tolist() == [[-8.0, 1.75], [3.0, -0.25]]
    one_bit = rpack.dequantize(np.array([1, -1, 1], np.int8), np.array([2.0], np.float32), None, 1,
                               mask=np.array([True, True, False]))
    assert one_bit.tolist() == [2.0, -2.0, 0.0]  # a pruned 1-bit weight is 0 through its mask
    qt = SimpleNamespace(codes=codes, scale=np.array([1.0, 0.25], np.float32), axis=0, bits=4, mask=None)
    assert np.array_equal(rpack.dequantize(qt), per_channel)
    with pytest.raises(ValueError, match="2 scales for 3 channels"):
        rpack.dequantize(np.zeros((3, 2), np.int8), np.ones(2, np.float32), 0, 4)
    with pytest.raises(ValueError, match=r"\[-2, 1\]"):
        rpack.dequantize(np.array([2], np.int8), np.ones(1, np.float32), None, 2)


# ---- the container -----------------------------------------------------------------------------

def _small_pack(tmp_path, float16=False):
    rng = np.random.default_rng(0)
    codes = rng.integers(-4, 4, (4, 3, 3, 3)).astype(np.int8)
    mask = rng.random(codes.shape) < 0.5
    codes[~mask] = 0
    q = SimpleNamespace(codes=codes, scale=np.linspace(0.1, 0.4, 4).astype(np.float32), axis=0, bits=3, mask=mask)
    bias = rng.standard_normal(4).astype(np.float32)
    shape = np.array([1, -1], dtype=np.int64)
    offsets, _ = rpack.layout_offsets([codes.size * 4, bias.nbytes, shape.nbytes])
    tensors = [("w", offsets[0], q), ("b", offsets[1], bias), ("shape", offsets[2], shape)]
    path = str(tmp_path / "m.rspack")
    rpack.write_pack_file(path, b"graph bytes", tensors, {"name": "tiny", "classes": ["a", "b"]},
                          rpack.PackOptions(float16=float16))
    return path, q, bias, shape


def test_a_pack_reads_back_what_was_written(tmp_path):
    path, q, bias, shape = _small_pack(tmp_path)
    pack = rpack.read_pack(path)
    assert pack.model == {"name": "tiny", "classes": ["a", "b"]} and pack.graph_bytes() == b"graph bytes"
    w = pack.entry("w")
    assert w["storage"] == "quantized" and w["mask"]["coding"] == "bitmap" and w["count"] == int(q.mask.sum())
    assert np.array_equal(pack.array("w"), rpack.dequantize(q))
    assert np.array_equal(pack.array("b"), bias) and np.array_equal(pack.array("shape"), shape)
    weights = pack.weights_bytes()
    off, length = pack.entry("shape")["weights"]
    assert off % 64 == 0 and np.array_equal(np.frombuffer(weights[off:off + length], "<i8"), shape)
    off, length = w["weights"]
    assert np.array_equal(np.frombuffer(weights[off:off + length], "<f4").reshape(4, 3, 3, 3), rpack.dequantize(q))
    half = rpack.read_pack(_small_pack(tmp_path, float16=True)[0])
    assert half.entry("b")["storage"] == "float16" and half.entry("shape")["storage"] == "raw"
    assert np.allclose(half.array("b"), bias, atol=1e-3) and half.array("b").dtype == np.float32


def _rewrite(path, data):
    with open(path, "wb") as f:
        f.write(data)
    return path


def test_tampered_truncated_or_foreign_packs_are_refused_by_name(tmp_path):
    path, _, _, _ = _small_pack(tmp_path)
    with open(path, "rb") as f:
        good = f.read()
    bad = str(tmp_path / "bad.rspack")
    flipped = bytearray(good)
    flipped[-10] ^= 0x01
    with pytest.raises(rpack.PackError, match=r"bad\.rspack: payload sha256 mismatch"):
        rpack.read_pack(_rewrite(bad, bytes(flipped)))
    flipped = bytearray(good)
    flipped[rpack.PREFIX_SIZE + 5] ^= 0x01
    with pytest.raises(rpack.PackError, match="header sha256 mismatch"):
        rpack.read_pack(_rewrite(bad, bytes(flipped)))
    for cut in (5, rpack.PREFIX_SIZE - 1, rpack.PREFIX_SIZE + 3, len(good) - 1):
        with pytest.raises(rpack.PackError, match=r"bad\.rspack: truncated"):
            rpack.read_pack(_rewrite(bad, good[:cut]))
    with pytest.raises(rpack.PackError, match="unexpected bytes after the payload"):
        rpack.read_pack(_rewrite(bad, good + b"\x00"))
    with pytest.raises(rpack.PackError, match="wrong magic"):
        rpack.read_pack(_rewrite(bad, b"PK\x03\x04" + good[4:]))
    future = good[:8] + (2).to_bytes(2, "little") + good[10:]
    with pytest.raises(rpack.PackError, match="unknown pack format version 2"):
        rpack.read_pack(_rewrite(bad, future))
    with pytest.raises(rpack.PackError, match="cannot read"):
        rpack.read_pack(str(tmp_path / "missing.rspack"))


def test_a_pack_cannot_write_outside_the_folder_it_is_unpacked_into(tmp_path):
    options = rpack.PackOptions(weights_file="../weights.bin")
    path = str(tmp_path / "evil.rspack")
    rpack.write_pack_file(path, b"g", [("b", 0, np.zeros(2, np.float32))], None, options)
    with pytest.raises(rpack.PackError, match="malformed header: weights file name '../weights.bin'"):
        rpack.unpack_to_onnx(path, str(tmp_path / "out"))
    assert not (tmp_path / "weights.bin").exists()


# ---- ONNX round trip ---------------------------------------------------------------------------

def _net():
    import torch
    from torch import nn

    torch.manual_seed(0)
    layers, widths = [], [3, 32, 64, 64, 64]
    for cin, cout in zip(widths, widths[1:]):
        layers += [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]
    model = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10)).eval()
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):  # non-trivial statistics, so folding them changes the weights
            m.running_mean.uniform_(-0.5, 0.5, generator=g)
            m.running_var.uniform_(0.5, 2.0, generator=g)
            m.weight.data.uniform_(0.2, 1.5, generator=g)
            m.bias.data.uniform_(-0.5, 0.5, generator=g)
    return model


def quantize(w, bits, per_channel=True, sparsity=0.0):
    """Symmetric uniform quantization (max-abs scale), the contract's QuantizedTensor fields."""
    w = np.asarray(w, dtype=np.float32)
    mask = np.abs(w) > np.quantile(np.abs(w), sparsity) if sparsity else None
    flat = w.reshape(len(w), -1) if per_channel else w.reshape(1, -1)
    if bits == 1:
        scale = np.abs(flat).mean(1).astype(np.float32)
        codes = np.where(w >= 0, 1, -1).astype(np.int8)
    else:
        scale = (np.abs(flat).max(1) / (2 ** (bits - 1) - 1)).astype(np.float32)
        view = scale.reshape((-1,) + (1,) * (w.ndim - 1)) if per_channel else scale[0]
        codes = np.clip(np.round(w / view), -(2 ** (bits - 1)), 2 ** (bits - 1) - 1).astype(np.int8)
    if mask is not None and bits > 1:
        codes[~mask] = 0
    return SimpleNamespace(codes=codes, scale=scale, axis=0 if per_channel else None, bits=bits, mask=mask)


def fake_quantized(recipe):
    """(model with weights = dequantize(codes), {PyTorch name: quantized}) for {name: quantize kwargs}."""
    import torch

    model = _net()
    state = model.state_dict()
    quantized = {name: quantize(state[name].numpy(), **kw) for name, kw in recipe.items()}
    for name, q in quantized.items():
        state[name] = torch.from_numpy(rpack.dequantize(q))
    model.load_state_dict(state)
    return model, quantized


META = {"arch": "tinynet", "task": "classification", "classes": [f"c{i}" for i in range(10)], "input_size": [16, 16],
        "normalization": {"mean": [0.5] * 3, "std": [0.25] * 3}}
MIXED = {"0.weight": {"bits": 8, "per_channel": False}, "3.weight": {"bits": 4, "sparsity": 0.5},
         "6.weight": {"bits": 2}, "9.weight": {"bits": 1, "sparsity": 0.3}, "14.weight": {"bits": 3}}


@pytest.fixture(scope="module")
def mixed_export(tmp_path_factory):
    from rsedge.export.onnx_export import export_onnx

    model, quantized = fake_quantized(MIXED)
    out = tmp_path_factory.mktemp("mixed")
    x = np.random.default_rng(0).standard_normal((4, 3, 16, 16)).astype(np.float32)
    export_onnx(model, META, out / "fq.onnx", x, log=lambda m: None)
    return model, quantized, out / "fq.onnx", x


def test_unpacked_onnx_runs_like_the_quantized_pytorch_model(mixed_export, tmp_path):
    import onnx
    import onnxruntime as ort
    import torch

    from rsedge.export.pack import write_pack

    model, quantized, onnx_path, x = mixed_export
    report = write_pack(onnx_path, quantized, tmp_path / "m.rspack", {"name": "tinynet"})
    assert report["quantized_tensors"] == 5 and report["max_weight_error"] < 1e-5
    assert sorted(layer["bits"] for layer in report["layers"]) == [1, 2, 3, 4, 8]
    graph = rpack.unpack_to_onnx(str(tmp_path / "m.rspack"), str(tmp_path / "device"))
    assert sorted(os.listdir(tmp_path / "device")) == ["model.onnx", "weights.bin"]
    proto = onnx.load(graph, load_external_data=False)
    assert all(i.data_location == onnx.TensorProto.EXTERNAL for i in proto.graph.initializer)
    pack = rpack.read_pack(str(tmp_path / "m.rspack"))
    assert pack.model["name"] == "tinynet" and pack.model["classes"] == META["classes"]
    assert pack.model["input_size"] == [16, 16] and pack.model["std"] == [0.25] * 3
    session = ort.InferenceSession(graph, providers=["CPUExecutionProvider"])
    got = np.concatenate([session.run(None, {session.get_inputs()[0].name: x[i:i + 1]})[0] for i in range(len(x))])
    with torch.no_grad():
        want = model(torch.from_numpy(x)).numpy()
    assert np.abs(got - want).max() < 1e-5 and np.abs(want).max() > 0.1


def test_folded_and_renamed_weights_are_found_and_a_foreign_tensor_is_refused(mixed_export, tmp_path):
    import onnx

    from rsedge.export.pack import quantized_for_graph, torch_to_onnx_names, write_pack

    _, quantized, onnx_path, _ = mixed_export
    names = torch_to_onnx_names(onnx.load(str(onnx_path)), quantized)
    assert set(names) == set(quantized) and len(set(names.values())) == 5
    on_grid = quantized_for_graph(onnx.load(str(onnx_path)), quantized)
    folded = on_grid[names["0.weight"]]
    assert folded.axis == 0 and folded.scale.shape == (32,)  # a per-tensor scale, per channel once BN is folded in
    assert np.array_equal(folded.codes, quantized["0.weight"].codes)
    assert on_grid[names["14.weight"]].scale is not None and names["14.weight"] == "14.weight"  # the linear: as is
    stranger = quantize(np.random.default_rng(5).standard_normal((64, 64, 3, 3)), 4)
    with pytest.raises(ValueError, match="stranger"):
        write_pack(onnx_path, {"stranger": stranger}, tmp_path / "x.rspack")


def test_a_4_bit_pack_measures_a_compression_ratio_above_6(tmp_path):
    from rsedge.export.onnx_export import export_onnx
    from rsedge.export.pack import write_pack

    recipe = {n: {"bits": 4} for n in ("0.weight", "3.weight", "6.weight", "9.weight", "14.weight")}
    model, quantized = fake_quantized(recipe)
    x = np.random.default_rng(1).standard_normal((2, 3, 16, 16)).astype(np.float32)
    export_onnx(model, META, tmp_path / "fq.onnx", x, simplifier="none", log=lambda m: None)
    report = write_pack(tmp_path / "fq.onnx", quantized, tmp_path / "m.rspack")
    assert 90_000 < report["params"] < 110_000 and report["quantized_params"] > 0.99 * report["params"]
    assert report["pack_bytes"] == os.path.getsize(tmp_path / "m.rspack")
    assert report["cr_basis"] == "onnx" and report["fp32_bytes"] == report["onnx_fp32_bytes"]
    assert report["cr"] == report["fp32_bytes"] / report["pack_bytes"] and report["cr"] > 6
    assert rpack.describe(rpack.read_pack(str(tmp_path / "m.rspack")))["cr"] == pytest.approx(report["cr"])
    from safetensors.torch import save_file

    from rsedge.export.pack import WritePackOptions

    save_file(model.state_dict(), str(tmp_path / "fp32.safetensors"))
    against = write_pack(tmp_path / "fq.onnx", quantized, tmp_path / "s.rspack",
                         options=WritePackOptions(fp32_reference=tmp_path / "fp32.safetensors"))
    assert against["cr_basis"] == "safetensors"
    assert against["fp32_bytes"] == os.path.getsize(tmp_path / "fp32.safetensors")
    assert rpack.read_pack(str(tmp_path / "s.rspack")).header["fp32_reference"] == "safetensors"


def test_the_device_unpacks_without_torch_or_onnx(mixed_export, tmp_path):
    from rsedge.export.pack import write_pack

    _, quantized, onnx_path, _ = mixed_export
    write_pack(onnx_path, quantized, tmp_path / "m.rspack")
    code = ("import sys\n"
            "from rsedge.runtime.pack import unpack_to_onnx\n"
            f"unpack_to_onnx({str(tmp_path / 'm.rspack')!r}, {str(tmp_path / 'dev')!r})\n"
            "heavy = ('torch', 'onnx', 'onnxruntime', 'google.protobuf', 'rsedge.export', 'rsedge.trainer')\n"
            "print(','.join(sorted(m for m in heavy if m in sys.modules)))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, check=False, cwd=ROOT)
    assert out.returncode == 0, out.stderr.decode()
    assert out.stdout.decode().strip() == ""
    assert (tmp_path / "dev" / "weights.bin").stat().st_size == rpack.read_pack(
        str(tmp_path / "m.rspack")).header["weights"]["length"]
