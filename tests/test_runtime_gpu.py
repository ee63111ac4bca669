"""Real TensorRT + CUDA: build, load, run, benchmark. Skipped (with the reason) where they are missing.

Everything here also runs against a fake in test_runtime_trt.py; these tests check the real
libraries agree with what the fake assumes.
"""

import json
import os

import numpy as np
import pytest
import runtime_fakes as H

pytestmark = pytest.mark.gpu


def _gpu_reason():
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return "TensorRT's Python package is not installed"
    try:
        from rsedge.runtime.backends.cuda_api import load_cuda_api

        api = load_cuda_api()
        api.close()
    except Exception as e:  # noqa: BLE001 - any failure means: no usable GPU here
        return f"no usable CUDA device or binding (pycuda / cuda-python): {e}"
    return None


REASON = _gpu_reason()
needs_gpu = pytest.mark.skipif(REASON is not None, reason=REASON or "")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    pytest.importorskip("onnx", reason="the onnx package builds the test model")
    from rsedge.runtime.build.trt_build import build_engine

    d = tmp_path_factory.mktemp("gpu")
    onnx_path = H.make_classifier_onnx(str(d / "model.onnx"))
    engine = str(d / "engines" / "model-fp16-b8.engine")
    doc = build_engine(onnx_path, engine, precision="fp16", batch="1,4,8", workspace_mb=256, log=None)
    return H, onnx_path, engine, doc


@needs_gpu
def test_build_load_infer_matches_onnxruntime(built):
    pytest.importorskip("onnxruntime", reason="compares against ONNX Runtime on CPU")
    from rsedge.runtime.backends.trt import TrtRunner

    H, onnx_path, engine, doc = built
    assert doc["precision"] == "fp16" and doc["profile"]["input"]["max"] == [8, 3, 16, 16]
    x = np.random.RandomState(0).standard_normal((5, 3, 16, 16)).astype(np.float32)
    with TrtRunner(engine) as runner:
        assert runner.batch_range() == (1, 8)
        (y,) = runner.infer(x)
        assert runner.metadata["classes"] == list(H.CLASSES)
    assert np.allclose(y, H.ort_logits(onnx_path, x), atol=5e-2, rtol=5e-2)


@needs_gpu
def test_benchmark_with_cuda_events_graph_and_spin_wait(built):
    from rsedge.runtime.bench import benchmark

    _, _, engine, _ = built
    doc = benchmark.run_benchmark(engine, batch_sizes=(1, 8), warmup_s=0.05, iterations=20, duration_s=0.1,
                                  power=False)
    r = doc["results"][1]
    assert doc["backend"] == "tensorrt" and r["compute_ms"]["median"] > 0 and r["h2d_ms"]["median"] > 0
    assert doc["memory"]["device_mb"] is not None
    doc = benchmark.run_benchmark(engine, batch_sizes=(4,), warmup_s=0.05, iterations=20, duration_s=0.1,
                                  cuda_graph=True, spin_wait=True, power=False)
    assert doc["results"][0]["iterations"] >= 20


@needs_gpu
def test_engine_from_another_tensorrt_is_refused(built, tmp_path):
    import shutil

    from rsedge.runtime.backends.trt import TrtRunner
    from rsedge.runtime.build import sidecar
    from rsedge.runtime.errors import RebuildOnDevice

    _, _, engine, _ = built
    copy = str(tmp_path / "copy.engine")
    shutil.copy(engine, copy)
    doc = json.load(open(sidecar.sidecar_path(engine)))
    doc["tensorrt_version"] = "7.1.3"
    doc["engine"] = "copy.engine"
    with open(sidecar.sidecar_path(copy), "w") as f:
        json.dump(doc, f)
    with pytest.raises(RebuildOnDevice, match="Rebuild on this device"):
        TrtRunner(copy).load()
    os.unlink(sidecar.sidecar_path(copy))
    with open(copy, "wb") as f:
        f.write(b"\0" * 1024)
    with pytest.raises(RebuildOnDevice, match="could not deserialize"):
        TrtRunner(copy).load()


@needs_gpu
def test_int8_from_qdq_where_the_gpu_has_fast_int8(tmp_path):
    pytest.importorskip("onnx", reason="the onnx package builds the test model")
    from rsedge.runtime.build.trt_build import build_engine, probe_device
    from rsedge.runtime.errors import RuntimeToolError

    onnx_path = H.make_classifier_onnx(str(tmp_path / "qdq.onnx"), qdq=True)
    caps = probe_device()
    if not caps["fast_int8"]:
        with pytest.raises(RuntimeToolError, match="no fast INT8"):
            build_engine(onnx_path, str(tmp_path / "q.engine"), precision="int8", int8_from="qdq", log=None)
        return
    doc = build_engine(onnx_path, str(tmp_path / "q.engine"), precision="int8", int8_from="qdq", batch=4, log=None)
    assert doc["precision"] == "int8" and "INT8" in doc["builder_flags"]
