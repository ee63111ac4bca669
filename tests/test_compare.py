"""The one comparator, its uses: export parity, and rsedge-bench's check of each bundle variant against FP32."""

import json

import numpy as np
import pytest
import runtime_fakes as H
from runtime_fakes import FAST

from rsedge.runtime import cli
from rsedge.runtime.bundles.check import VariantCheck
from rsedge.runtime.compare import compare, max_abs_diff
from rsedge.runtime.errors import RuntimeToolError
from rsedge.runtime.tasks import get_task

CLS = get_task("classification")


def _logits(seed=0, n=20):
    return np.random.RandomState(seed).standard_normal((n, 5)).astype(np.float32)


def test_tolerance_per_output_and_agreement():
    ref = {"logits": _logits(), "features": np.ones((20, 3), np.float32)}
    cand = {"logits": ref["logits"] + 5e-5, "features": ref["features"] + 0.5}
    result = compare(ref, cand, task=CLS)
    assert result["outputs"]["logits"]["within_tolerance"] is True
    assert result["outputs"]["features"]["within_tolerance"] is False and result["passed"] is False
    assert result["outputs"]["features"]["max_abs_diff"] == pytest.approx(0.5)
    assert result["agreement"] == 1.0
    relaxed = compare(ref, cand, task=CLS, per_output={"features": {"atol": 0.6}})
    assert relaxed["passed"] is True and relaxed["outputs"]["features"]["within_tolerance"] is True
    unbounded = compare(ref, cand, per_output={"features": None})
    assert unbounded["outputs"]["features"]["within_tolerance"] is None and unbounded["passed"] is True
    assert unbounded["agreement"] is None and max_abs_diff(unbounded) == pytest.approx(0.5)
    assert compare(ref, cand, atol=0.0, rtol=1.0)["passed"] is True  # |0.5| <= 1.0 * |1|


def test_agreement_decides_with_min_agreement():
    ref = _logits()
    cand = ref.copy()
    cand[0] = -cand[0]  # one flipped prediction out of 20
    result = compare({"logits": ref}, {"logits": cand}, task=CLS, per_output={"logits": None})
    assert result["agreement"] == pytest.approx(0.95) and result["passed"] is False
    assert compare({"logits": ref}, {"logits": cand}, task=CLS, per_output={"logits": None},
                   min_agreement=0.9)["passed"] is True


def test_outputs_pair_by_name_else_by_position():
    ref = {"logits": _logits(1)}
    assert compare(ref, {"features": np.zeros((20, 2)), "logits": ref["logits"]})["passed"] is True
    assert compare(ref, {"output0": ref["logits"]})["passed"] is True
    with pytest.raises(RuntimeToolError, match="cannot compare outputs"):
        compare({"a": ref["logits"], "b": ref["logits"]}, {"c": ref["logits"]})
    with pytest.raises(RuntimeToolError, match="shapes differ"):
        compare(ref, {"logits": ref["logits"][:3]})


def test_export_parity_keeps_its_record_keys():
    pytest.importorskip("torch", reason="the export package is host-only")
    from rsedge.export.onnx_export import parity

    ref, cand = _logits(2, 64), _logits(3, 64)
    p = parity(ref, cand)
    assert set(p) == {"max_abs_diff", "top1_agreement", "images"} and p["images"] == 64
    assert p["max_abs_diff"] == pytest.approx(float(np.max(np.abs(ref - cand))))
    assert p["top1_agreement"] == pytest.approx(float(np.mean(ref.argmax(1) == cand.argmax(1))))
    assert parity(np.zeros((0, 5)), np.zeros((0, 5))) == {"max_abs_diff": 0.0, "top1_agreement": 1.0, "images": 0}


def test_variant_check_keeps_the_reference_within_its_byte_budget():
    out = {"logits": _logits(4, 10)}
    check = VariantCheck(CLS, {}, max_bytes=out["logits"][:6].nbytes)
    ref = check.observer(True)
    for start in range(0, 10, 3):
        ref(start, {"logits": out["logits"][start:start + 3]})
    assert check.finish(ref, "fp32", "fp32", True) is None and ref.images == 6
    cand = check.observer(False)
    for start in range(0, 10, 4):
        cand(start, {"logits": out["logits"][start:start + 4] + 1e-3})
    entry = check.finish(cand, "fp16", "fp16", False)
    assert entry["images"] == 6 and entry["agreement"] == 1.0 and entry["passed"] is True
    assert entry["outputs"]["logits"]["max_abs_diff"] == pytest.approx(1e-3, rel=1e-3)
    assert entry["tolerance"] == {"atol": 5e-2, "rtol": 5e-2}
    int8 = check.finish(cand, "int8", "int8-qdq", False)
    assert int8["outputs"]["logits"]["within_tolerance"] is None and int8["tolerance"] is None


@pytest.fixture
def no_tensorrt(monkeypatch):
    from rsedge.runtime.backends import trt as backends_trt
    from rsedge.runtime.errors import BackendUnavailable

    def unavailable():
        raise BackendUnavailable("TensorRT's Python package is not importable here (test)")

    monkeypatch.setattr(backends_trt, "import_tensorrt", unavailable)


def test_rsedge_bench_checks_each_variant_against_fp32_onnxruntime(tmp_path, capsys, no_tensorrt):
    pytest.importorskip("onnx", reason="builds the test models")
    pytest.importorskip("onnxruntime")
    bundle = tmp_path / "bundle"
    H.make_bundle(str(bundle))
    assert cli.main([str(bundle), "--json", str(tmp_path / "r.json")] + FAST) == 0
    fp32, int8 = json.loads((tmp_path / "r.json").read_text())["runs"]
    images = np.load(str(bundle / "eval" / "images.npy"))
    expected = compare({"logits": H.ort_logits(str(bundle / "model_fp32.onnx"), images)},
                       {"logits": H.ort_logits(str(bundle / "model_int8_qdq.onnx"), images)}, task=CLS)
    assert "check" not in fp32
    check = int8["check"]
    assert check["reference"] == "bundle:fp32 (onnx)" and check["images"] == 12
    assert check["agreement"] == pytest.approx(expected["agreement"])
    assert check["outputs"]["logits"]["max_abs_diff"] == pytest.approx(
        expected["outputs"]["logits"]["max_abs_diff"], rel=1e-5)
    assert check["passed"] == (check["agreement"] >= 0.95)  # int8: predictions only, not elementwise
    assert "check vs bundle:fp32 (onnx) on 12 images" in capsys.readouterr().err


def test_rsedge_bench_checks_engines_against_the_fp32_engine(tmp_path, capsys, monkeypatch):
    bundle = tmp_path / "bundle"
    H.make_bundle(str(bundle))
    H.install_fake_tensorrt(monkeypatch, H.make_fake_trt("8.6.2.3"), H.FakeCuda())
    assert cli.main([str(bundle), "--json", str(tmp_path / "r.json")] + FAST) == 0
    runs = json.loads((tmp_path / "r.json").read_text())["runs"]
    assert "check" not in runs[0] and runs[0]["label"] == "bundle:fp32/fp32"
    for run in runs[1:]:  # the fake engines compute the same logits at every precision
        assert run["check"]["reference"] == "bundle:fp32/fp32" and run["check"]["agreement"] == 1.0
        assert run["check"]["outputs"]["logits"]["max_abs_diff"] == 0.0 and run["check"]["passed"] is True
    assert cli.main([str(bundle), "--precisions", "fp16", "--json", str(tmp_path / "s.json")] + FAST) == 0
    (only,) = json.loads((tmp_path / "s.json").read_text())["runs"]
    assert only["check"]["skipped"].startswith("no FP32 run of this bundle")
    capsys.readouterr()
