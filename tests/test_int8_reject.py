"""An INT8 file the guard cannot accept is not shipped: not written by export, absent from the
bundle, and both say why."""
import json

import numpy as np
import onnx
import pytest
import torch

from rsedge.export.bundle import bundle_run
from rsedge.export.run import export_run
from rsedge.trainer.modelfile import load_model, save_model


@pytest.fixture(scope="module")
def outlier_model(tmp_path_factory, trained):
    """The trained ResNet18 with one stem channel 10^4 times larger: it rides the residual stream, so
    one int8 scale per tensor rounds every other channel to zero. The FP32 model still works."""
    model, meta = load_model(trained)
    with torch.no_grad():
        model.bn1.weight[0] *= 1e4
        model.bn1.bias[0] *= 1e4
        for m in model.modules():
            if isinstance(m, torch.nn.Conv2d) and m.in_channels == 64:
                m.weight[:, 0] /= 1e4
    return save_model(tmp_path_factory.mktemp("outlier") / "model.safetensors", model, meta)


@pytest.fixture
def no_float_fallback(monkeypatch):
    """The guard may not put nodes back in float: only the plain quantization is tried."""
    monkeypatch.setattr("rsedge.export.int8_guard.node_sensitivity", lambda *a, **k: [])


def test_rejected_int8_is_not_written_and_says_why(tmp_path, outlier_model, synth_data, no_float_fallback):
    messages = []
    out = tmp_path / "ex"
    record = export_run(outlier_model, out, int8=True, calib_data=synth_data, calib_size=32, max_drop=0.0,
                        simplifier="none", log=messages.append)
    for key, name in (("int8", "model_int8.onnx"), ("int8_cpu", "model_int8_cpu.onnx")):
        rec = record[key]
        assert rec["images_lost"] > 0, "the outlier must really break int8 for this test to mean anything"
        assert rec["status"] == "rejected" and rec["file"] is None and not rec["within_budget"]
        assert "no attempt met --max-drop 0.0" in rec["reason"] and "graph" not in rec
        assert not (out / name).exists()
        assert any(m.startswith("warning:") and "REJECTED" in m and name in m for m in messages)
        for k in ("fp32_top1", "int8_top1", "drop_points", "max_drop", "kept_in_float", "attempts"):
            assert k in rec
    on_disk = json.loads((out / "record.json").read_text())
    assert on_disk["int8"]["status"] == "rejected" and on_disk["int8"]["reason"] == record["int8"]["reason"]
    assert sorted(p.name for p in out.iterdir()) == ["calib", "model.onnx", "record.json"]


def test_bundle_carries_no_rejected_variant_and_its_manifest_says_why(tmp_path, outlier_model, synth_data,
                                                                      no_float_fallback):
    out = tmp_path / "bundle"
    bundle_run(outlier_model, out, data=synth_data, calib_size=32, eval_size=12, max_drop=0.0,
               log=lambda m: None)
    manifest = json.loads((out / "manifest.json").read_text())
    assert [v["name"] for v in manifest["variants"]] == ["fp32"]
    assert [(r["name"], r["target"]) for r in manifest["rejected_variants"]] == [
        ("int8-qdq", "tensorrt"), ("int8-cpu", "onnxruntime")]
    assert all("no attempt met" in r["reason"] for r in manifest["rejected_variants"])
    assert not any(f.startswith("model_int8") for f in manifest["files"])
    assert manifest["export"]["int8_guard"]["int8-qdq"]["status"] == "rejected"
    props = {p.key: p.value for p in onnx.load(str(out / "model_fp32.onnx")).metadata_props}
    assert props["rsedge.precision"] == "fp32"
    assert np.load(out / "eval" / "labels.npy").shape == (12,)
