"""ONNX Runtime backend end to end on CPU, benchmark schema, and evaluation."""

import json

import numpy as np
import pytest
import runtime_fakes as H

from rsedge.runtime import backends, evaluate
from rsedge.runtime.backends.ort import choose_providers
from rsedge.runtime.bench import benchmark, report
from rsedge.runtime.errors import RuntimeToolError

pytest.importorskip("onnx", reason="the onnx package builds the test models (host-only dependency)")
pytest.importorskip("onnxruntime", reason="ONNX Runtime backend tests")


FAST = {"warmup_s": 0.0, "iterations": 5, "duration_s": 0.0, "power": False}


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return H.make_classifier_onnx(str(tmp_path_factory.mktemp("ort") / "model.onnx"))


def test_choose_providers():
    avail = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    chosen, why = choose_providers(avail)
    assert chosen == avail and "TensorrtExecutionProvider is the fastest" in why
    assert choose_providers(["CPUExecutionProvider", "AzureExecutionProvider"])[0] == ["CPUExecutionProvider"]
    assert choose_providers(avail, ["cuda", "cpu"])[0] == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    with pytest.raises(RuntimeToolError, match="not available.*CPUExecutionProvider"):
        choose_providers(["CPUExecutionProvider"], ["cuda"])


def test_select_backend_says_why(tmp_path):
    assert backends.select_backend("m.engine")[0] == "tensorrt"
    assert backends.select_backend("m.plan")[0] == "tensorrt"
    name, why = backends.select_backend("dir/m.onnx")
    assert name == "onnxruntime" and "m.onnx is an ONNX model" in why
    with pytest.raises(RuntimeToolError, match="rsedge build"):
        backends.select_backend("m.onnx", "tensorrt")
    with pytest.raises(RuntimeToolError, match="cannot tell"):
        backends.select_backend("m.pt")
    with pytest.raises(RuntimeToolError, match="does not exist"):
        backends.open_runner(str(tmp_path / "missing.onnx"))


def test_ort_runner_matches_onnx_reference(model):
    from onnx.reference import ReferenceEvaluator

    runner = backends.open_runner(model, threads=1)
    try:
        assert runner.info["backend"] == "onnxruntime" and runner.info["provider"] == "CPUExecutionProvider"
        assert runner.info["precision"] == "fp32" and runner.info["threads"] == 1
        assert "ONNX model" in runner.info["backend_reason"]
        assert runner.metadata["classes"] == list(H.CLASSES) and runner.metadata["input_size"] == [16, 16]
        assert runner.inputs()[0].shape == (-1, 3, 16, 16) and runner.batch_range() == (1, None)
        x = np.random.RandomState(0).standard_normal((5, 3, 16, 16)).astype(np.float32)
        (y,) = runner.infer(x)
        (ref,) = ReferenceEvaluator(model).run(None, {"input": x})
        assert np.allclose(y, ref, atol=1e-4)
        assert np.allclose(runner.infer({"input": x})[0], y)
        with pytest.raises(RuntimeToolError, match="TensorRT engines"):
            runner.prepare(1, cuda_graph=True)
    finally:
        runner.close()


def test_run_benchmark_schema(model):
    doc = benchmark.run_benchmark(model, batch_sizes=(1, 4), threads=1, **FAST)
    assert doc["model"] == model and doc["backend"] == "onnxruntime" and doc["provider"] == "CPUExecutionProvider"
    assert doc["precision"] == "fp32" and doc["backend_reason"]
    assert [r["batch"] for r in doc["results"]] == [1, 4]
    r = doc["results"][1]
    assert set(r["latency_ms"]) == {"mean", "std", "min", "median", "p90", "p95", "p99", "max"}
    assert r["latency_ms"]["min"] <= r["latency_ms"]["median"] <= r["latency_ms"]["p99"] <= r["latency_ms"]["max"]
    assert r["iterations"] == 5 and r["throughput_ips"] > 0 and r["cv"] >= 0
    assert "h2d_ms" not in r  # ONNX Runtime hides its copies
    assert doc["memory"]["peak_rss_mb"] > 0 and doc["memory"]["device_mb"] is None
    assert doc["power"]["available"] is False and doc["power"]["reason"]
    assert doc["conditions"]["threads"] == 1 and "onnxruntime" in doc["conditions"]["versions"]
    json.loads(report.to_json(report.build_document([doc])))  # JSON-serializable, no NaN


def test_fixed_batch_model(tmp_path):
    path = H.make_classifier_onnx(str(tmp_path / "b2.onnx"), batch=2)
    runner = backends.open_runner(path)
    try:
        assert runner.batch_range() == (2, 2)
        with pytest.raises(RuntimeToolError, match="fixed batch"):
            runner.prepare(1)
        images = np.random.RandomState(3).standard_normal((5, 3, 16, 16)).astype(np.float32)
        labels = np.concatenate([H.ort_logits(path, images[i:i + 2]).argmax(1) for i in (0, 2)] +
                                [H.ort_logits(path, np.concatenate([images[4:], images[4:]]))[:1].argmax(1)])
        result = evaluate.evaluate_arrays(runner, images, labels, batch=8)
        assert result["top1"] == 1.0 and result["n"] == 5  # last chunk padded to the fixed batch
    finally:
        runner.close()


def test_evaluate_arrays_top1_and_per_class(model):
    images = np.random.RandomState(5).standard_normal((20, 3, 16, 16)).astype(np.float32)
    predicted = H.ort_logits(model, images).argmax(axis=1)
    labels = predicted.copy()
    labels[:4] = (labels[:4] + 1) % 3
    runner = backends.open_runner(model)
    try:
        result = evaluate.evaluate_arrays(runner, images, labels, batch=6, class_names=list(H.CLASSES))
    finally:
        runner.close()
    assert result["n"] == 20 and result["correct"] == 16 and result["top1"] == pytest.approx(0.8)
    assert sum(c["n"] for c in result["per_class"].values()) == 20
    assert set(result["per_class"]) <= set(H.CLASSES)
    with pytest.raises(RuntimeToolError, match="3 images but 2 labels"):
        evaluate.evaluate_arrays(None, images[:3], labels[:2])


def test_evaluate_folder_with_a_corrupt_image(tmp_path, model):
    Image = pytest.importorskip("PIL.Image", reason="writes PNG test images")
    from rsedge.runtime.preprocess import PreprocessSpec

    rng = np.random.RandomState(7)
    spec = PreprocessSpec((16, 16), H.MEAN, H.STD)
    pictures = [rng.randint(0, 256, size=(20, 24, 3)).astype(np.uint8) for _ in range(6)]
    predicted = H.ort_logits(model, np.stack([spec(p) for p in pictures])).argmax(axis=1)
    for i, (pic, cls) in enumerate(zip(pictures, predicted)):
        folder = tmp_path / "val" / H.CLASSES[cls]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pic).save(str(folder / f"{i}.png"))
    (tmp_path / "val" / H.CLASSES[predicted[0]] / "broken.png").write_bytes(b"\x89PNG not really")
    logs = []
    result = evaluate.evaluate_folder(model, str(tmp_path / "val"), batch=4, log=logs.append)
    assert result["top1"] == 1.0 and result["n"] == 6
    assert result["skipped"] == 1 and result["skipped_files"][0]["file"].endswith("broken.png")
    assert any("skipped 1 unreadable" in m for m in logs)
    assert result["preprocess"]["input_size"] == [16, 16]
    (tmp_path / "val" / "Forest").mkdir()
    with pytest.raises(RuntimeToolError, match="Forest"):
        evaluate.evaluate_folder(model, str(tmp_path / "val"))


def test_torch_runner_is_benchmarked_by_the_same_harness():
    torch = pytest.importorskip("torch", reason="the PyTorch reference runner is host-only")
    from rsedge.runtime.backends.pytorch import TorchRunner

    module = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                                 torch.nn.Linear(4, 3))
    runner = TorchRunner(module, (3, 16, 16), device="cpu").load()
    x = np.zeros((2, 3, 16, 16), np.float32)
    assert runner.infer(x)[0].shape == (2, 3)
    bench = benchmark.benchmark_runner(runner, batch_sizes=(2,), **FAST)
    assert bench["results"][0]["iterations"] == 5
    doc = benchmark.run_benchmark(runner, batch_sizes=(1,), **FAST)
    assert doc["backend"] == "pytorch" and doc["model"] == "pytorch" and doc["results"][0]["batch"] == 1
    assert runner.loaded  # the caller's runner stays open
