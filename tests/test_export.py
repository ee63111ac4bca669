import json

import numpy as np
import onnx
import pytest

from rsedge.compress.counting import count_macs
from rsedge.export.onnx_export import run_onnx
from rsedge.export.onnx_graph import graph_stats
from rsedge.export.run import export_run, stratified_sample
from rsedge.trainer.modelfile import load_model


@pytest.fixture(scope="module")
def exported(tmp_path_factory, trained, synth_data):
    out = tmp_path_factory.mktemp("export")
    record = export_run(trained, out, int8=True, calib_data=synth_data, calib_size=48, log=lambda m: None)
    return out, record


def test_fp32_parity_on_real_images(exported):
    _, record = exported
    p = record["onnx"]["parity"]
    assert p["images"] > 0 and p["max_abs_diff"] <= 1e-4 and p["top1_agreement"] == 1.0
    assert "real images" in record["onnx"]["parity_images"]
    assert record["onnx"]["simplify"]["applied"] is True


def test_metadata_lets_the_device_preprocess_and_label(exported, trained):
    out, _ = exported
    _, meta = load_model(trained)
    props = {p.key: p.value for p in onnx.load(str(out / "model.onnx")).metadata_props}
    assert json.loads(props["rsedge.classes"]) == meta["classes"]
    assert json.loads(props["rsedge.input_size"]) == [32, 32]
    assert json.loads(props["rsedge.mean"]) == pytest.approx(meta["normalization"]["mean"])
    assert props["rsedge.precision"] == "fp32" and props["rsedge.task"] == "classification"
    q = {p.key: p.value for p in onnx.load(str(out / "model_int8.onnx")).metadata_props}
    assert q["rsedge.precision"] == "int8-qdq" and q["rsedge.classes"] == props["rsedge.classes"]
    assert q["rsedge.target"] == "tensorrt" and q["rsedge.int8_nodes"] == "21/21"
    assert q["rsedge.int8_fraction"] == "1.0000"
    c = {p.key: p.value for p in onnx.load(str(out / "model_int8_cpu.onnx")).metadata_props}
    assert c["rsedge.precision"] == "int8-qdq-u8s8" and c["rsedge.target"] == "onnxruntime"
    assert c["rsedge.int8_nodes"] == "21/21" and c["rsedge.classes"] == props["rsedge.classes"]


def test_opset_13_and_static_batch_by_default(exported):
    out, _ = exported
    m = onnx.load(str(out / "model.onnx"))
    assert max(o.version for o in m.opset_import if o.domain in ("", "ai.onnx")) == 13
    assert m.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 1


def test_int8_is_qdq_small_and_agrees(exported):
    out, record = exported
    q = onnx.load(str(out / "model_int8.onnx"))
    ops = {n.op_type for n in q.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    int8_weights = [i for i in q.graph.initializer if i.data_type == onnx.TensorProto.INT8 and len(i.dims) == 4]
    assert int8_weights, "conv weights must be stored as int8"
    zero_points = [i for i in q.graph.initializer if "zero_point" in i.name]
    assert zero_points and all(not onnx.numpy_helper.to_array(z).any() for z in zero_points)  # symmetric
    assert record["int8"]["size_vs_fp32"] < 0.35
    assert record["int8"]["agreement_with_fp32"]["top1_agreement"] >= 0.9
    calib = sorted((out / "calib").glob("calib_*.npy"))
    arrays = [np.load(f) for f in calib]
    assert sum(len(a) for a in arrays) == 48 and arrays[0].dtype == np.float32 and arrays[0].shape[1:] == (3, 32, 32)


def test_graph_counts_match_pytorch(exported, trained):
    out, record = exported
    model, meta = load_model(trained)
    stats = graph_stats(out / "model.onnx")
    assert stats["macs"] == count_macs(model, meta["input_size"])
    conv_linear = sum(p.numel() for n, p in model.named_parameters() if "bn" not in n and "downsample.1" not in n)
    bn_folded_biases = sum(m.num_features for m in model.modules() if m.__class__.__name__ == "BatchNorm2d")
    assert stats["params"] == conv_linear + bn_folded_biases  # BN folded into conv weight + a new bias
    assert graph_stats(out / "model_int8.onnx")["params"] == stats["params"]


def test_dynamic_batch_export(tmp_path, trained):
    rec = export_run(trained, tmp_path, dynamic_batch=True, simplifier="none", log=lambda m: None)
    m = onnx.load(str(tmp_path / "model.onnx"))
    assert m.graph.input[0].type.tensor_type.shape.dim[0].dim_param
    x = np.random.default_rng(0).standard_normal((5, 3, 32, 32)).astype(np.float32)
    assert run_onnx(tmp_path / "model.onnx", x, batch=5).shape == (5, 6)
    assert rec["onnx"]["simplify"]["applied"] is False


def test_stratified_sample_keeps_every_class():
    items = [(f"a{i}", 0) for i in range(90)] + [(f"b{i}", 1) for i in range(10)]
    picked = stratified_sample(items, 20, seed=0)
    labels = [lab for _, lab in picked]
    assert len(picked) == 20 and labels.count(1) == 2 and labels.count(0) == 18
    assert stratified_sample(items, 20, seed=0) == picked


@pytest.mark.parametrize("in_hw", [(1, 1), (2, 2), (3, 5), (7, 7), (9, 4)])
def test_fixed_adaptive_pool_equals_pytorch(in_hw):
    import torch

    from rsedge.export.onnx_export import FixedAdaptiveAvgPool

    x = torch.randn(2, 4, *in_hw)
    ref = torch.nn.AdaptiveAvgPool2d((7, 7))(x)
    assert torch.allclose(FixedAdaptiveAvgPool(in_hw, (7, 7))(x), ref, atol=1e-6)


def test_vgg_pool_on_a_small_map_exports_at_opset_13(tmp_path):
    """VGG's 7x7 adaptive pool sees a 1x1 map at 32 px: ONNX has no op for it."""
    import torch

    from rsedge.export.onnx_export import exportable

    class Head(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.features = torch.nn.Conv2d(3, 4, 3, stride=32, padding=1)
            self.avgpool = torch.nn.AdaptiveAvgPool2d((7, 7))
            self.fc = torch.nn.Linear(4 * 49, 3)

        def forward(self, x):
            return self.fc(torch.flatten(self.avgpool(self.features(x)), 1))

    from rsedge.export.onnx_export import export_onnx

    model = Head().eval()
    _, replaced = exportable(model, torch.zeros(1, 3, 32, 32))
    assert replaced == ["avgpool"] and isinstance(model.avgpool, torch.nn.AdaptiveAvgPool2d)  # the original stays
    meta = {"arch": "x", "classes": ["a", "b", "c"], "input_size": [32, 32],
            "normalization": {"mean": [0.0] * 3, "std": [1.0] * 3}}
    x = np.random.default_rng(0).standard_normal((3, 3, 32, 32)).astype(np.float32)
    info = export_onnx(model, meta, tmp_path / "m.onnx", x, log=lambda m: None)
    assert info["exporter"] == "torchscript" and info["parity"]["max_abs_diff"] < 1e-5


def test_cpu_variant_has_uint8_activations_and_runs(exported):
    out, record = exported
    cpu = record["int8_cpu"]
    assert cpu["status"] == "written" and cpu["file"] == "model_int8_cpu.onnx" and cpu["target"] == "onnxruntime"
    assert cpu["activation_types"] == ["uint8"] and record["int8"]["activation_types"] == ["int8"]
    assert cpu["quantized_nodes"] == cpu["quantizable_nodes"] == 21 and cpu["quantized_fraction"] == 1.0
    q = onnx.load(str(out / "model_int8_cpu.onnx"))
    inits = {i.name: i for i in q.graph.initializer}
    act_zero_points = [inits[n.input[2]] for n in q.graph.node
                       if n.op_type == "QuantizeLinear" and n.input[0] not in inits and n.input[2] in inits]
    assert act_zero_points and all(z.data_type == onnx.TensorProto.UINT8 for z in act_zero_points)
    weights = [i for i in q.graph.initializer if i.data_type == onnx.TensorProto.INT8 and len(i.dims) == 4]
    assert weights and all(np.abs(onnx.numpy_helper.to_array(w)).max() <= 64 for w in weights)  # 7-bit range
    assert cpu["agreement_with_fp32"]["top1_agreement"] >= 0.9 and cpu["size_vs_fp32"] < 0.35
    x = np.load(out / "calib" / "calib_00000.npy")[:4]
    assert run_onnx(out / "model_int8_cpu.onnx", x).shape == (4, 6)


def test_export_refuses_an_old_export_and_exist_ok_removes_its_stale_files(exported, tmp_path, trained):
    import shutil

    out = tmp_path / "again"
    shutil.copytree(exported[0], out)
    (out / "calib" / "calib_00099.npy").write_bytes(b"old")
    with pytest.raises(FileExistsError, match="already holds an export .*--exist-ok"):
        export_run(trained, out, simplifier="none", log=lambda m: None)
    assert (out / "model_int8.onnx").is_file(), "a refused export touches nothing"
    record = export_run(trained, out, simplifier="none", exist_ok=True, log=lambda m: None)
    assert "int8" not in record and not record["parameters"]["int8"]
    assert sorted(p.name for p in out.iterdir()) == ["model.onnx", "record.json"]


def test_cli_export_into_an_old_export_is_one_line(exported, tmp_path, trained, capsys):
    import shutil

    from rsedge.cli.main import main

    out = tmp_path / "old"
    shutil.copytree(exported[0], out)
    assert main(["export", "--model", str(trained), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "already holds an export" in err and "--exist-ok" in err
    assert main(["export", "--model", str(trained), "--out", str(out), "--exist-ok", "--simplifier", "none"]) == 0
    assert not (out / "model_int8.onnx").exists() and not (out / "calib").exists()
