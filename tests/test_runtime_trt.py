"""The TensorRT backend and builder against a numpy-backed fake of TensorRT + CUDA.

The real libraries are exercised by test_runtime_gpu.py where a GPU is present; here the code
paths (both APIs, sidecar checks, buffers, batching, CUDA-event timing, calibration, caches)
run everywhere.
"""

import json
import os

import numpy as np
import pytest
import runtime_fakes as H

from rsedge.runtime import evaluate
from rsedge.runtime.backends.trt import TrtRunner
from rsedge.runtime.bench import benchmark
from rsedge.runtime.build import sidecar, trt_build
from rsedge.runtime.errors import RebuildOnDevice, RuntimeToolError

VERSIONS = ["8.2.1.8", "8.6.2.3", "10.3.0.30"]


def write_engine(tmp_path, trt_version, device, name="m-fp16-b8.engine", data=b"fake-engine"):
    engine = tmp_path / name
    engine.write_bytes(data)
    plan = {"precision": "fp16", "requested": "fp16", "int8_from": None, "flags": ["FP16"], "fallback": None}
    onnx = tmp_path / "m.onnx"
    onnx.write_bytes(b"onnx")
    doc = sidecar.make_sidecar(str(engine), trt_version, device, plan, [], [], {"batch": [1, 4, 8]}, 1.0,
                               str(onnx), "ab" * 32, {"input_size": [16, 16], "classes": ["a", "b", "c"]})
    sidecar.write_sidecar(str(engine), doc)
    return str(engine)


@pytest.mark.parametrize("version", VERSIONS)
def test_runner_infers_on_both_apis(tmp_path, monkeypatch, version):
    cuda = H.FakeCuda()
    trt = H.make_fake_trt(version)
    H.install_fake_tensorrt(monkeypatch, trt, cuda)
    engine = write_engine(tmp_path, version, cuda.device_info())
    runner = TrtRunner(engine).load()
    assert runner.batch_range() == (1, 8)
    assert runner.info["precision"] == "fp16" and runner.metadata["classes"] == ["a", "b", "c"]
    assert runner.info["api"] == ("bindings" if version.startswith("8.2") else "named tensors")
    x = np.random.RandomState(0).standard_normal((3, 3, 16, 16)).astype(np.float32)
    (y,) = runner.infer(x)
    assert y.shape == (3, 3) and np.allclose(y, H.fake_logits(x, 3), atol=1e-5)
    big = np.random.RandomState(1).standard_normal((19, 3, 16, 16)).astype(np.float32)
    assert np.allclose(runner.infer(big)[0], H.fake_logits(big, 3), atol=1e-5)  # split into chunks of 8
    executed = [c for c in trt.calls if c[0].startswith("execute")]
    assert executed[0][0] == ("execute_async_v2" if version.startswith("8.2") else "execute_async_v3")
    with pytest.raises(RuntimeToolError, match="outside"):
        runner.prepare(16)
    runner.close()
    assert cuda.closed and cuda.mem == {}


@pytest.mark.parametrize("version", VERSIONS)
def test_runner_names_its_outputs_on_both_apis(tmp_path, monkeypatch, version):
    cuda = H.FakeCuda()
    H.install_fake_tensorrt(monkeypatch, H.make_fake_trt(version), cuda)
    runner = TrtRunner(write_engine(tmp_path, version, cuda.device_info())).load()
    for n in (3, 19):  # one enqueue, and chunks of the profile's max batch joined
        x = np.random.RandomState(n).standard_normal((n, 3, 16, 16)).astype(np.float32)
        out = runner.infer(x)
        assert out.names == ["logits"] and out["logits"] is out[0] and out["logits"].shape == (n, 3)
    runner.close()


@pytest.mark.parametrize("version", ["8.2.1.8", "10.3.0"])
def test_runner_with_a_static_batch_engine(tmp_path, monkeypatch, version):
    cuda = H.FakeCuda()
    trt = H.make_fake_trt(version, input_shape=(2, 3, 16, 16), profile=None)
    H.install_fake_tensorrt(monkeypatch, trt, cuda)
    runner = TrtRunner(write_engine(tmp_path, version, cuda.device_info())).load()
    assert runner.batch_range() == (2, 2)
    x = np.random.RandomState(0).standard_normal((2, 3, 16, 16)).astype(np.float32)
    assert np.allclose(runner.infer(x)[0], H.fake_logits(x, 3), atol=1e-5)
    assert not [c for c in trt.calls if c[0] in ("set_input_shape", "set_binding_shape")]
    images = np.concatenate([x, x[:1]])
    result = evaluate.evaluate_arrays(runner, images, H.fake_logits(images, 3).argmax(1), batch=8)
    assert result["top1"] == 1.0 and result["n"] == 3  # the odd sample padded to the engine's batch
    runner.close()


def test_prepared_run_reports_stage_times_and_cuda_graph(tmp_path, monkeypatch):
    cuda = H.FakeCuda()
    H.install_fake_tensorrt(monkeypatch, H.make_fake_trt("10.3.0"), cuda)
    runner = TrtRunner(write_engine(tmp_path, "10.3.0", cuda.device_info())).load()
    prepared = runner.prepare(4, cuda_graph=True, spin_wait=True)
    assert prepared.run() == (0.5, 0.5, 0.5)
    bench = benchmark.benchmark_runner(runner, batch_sizes=(1, 8), warmup_s=0.0, iterations=5, duration_s=0.0,
                                       power=False)
    r = bench["results"][1]
    assert r["batch"] == 8 and r["iterations"] == 5 and r["compute_ms"]["median"] == 0.5
    assert bench["power"] == {"available": False, "reason": "power sampling switched off (--no-power)"}
    runner.close()


@pytest.mark.parametrize("field,value,words", [
    ("tensorrt_version", "8.5.2.2", "built with TensorRT 8.5.2.2, this device has 8.6.2.3"),
    ("device", {"name": "NVIDIA Tegra X2", "compute_capability": "6.2"}, "compute capability 6.2, this GPU is 8.7"),
    ("device", {"name": "Other Orin", "compute_capability": "8.7"}, "built on a Other Orin"),
])
def test_foreign_engine_is_refused_before_deserialization(tmp_path, monkeypatch, field, value, words):
    cuda = H.FakeCuda()
    trt = H.make_fake_trt("8.6.2.3")
    H.install_fake_tensorrt(monkeypatch, trt, cuda)
    engine = write_engine(tmp_path, "8.6.2.3", cuda.device_info())
    doc = json.loads(open(sidecar.sidecar_path(engine)).read())
    doc[field] = value
    with open(sidecar.sidecar_path(engine), "w") as f:
        json.dump(doc, f)
    with pytest.raises(RebuildOnDevice) as e:
        TrtRunner(engine).load()
    assert words in str(e.value) and "Rebuild on this device" in str(e.value)
    assert "rsedge build m.onnx --precision fp16 --batch 1,4,8" in str(e.value)
    assert ("deserialize",) not in trt.calls


def test_damaged_engine_and_missing_sidecar(tmp_path, monkeypatch):
    cuda = H.FakeCuda()
    trt = H.make_fake_trt("8.6.2.3")
    H.install_fake_tensorrt(monkeypatch, trt, cuda)
    engine = write_engine(tmp_path, "8.6.2.3", cuda.device_info())
    with open(engine, "wb") as f:
        f.write(b"fake-enginX")  # same size, one byte changed
    with pytest.raises(RebuildOnDevice, match="SHA-256"):
        TrtRunner(engine).load()
    with open(engine, "wb") as f:
        f.write(b"fake")
    with pytest.raises(RebuildOnDevice, match="truncated"):
        TrtRunner(engine).load()
    os.unlink(sidecar.sidecar_path(engine))
    warnings = []
    with pytest.raises(RebuildOnDevice, match="could not deserialize"):
        TrtRunner(engine, log=warnings.append).load()
    assert "no sidecar" in warnings[0]
    with open(sidecar.sidecar_path(engine), "w") as f:
        f.write("{ broken")
    with pytest.raises(RebuildOnDevice, match="not valid JSON"):
        TrtRunner(engine).load()


def test_sidecar_reusable():
    device = {"name": "Orin", "compute_capability": "8.7"}
    doc = {"tensorrt_version": "8.6.2", "device": device, "onnx": {"sha256": "aa"},
           "build_options": {"batch": [1, 8, 8]}}
    assert sidecar.mismatches(doc, "8.6.2", device) == []
    assert not sidecar.reusable(None, "x", "8.6.2", device, "aa", {})


@pytest.mark.parametrize("version", VERSIONS)
def test_build_engine_writes_engine_sidecar_and_timing_cache(tmp_path, monkeypatch, version):
    pytest.importorskip("onnx", reason="the onnx package builds the test model")
    cuda = H.FakeCuda()
    trt = H.make_fake_trt(version)
    H.install_fake_tensorrt(monkeypatch, trt, cuda)
    onnx_path = H.make_classifier_onnx(str(tmp_path / "model.onnx"))
    engine = str(tmp_path / "engines" / "model-fp16-b8.engine")
    logs = []
    doc = trt_build.build_engine(onnx_path, engine, precision="fp16", batch="1,4,8", workspace_mb=256, log=logs.append)
    assert open(engine, "rb").read() == b"fake-engine"
    assert doc == json.loads(open(sidecar.sidecar_path(engine)).read())
    assert doc["tensorrt_version"] == version and doc["device"] == {"name": "Fake Orin", "compute_capability": "8.7"}
    assert doc["precision"] == "fp16" and doc["builder_flags"] == ["FP16"]
    assert doc["inputs"] == [{"name": "input", "shape": [-1, 3, 16, 16], "dtype": "float32"}]
    assert doc["outputs"][0]["name"] == "logits"
    assert doc["profile"] == {"input": {"min": [1, 3, 16, 16], "opt": [4, 3, 16, 16], "max": [8, 3, 16, 16]}}
    assert doc["onnx"]["sha256"] == trt_build.sha256_file(onnx_path)
    assert doc["metadata"]["classes"] == list(H.CLASSES) and doc["metadata"]["input_size"] == [16, 16]
    assert doc["build_options"]["batch"] == [1, 4, 8] and doc["build_options"]["workspace_mb"] == 256
    assert ("create_network", 0 if version.startswith("10") else 1) in trt.calls
    if version.startswith("8.2"):
        assert ("max_workspace_size", 256 << 20) in trt.calls
    else:
        assert ("pool", "WORKSPACE", 256 << 20) in trt.calls
    cache = os.path.join(os.path.dirname(engine), doc["build_options"]["timing_cache"])
    assert open(cache, "rb").read() == b"timing-v1"
    trt_build.build_engine(onnx_path, engine, precision="fp16", batch="1,4,8", log=logs.append)
    assert any("reusing timing cache" in m for m in logs)
    assert cuda.closed
    sidecar.check_engine(engine, version, cuda.device_info())  # what was built passes its own check


def test_build_int8_calibration_writes_and_reuses_the_cache(tmp_path, monkeypatch):
    pytest.importorskip("onnx", reason="the onnx package builds the test model")
    cuda = H.FakeCuda()
    trt = H.make_fake_trt("8.6.2.3")
    H.install_fake_tensorrt(monkeypatch, trt, cuda)
    onnx_path = H.make_classifier_onnx(str(tmp_path / "model.onnx"))
    (tmp_path / "calib").mkdir()
    np.save(str(tmp_path / "calib" / "calib_00000.npy"), np.zeros((6, 3, 16, 16), np.float32))
    np.save(str(tmp_path / "calib" / "calib_00001.npy"), np.ones((5, 3, 16, 16), np.float32))
    engine = str(tmp_path / "engines" / "model-int8-b4.engine")
    logs = []
    doc = trt_build.build_engine(onnx_path, engine, precision="int8", int8_from="calib", batch=4, log=logs.append)
    assert trt.calib_batches == 2  # 11 samples in batches of 4; the rest is dropped
    assert doc["builder_flags"] == ["INT8", "FP16"] and doc["int8_from"] == "calib"
    assert doc["build_options"]["calib_batch"] == 4 and doc["build_options"]["calib_samples"] == 8
    assert trt.last_config.calibration_profile.shapes["input"] == ((4, 3, 16, 16),) * 3
    cache = os.path.join(os.path.dirname(engine), doc["build_options"]["calib_cache"])
    assert open(cache, "rb").read() == b"calibration-table"
    trt_build.build_engine(onnx_path, engine, precision="int8", int8_from="calib", batch=4, log=logs.append)
    assert trt.calib_batches == 0 and any("reusing calibration cache" in m for m in logs)


def test_build_falls_back_or_refuses_without_fast_int8(tmp_path, monkeypatch):
    pytest.importorskip("onnx", reason="the onnx package builds the test model")
    cuda = H.FakeCuda({"name": "NVIDIA Tegra X2", "compute_capability": "6.2"})
    H.install_fake_tensorrt(monkeypatch, H.make_fake_trt("8.2.1.8", fast_int8=False), cuda)
    onnx_path = H.make_classifier_onnx(str(tmp_path / "model.onnx"))
    (tmp_path / "calib").mkdir()
    np.save(str(tmp_path / "calib" / "calib_00000.npy"), np.zeros((4, 3, 16, 16), np.float32))
    logs = []
    doc = trt_build.build_engine(onnx_path, str(tmp_path / "e.engine"), precision="int8", int8_from="calib",
                                 log=logs.append)
    assert doc["precision"] == "fp16" and doc["requested_precision"] == "int8" and "no fast INT8" in doc["fallback"]
    assert any("built FP16 instead" in m for m in logs)
    with pytest.raises(RuntimeToolError, match="no fast INT8"):
        trt_build.build_engine(onnx_path, str(tmp_path / "q.engine"), precision="int8", int8_from="qdq", log=None)


def test_parser_errors_name_the_node_on_every_version(tmp_path, monkeypatch):
    pytest.importorskip("onnx", reason="the onnx package builds the test model")
    onnx_path = H.make_classifier_onnx(str(tmp_path / "model.onnx"))
    H.install_fake_tensorrt(monkeypatch, H.make_fake_trt("8.2.1.8", parse_error=(2, "unsupported op")), H.FakeCuda())
    with pytest.raises(RuntimeToolError, match=r"node 2 'pool' \(GlobalAveragePool\): unsupported op"):
        trt_build.build_engine(onnx_path, str(tmp_path / "e.engine"), log=None)
    H.install_fake_tensorrt(monkeypatch, H.make_fake_trt("10.3.0", parse_error=(4, "bad attr", "fc", "Gemm")),
                            H.FakeCuda())
    with pytest.raises(RuntimeToolError, match=r"node 4 'fc' \(Gemm\): bad attr"):
        trt_build.build_engine(onnx_path, str(tmp_path / "e.engine"), log=None)


def test_dla_build_options(tmp_path, monkeypatch):
    pytest.importorskip("onnx", reason="the onnx package builds the test model")
    trt = H.make_fake_trt("8.5.2.2", dla_cores=2)
    H.install_fake_tensorrt(monkeypatch, trt, H.FakeCuda())
    onnx_path = H.make_classifier_onnx(str(tmp_path / "model.onnx"))
    doc = trt_build.build_engine(onnx_path, str(tmp_path / "e.engine"), precision="fp16", dla_core=1, log=None)
    assert trt.last_config.default_device_type == "DLA" and trt.last_config.DLA_core == 1
    assert "GPU_FALLBACK" in trt.last_config.flags and doc["build_options"]["dla_core"] == 1
    with pytest.raises(RuntimeToolError, match="FP16 or INT8"):
        trt_build.build_engine(onnx_path, str(tmp_path / "e.engine"), precision="fp32", dla_core=0, log=None)


def test_calibration_batches_across_files(tmp_path):
    for i, n in enumerate((3, 4, 2)):
        np.save(str(tmp_path / f"calib_{i:05d}.npy"), np.full((n, 1, 2, 2), i, np.float32))
    batches = list(trt_build.iter_calibration_batches(str(tmp_path), 4, (1, 2, 2)))
    assert [b.shape[0] for b in batches] == [4, 4]
    assert batches[0][:, 0, 0, 0].tolist() == [0, 0, 0, 1] and batches[1][:, 0, 0, 0].tolist() == [1, 1, 1, 2]
    assert trt_build.count_calibration_samples(str(tmp_path)) == 9
    with pytest.raises(RuntimeToolError, match="calib_00000.npy holds samples of shape"):
        list(trt_build.iter_calibration_batches(str(tmp_path), 4, (3, 2, 2)))
    with pytest.raises(RuntimeToolError, match="no calib_"):
        trt_build.calibration_files(str(tmp_path / "nothing"))


def test_main_build_cli(tmp_path, monkeypatch, capsys):
    pytest.importorskip("onnx", reason="the onnx package builds the test model")
    H.install_fake_tensorrt(monkeypatch, H.make_fake_trt("8.6.2.3"), H.FakeCuda())
    onnx_path = H.make_classifier_onnx(str(tmp_path / "model.onnx"))
    assert trt_build.main_build([onnx_path, "--precision", "fp16", "--batch", "8", "--timing-cache", "none"]) == 0
    assert os.path.isfile(str(tmp_path / "engines" / "model-fp16-b8.engine"))
    assert os.path.isfile(str(tmp_path / "engines" / "model-fp16-b8.json"))
    assert not [n for n in os.listdir(str(tmp_path / "engines")) if n.startswith("timing")]
    assert trt_build.main_build([onnx_path, "--precision", "int8"]) == 2
    assert "--int8-from" in capsys.readouterr().err


def test_main_build_without_tensorrt(tmp_path, capsys):
    pytest.importorskip("onnx", reason="the onnx package builds the test model")
    try:
        import tensorrt  # noqa: F401
        pytest.skip("TensorRT is installed here; this checks the message where it is not")
    except ImportError:
        pass
    onnx_path = H.make_classifier_onnx(str(tmp_path / "model.onnx"))
    assert trt_build.main_build([onnx_path]) == 2
    assert "TensorRT's Python package is not importable" in capsys.readouterr().err
    (tmp_path / "notes.onnx").write_bytes(b"not a model")
    assert trt_build.main_build([str(tmp_path / "notes.onnx")]) == 2
    assert "not an ONNX model" in capsys.readouterr().err
