"""ONNX of an MSB fixed-point model: int8 weight initializers behind DequantizeLinear, after the
simplifier (which must not fold them back), a quarter of the bytes, the same outputs."""
import json
import warnings

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from torch import nn

from rsedge.compress.msb_fixed import MsbOptions, msb_quantize_model, quantization_meta, quantized_weights
from rsedge.export.msb_onnx import int8_weight_onnx, match, rewrite_initializers
from rsedge.export.onnx_export import run_onnx
from rsedge.export.run import export_run
from rsedge.trainer.modelfile import derive_meta, load_model, save_model
from rsedge.trainer.models import create_model

META = {"arch": "resnet18", "classes": ["a", "b", "c"], "input_size": [32, 32],
        "normalization": {"mean": [0.5] * 3, "std": [0.25] * 3}}


def _ort(path, x):
    return run_onnx(path, x)  # the runtime's ONNX Runtime runner, one image at a time for a static batch


@pytest.fixture(scope="module")
def msb_file(tmp_path_factory):
    """An 8-bit msb-fixed resnet18 (most parameters in convolutions) with BatchNorms that fold with
    negative and positive factors."""
    torch.manual_seed(0)
    model = create_model("resnet18", 3).eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(-1.0, 1.0)
            m.bias.data.uniform_(-0.2, 0.2)
    root = tmp_path_factory.mktemp("msb")
    _, record = msb_quantize_model(model)
    path = save_model(root / "q.safetensors", model, derive_meta(META, "quantize",
                                                                quantization=quantization_meta(record)))
    return path, record


@pytest.mark.parametrize("simplifier", ["onnxslim", "onnxsim"])
def test_export_writes_int8_weights_behind_dequantize_linear(msb_file, tmp_path, simplifier):
    path, record = msb_file
    rec = export_run(path, tmp_path / "q", simplifier=simplifier, log=lambda m: None)
    onnx_path = tmp_path / "q" / "model.onnx"
    proto = onnx.load(str(onnx_path))
    g = proto.graph
    dq = {n.output[0]: n for n in g.node if n.op_type == "DequantizeLinear"}
    inits = {i.name: i for i in g.initializer}
    assert len(dq) == len(record["layers"]) == 22 and rec["onnx"]["weights"]["int8_initializers"] == 22
    for n in g.node:  # every convolution and the classifier read their weights from a DequantizeLinear
        if n.op_type in ("Conv", "Gemm"):
            assert n.input[1] in dq, n.name
    for node in dq.values():
        q, scale, zero = (inits[name] for name in node.input)
        assert q.data_type == onnx.TensorProto.INT8 and zero.data_type == onnx.TensorProto.INT8
        assert (numpy_helper.to_array(scale) > 0).all() and not numpy_helper.to_array(zero).any()
    assert all(i.data_type != onnx.TensorProto.FLOAT or np.prod(i.dims) < 600 for i in g.initializer)
    ratio = onnx_path.stat().st_size / rec["onnx"]["weights"]["float_file_bytes"]  # the graph before the rewrite
    assert 0.25 <= ratio <= 0.3 and rec["onnx"]["weights"]["size_vs_float"] == ratio
    x = np.random.default_rng(0).standard_normal((4, 3, 32, 32)).astype(np.float32)
    model, _ = load_model(path)
    with torch.no_grad():
        expected = model(torch.from_numpy(x)).numpy()
    assert np.abs(_ort(onnx_path, x) - expected).max() < 1e-4
    assert rec["onnx"]["parity"]["max_abs_diff"] < 1e-4
    assert rec["onnx"]["graph"]["weight_bytes"] < 0.26 * 4 * rec["onnx"]["graph"]["params"]
    props = {p.key: p.value for p in proto.metadata_props}
    assert props["rsedge.precision"] == "fp32"  # activations and arithmetic stay float
    info = json.loads(props["rsedge.weight_quantization"])
    assert info["scheme"] == "msb-fixed" and info["bits"] == 8 and "not an INT8 engine" in info["activations"]
    assert {o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")} == {13}


class Plain(nn.Module):
    """No BatchNorm: nothing for the exporter to fold, so every scale is the power of two 2^-f."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        return self.fc(torch.relu(self.conv2(torch.relu(self.conv1(x)))).mean((2, 3)))


def _export(model, path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.zeros(1, 3, 8, 8),), str(path), dynamo=False, opset_version=13,
                          input_names=["input"], output_names=["logits"], do_constant_folding=True)
    return onnx.load(str(path))


def test_unfolded_tensors_get_per_tensor_power_of_two_scales_and_exact_values(tmp_path):
    torch.manual_seed(0)
    model = Plain().eval()
    _, record = msb_quantize_model(model)
    proto = _export(model, tmp_path / "plain.onnx")
    info = rewrite_initializers(proto, quantized_weights(model, quantization_meta(record)))
    assert info == {"int8_initializers": 6, "per_tensor": 6, "per_channel": 0}
    onnx.checker.check_model(proto)
    inits = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    fracs = set()
    for n in proto.graph.node:
        if n.op_type == "DequantizeLinear":
            q, scale = inits[n.input[0]], inits[n.input[1]]
            assert q.dtype == np.int8 and scale.shape == () and np.log2(scale) == np.round(np.log2(scale))
            fracs.add(int(-np.log2(scale)))
    assert fracs <= {v["frac_bits"] for v in record["layers"].values()}
    onnx.save(proto, str(tmp_path / "q.onnx"))
    x = np.random.default_rng(1).standard_normal((2, 3, 8, 8)).astype(np.float32)
    with torch.no_grad():
        assert np.abs(_ort(tmp_path / "q.onnx", x) - model(torch.from_numpy(x)).numpy()).max() < 1e-5


def test_a_folded_negative_batchnorm_keeps_the_integers_with_a_flipped_sign():
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 3, 3, bias=False)
    _, record = msb_quantize_model(conv)
    q = quantized_weights(conv, quantization_meta(record)).tensors["weight"]
    factor = np.array([0.7, -1.3, 0.0], np.float32)  # what the exporter folds: gamma / sqrt(var + eps)
    folded = conv.weight.detach().numpy() * factor[:, None, None, None]
    ints, scale, axis = match(folded, q)
    assert axis == 0 and (scale > 0).all() and ints.dtype == np.int8
    assert np.array_equal(ints[0], q.ints.numpy()[0]) and np.array_equal(ints[1], -q.ints.numpy()[1])
    assert not ints[2].any()
    assert np.allclose(ints * scale[:, None, None, None], folded, rtol=0, atol=1e-6 * np.abs(folded).max())
    assert match(np.random.default_rng(0).standard_normal(folded.shape).astype(np.float32), q) is None


def test_a_float_model_is_left_alone_and_wide_words_stay_float(tmp_path):
    model = Plain().eval()
    path = tmp_path / "m.onnx"
    _export(model, path)
    before = path.read_bytes()
    assert int8_weight_onnx(path, model, {"arch": "resnet18"}, np.zeros((1, 3, 8, 8), np.float32)) == {}
    _, record = msb_quantize_model(model, options=MsbOptions(bits=12))
    logged = []
    out = int8_weight_onnx(path, model, {"quantization": quantization_meta(record)},
                           np.zeros((1, 3, 8, 8), np.float32), log=logged.append)
    assert out["weights"]["int8_initializers"] == 0 and "bits above 8" in out["weights"]["reason"]
    assert "12-bit weights stay float" in logged[0] and path.read_bytes() == before
