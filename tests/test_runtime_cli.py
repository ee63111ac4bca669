"""rsedge-bench end to end on CPU: single models, several models, bundles, and clear errors."""

import importlib.util
import json
import os

import pytest

from rsedge.runtime import cli
from rsedge.runtime.bundle import Bundle, engine_name, ensure_engines, plan_engines

pytest.importorskip("onnx", reason="the onnx package builds the test models (host-only dependency)")
pytest.importorskip("onnxruntime", reason="rsedge-bench runs ONNX files with ONNX Runtime here")


def load_helpers():
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "test_runtime_helpers.py")
    spec = importlib.util.spec_from_file_location("rsedge_runtime_test_helpers", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


H = load_helpers()
FAST = ["--warmup", "0", "--iterations", "3", "--duration", "0", "--no-power"]


@pytest.fixture
def no_tensorrt(monkeypatch):
    """Behave as on a machine without TensorRT, even if one is installed."""
    from rsedge.runtime import backends_trt
    from rsedge.runtime.errors import BackendUnavailable

    def unavailable():
        raise BackendUnavailable("TensorRT's Python package is not importable here (test)")

    monkeypatch.setattr(backends_trt, "import_tensorrt", unavailable)


def test_help_explains_options_with_defaults(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    text = capsys.readouterr().out
    for words in ("--warmup", "(default: 0.2)", "--iterations", "(default: 10)", "--duration", "(default: 3.0)",
                  "--cuda-graph", "--eval", "--json", "examples:"):
        assert words in text


def test_two_models_one_table_and_files(tmp_path, capsys):
    a = H.make_classifier_onnx(str(tmp_path / "a.onnx"), channels=4)
    b = H.make_classifier_onnx(str(tmp_path / "b.onnx"), channels=2)
    out = tmp_path / "out"
    rc = cli.main([a, b, "--batch", "1,2", "--threads", "1", "--json", str(out / "r.json"), "--csv",
                   str(out / "r.csv"), "--md", str(out / "r.md")] + FAST)
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    lines = captured.out.strip().splitlines()
    assert len(lines) == 2 + 4 and "speed-up" in lines[0] and "1.00x" in lines[2]
    assert "onnxruntime" in captured.err and "is an ONNX model" in captured.err  # says what it picked and why
    doc = json.loads((out / "r.json").read_text())
    assert doc["schema"] == "rsedge-bench/1" and len(doc["runs"]) == 2 and len(doc["comparison"]) == 4
    assert doc["command"][0] == "rsedge-bench" and doc["runs"][1]["results"][1]["batch"] == 2
    assert (out / "r.csv").read_text().startswith("label,model,backend")
    assert "# rsedge-bench results" in (out / "r.md").read_text()


def test_eval_folder_needs_a_folder_for_single_models(tmp_path, capsys):
    a = H.make_classifier_onnx(str(tmp_path / "a.onnx"))
    assert cli.main([a, "--eval"] + FAST) == 2
    assert "--eval without a folder needs a bundle" in capsys.readouterr().err


def test_clear_errors(tmp_path, capsys):
    assert cli.main([str(tmp_path / "missing.onnx")] + FAST) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "plain").mkdir()
    assert cli.main([str(tmp_path / "plain")] + FAST) == 2
    assert "not an rsedge bundle" in capsys.readouterr().err
    a = H.make_classifier_onnx(str(tmp_path / "a.onnx"))
    assert cli.main([a, "--backend", "tensorrt"] + FAST) == 2
    assert "rsedge build" in capsys.readouterr().err


def test_bundle_without_tensorrt_runs_the_onnx_variants(tmp_path, capsys, no_tensorrt):
    bundle = tmp_path / "bundle"
    H.make_bundle(str(bundle))
    rc = cli.main([str(bundle), "--eval", "--json", str(tmp_path / "b.json")] + FAST)
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "files verified" in captured.err and "with ONNX Runtime instead" in captured.err
    doc = json.loads((tmp_path / "b.json").read_text())
    labels = [r["label"] for r in doc["runs"]]
    assert labels == ["bundle:fp32 (onnx)", "bundle:int8-qdq (onnx)"]
    assert doc["runs"][0]["accuracy"]["top1"] == 1.0 and doc["runs"][0]["accuracy"]["n"] == 12
    assert doc["runs"][1]["precision"] == "int8-qdq" and doc["runs"][1]["accuracy"]["n"] == 12


def test_tampered_bundle_is_refused_naming_the_file(tmp_path, capsys):
    bundle = tmp_path / "bundle"
    H.make_bundle(str(bundle))
    path = bundle / "model_int8_qdq.onnx"
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF
    path.write_bytes(bytes(data))
    assert cli.main([str(bundle)] + FAST) == 2
    err = capsys.readouterr().err
    assert "model_int8_qdq.onnx" in err and "failed verification" in err


def test_bundle_with_fake_tensorrt_builds_then_reuses_engines(tmp_path, capsys, monkeypatch):
    bundle = tmp_path / "bundle"
    H.make_bundle(str(bundle))
    cuda = H.FakeCuda()
    trt = H.make_fake_trt("8.6.2.3")
    H.install_fake_tensorrt(monkeypatch, trt, cuda)
    rc = cli.main([str(bundle), "--batch", "1,4", "--eval", "--json", str(tmp_path / "r.json")] + FAST)
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    doc = json.loads((tmp_path / "r.json").read_text())
    assert [r["label"] for r in doc["runs"]] == ["bundle:fp32/fp32", "bundle:fp32/fp16", "bundle:fp32/int8",
                                                 "bundle:int8-qdq/int8"]
    assert all(r["backend"] == "tensorrt" for r in doc["runs"])
    assert doc["runs"][2]["precision"] == "int8" and "compute_ms" in doc["runs"][0]["results"][0]
    assert doc["runs"][0]["accuracy"]["n"] == 12
    engines = sorted(os.listdir(str(bundle / "engines")))
    assert "fp32-fp16-b4.engine" in engines and "fp32-fp16-b4.json" in engines
    assert any(n.startswith("calib-model_fp32") for n in engines) and any(n.startswith("timing-") for n in engines)
    rc = cli.main([str(bundle), "--batch", "1,4"] + FAST)
    assert rc == 0 and captured.err.count(": building engines") == 4 and "reusing engines/fp32-fp16-b4.engine" in \
        capsys.readouterr().err


def test_plan_engines_per_board(tmp_path):
    H.make_bundle(str(tmp_path / "b"))
    bundle = Bundle.open(str(tmp_path / "b"))
    orin = {"fast_fp16": True, "fast_int8": True, "calibrators": True, "tensorrt_version": "8.6.2"}
    plan = plan_engines(bundle, orin, (1, 8, 8))
    assert [(p["variant"], p["precision"], p["int8_from"], p["skip"]) for p in plan] == [
        ("fp32", "fp32", None, None), ("fp32", "fp16", None, None), ("fp32", "int8", "calib", None),
        ("int8-qdq", "int8", "qdq", None)]
    assert plan[1]["engine"].endswith(os.path.join("engines", engine_name("fp32", "fp16", 8)))
    tx2 = dict(orin, fast_int8=False)
    skipped = [p for p in plan_engines(bundle, tx2, (1, 8, 8)) if p["skip"]]
    assert len(skipped) == 2 and all("no fast INT8" in p["skip"] for p in skipped)
    trt11 = dict(orin, calibrators=False, tensorrt_version="11.0")
    assert "no INT8 calibrators" in plan_engines(bundle, trt11, (1, 8, 8))[2]["skip"]
    only = plan_engines(bundle, orin, (1, 8, 8), precisions=["fp16"])
    assert [p["precision"] for p in only] == ["fp16"]


def test_ensure_engines_rebuilds_for_another_tensorrt(tmp_path):
    H.make_bundle(str(tmp_path / "b"))
    bundle = Bundle.open(str(tmp_path / "b"))
    device = {"name": "Orin", "compute_capability": "8.7"}
    caps = {"fast_fp16": True, "fast_int8": True, "calibrators": True, "tensorrt_version": "8.6.2",
            "device": device}
    built = []

    def fake_build(onnx, engine, **kw):
        from rsedge.runtime import sidecar

        built.append((os.path.basename(onnx), kw["precision"], kw["int8_from"]))
        os.makedirs(os.path.dirname(engine), exist_ok=True)
        with open(engine, "wb") as f:
            f.write(b"engine")
        plan = {"precision": kw["precision"], "requested": kw["precision"], "int8_from": kw["int8_from"],
                "flags": [], "fallback": None}
        sidecar.write_sidecar(engine, sidecar.make_sidecar(
            engine, caps["tensorrt_version"], device, plan, [], [], {"batch": list(kw["batch"])}, 0.1, onnx,
            sidecar.sha256_file(onnx), kw["metadata"]))

    plan = ensure_engines(bundle, caps, (1, 8, 8), precisions=["fp16", "int8"], build=fake_build)
    assert [p["status"] for p in plan] == ["built", "built", "built"]
    assert built[1] == ("model_fp32.onnx", "int8", "calib")
    assert ensure_engines(bundle, caps, (1, 8, 8), precisions=["fp16", "int8"], build=fake_build)[0]["status"] == \
        "reused"
    caps["tensorrt_version"] = "10.3.0"
    plan = ensure_engines(bundle, caps, (1, 8, 8), precisions=["fp16"], build=fake_build)
    assert plan[0]["status"] == "built" and "built elsewhere" in plan[0]["reason"]
    plan = ensure_engines(bundle, caps, (1, 4, 4), precisions=["fp16"], build=fake_build)
    assert plan[0]["engine"].endswith("fp32-fp16-b4.engine") and plan[0]["status"] == "built"
