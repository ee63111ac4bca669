"""rsedge-bench on a bundle runs the INT8 variant made for the backend it has."""
import json
import os

import pytest
import runtime_fakes as H

from rsedge.runtime import cli
from rsedge.runtime.bundles.bundle import Bundle, plan_engines, variants_for
from rsedge.runtime.bundles.manifest import write_manifest

pytest.importorskip("onnx", reason="the onnx package builds the test models (host-only dependency)")
pytest.importorskip("onnxruntime", reason="rsedge-bench runs ONNX files with ONNX Runtime here")

from runtime_fakes import FAST


def make_targeted_bundle(directory):
    """The runtime helpers' bundle plus a CPU INT8 variant, each INT8 variant with its target."""
    manifest = H.make_bundle(str(directory))
    H.make_classifier_onnx(str(directory / "model_int8_cpu.onnx"), qdq=True)
    extra = {k: v for k, v in manifest.items() if k not in ("format", "created", "files")}
    extra["variants"] = [{"name": "fp32", "onnx": "model_fp32.onnx", "precision": "fp32"},
                         {"name": "int8-qdq", "onnx": "model_int8_qdq.onnx", "precision": "int8", "target": "tensorrt"},
                         {"name": "int8-cpu", "onnx": "model_int8_cpu.onnx", "precision": "int8",
                          "target": "onnxruntime"}]
    write_manifest(str(directory), extra)
    return directory


def test_variants_for_each_backend(tmp_path):
    bundle = Bundle.open(str(make_targeted_bundle(tmp_path / "b")))
    ort, ort_skipped = variants_for(bundle, "onnxruntime")
    trt, trt_skipped = variants_for(bundle, "tensorrt")
    assert [v["name"] for v in ort] == ["fp32", "int8-cpu"] and [v["name"] for v, _ in ort_skipped] == ["int8-qdq"]
    assert [v["name"] for v in trt] == ["fp32", "int8-qdq"] and "made for onnxruntime" in trt_skipped[0][1]
    orin = {"fast_fp16": True, "fast_int8": True, "calibrators": True, "tensorrt_version": "8.6.2"}
    assert {p["variant"] for p in plan_engines(bundle, orin, (1, 8, 8))} == {"fp32", "int8-qdq"}


def test_onnxruntime_runs_fp32_and_the_cpu_variant(tmp_path, capsys, no_tensorrt):
    bundle = make_targeted_bundle(tmp_path / "bundle")
    assert cli.main([str(bundle), "--json", str(tmp_path / "r.json")] + FAST) == 0
    err = capsys.readouterr().err
    assert "int8-qdq: not run here: made for tensorrt, not onnxruntime" in err
    doc = json.loads((tmp_path / "r.json").read_text())
    assert [r["label"] for r in doc["runs"]] == ["bundle:fp32 (onnx)", "bundle:int8-cpu (onnx)"]
    assert os.path.basename(doc["runs"][1]["model"]) == "model_int8_cpu.onnx"


def test_tensorrt_builds_from_fp32_and_the_tensorrt_variant_only(tmp_path, capsys, monkeypatch):
    bundle = make_targeted_bundle(tmp_path / "bundle")
    H.install_fake_tensorrt(monkeypatch, H.make_fake_trt("8.6.2.3"), H.FakeCuda())
    assert cli.main([str(bundle), "--precisions", "fp16,int8", "--json", str(tmp_path / "r.json")] + FAST) == 0
    assert "int8-cpu: not run here: made for onnxruntime, not tensorrt" in capsys.readouterr().err
    doc = json.loads((tmp_path / "r.json").read_text())
    assert [r["label"] for r in doc["runs"]] == ["bundle:fp32/fp16", "bundle:fp32/int8", "bundle:int8-qdq/int8"]
