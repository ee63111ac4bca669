"""Device tasks: the registry, classification behind DeviceTask, named outputs, and a toy second task."""

import json
import os

import numpy as np
import pytest
import runtime_fakes as H
from runtime_fakes import FAST

from rsedge.runtime import cli, evaluate, tasks
from rsedge.runtime.backends import Outputs
from rsedge.runtime.bundles.manifest import write_manifest
from rsedge.runtime.errors import RuntimeToolError
from rsedge.runtime.tasks.base import DeviceTask, eval_file, load_array


def test_unknown_task_is_one_clear_error_and_classification_is_the_default():
    with pytest.raises(RuntimeToolError, match=r"unknown task 'keypoints': this runtime knows classification"):
        tasks.get_task("keypoints")
    assert tasks.task_for(None).name == tasks.task_for({}).name == "classification"
    assert tasks.task_for({"task": "classification"}) is tasks.get_task("classification")


def test_classification_decodes_scores_and_agrees():
    task = tasks.get_task("classification")
    logits = np.array([[0.1, 2.0, 0.3], [3.0, 0.0, 0.1], [0.0, 0.1, 0.2], [1.0, 0.5, 0.0]], np.float32)
    assert task.decode({"logits": logits}, {}).tolist() == [1, 0, 2, 0]
    assert task.decode({"other": logits.reshape(4, 3, 1, 1)}, {}).tolist() == [1, 0, 2, 0]  # unnamed: the first
    tally = task.accumulator({"classes": ["a", "b", "c"]})
    tally.update(task.decode({"logits": logits}, {}), np.array([1, 0, 1, 1]))
    result = tally.result()
    assert result["primary"] == "top1" and result["top1"] == 0.5 and result["correct"] == 2 and result["n"] == 4
    assert result["per_class"] == {"a": {"n": 1, "correct": 1, "accuracy": 1.0},
                                   "b": {"n": 3, "correct": 1, "accuracy": 1 / 3.0}}
    flipped = logits.copy()
    flipped[3] = [0.0, 0.5, 1.0]
    assert task.agreement({"logits": logits}, {"logits": flipped}, {}) == 0.75
    assert task.summary(result) == "top-1 50.00 % on 4 images"


def test_load_targets_reads_the_files_the_eval_entry_names(tmp_path):
    task = tasks.get_task("classification")
    (tmp_path / "eval").mkdir()
    np.save(str(tmp_path / "eval" / "labels.npy"), np.array([2, 0, 1, 1]))
    np.save(str(tmp_path / "eval" / "classes.npy"), np.array([[1], [1], [0]]))
    assert task.load_targets(str(tmp_path), {"labels": "eval/labels.npy"}, limit=3).tolist() == [2, 0, 1]
    assert task.load_targets(str(tmp_path), {"targets": {"labels": "eval/classes.npy"}}).tolist() == [1, 1, 0]
    with pytest.raises(RuntimeToolError, match="no eval/labels"):
        task.load_targets(str(tmp_path), {"images": "eval/images.npy"})


def test_outputs_answer_by_position_and_by_name():
    a, b = np.zeros((2, 4)), np.ones((2, 3))
    out = Outputs(["features", "logits"], [a, b])
    assert out[0] is a and out[-1] is b and out["logits"] is b and list(out) == [a, b]
    assert out.names == ["features", "logits"] and list(out.as_dict()) == ["features", "logits"]
    assert "logits" in out and "boxes" not in out
    with pytest.raises(KeyError, match="no output named 'boxes'"):
        out["boxes"]
    with pytest.raises(RuntimeToolError):
        Outputs(["one"], [a, b])


def test_onnxruntime_returns_every_output_and_the_task_reads_logits_by_name(tmp_path):
    pytest.importorskip("onnx", reason="builds the test model")
    pytest.importorskip("onnxruntime")
    from rsedge.runtime.backends import open_runner

    path = H.make_classifier_onnx(str(tmp_path / "two.onnx"), features="first", channels=6)
    images = np.random.RandomState(0).standard_normal((10, 3, 16, 16)).astype(np.float32)
    runner = open_runner(path)
    try:
        out = runner.infer(images)
        assert out.names == ["features", "logits"] and out[0].shape == (10, 6) and out["logits"].shape == (10, 3)
        labels = out["logits"].argmax(1)
        assert (out["features"].argmax(1) != labels).any()  # reading the first output would be wrong
        result = evaluate.evaluate_arrays(runner, images, labels, batch=4)
        assert result["top1"] == 1.0 and result["task"] == "classification"
        everything = evaluate.infer_arrays(runner, images, batch=3)
        assert everything.names == out.names and np.allclose(everything["logits"], out["logits"], atol=1e-6)
    finally:
        runner.close()


def test_torch_runner_names_tuple_and_dict_outputs():
    torch = pytest.importorskip("torch", reason="the PyTorch runner is host-only")
    from rsedge.runtime.backends.pytorch import TorchRunner

    class Two(torch.nn.Module):
        def __init__(self, as_dict):
            super().__init__()
            self.as_dict = as_dict

        def forward(self, x):
            pooled = x.mean(dim=(2, 3))
            return {"aux": pooled * 2, "logits": pooled} if self.as_dict else (pooled, pooled * 2)

    x = np.random.RandomState(1).standard_normal((2, 3, 8, 8)).astype(np.float32)
    out = TorchRunner(Two(False), (3, 8, 8), device="cpu").load().infer(x)
    assert out.names == ["logits", "output1"] and np.allclose(out[1], 2 * out[0])
    out = TorchRunner(Two(True), (3, 8, 8), device="cpu", output_names=["logits", "aux"]).load().infer(x)
    assert out.names == ["logits", "aux"] and np.allclose(out["aux"], 2 * out["logits"])


class MeanValue(DeviceTask):
    """A toy regression task in a few lines: the value is the first output's first column."""

    name = "toy-regression"
    outputs = ("value",)

    def decode(self, outputs, metadata):
        return np.asarray(self.output(outputs, "value")).reshape(-1, np.shape(self.output(outputs, "value"))[-1])[:, 0]

    def accumulator(self, metadata):
        errors = []

        class MAE:
            def update(self, predictions, targets):
                errors.extend(np.abs(np.asarray(predictions) - np.asarray(targets)).tolist())

            def result(self):
                return {"primary": "mae", "mae": float(np.mean(errors)) if errors else None, "n": len(errors)}
        return MAE()

    def agreement(self, reference, candidate, metadata):
        return float(np.mean(np.abs(self.decode(reference, metadata) - self.decode(candidate, metadata)) < 0.5))

    def load_targets(self, bundle_dir, entry, limit=None):
        return np.asarray(load_array(eval_file(bundle_dir, entry, "values"), limit), dtype=np.float32)


@pytest.fixture
def toy_task(monkeypatch):
    monkeypatch.setattr(tasks, "_TASKS", dict(tasks._TASKS))
    return tasks.register_task(MeanValue())


def _retask_bundle(directory, task, targets=None):
    """make_bundle's bundle, declared as `task` (ONNX metadata and preprocess.json), its eval targets under
    other file names."""
    import onnx

    manifest = H.make_bundle(str(directory))
    for name in ("model_fp32.onnx", "model_int8_qdq.onnx"):
        model = onnx.load(str(directory / name))
        next(p for p in model.metadata_props if p.key == "rsedge.task").value = task
        onnx.save(model, str(directory / name))
    prep = json.loads((directory / "preprocess.json").read_text())
    (directory / "preprocess.json").write_text(json.dumps(dict(prep, task=task)))
    extra = {k: v for k, v in manifest.items() if k not in ("format", "created", "files")}
    if targets is not None:
        np.save(str(directory / "eval" / "values.npy"), targets)
        os.remove(str(directory / "eval" / "labels.npy"))
        extra["eval"] = {"images": "eval/images.npy", "values": "eval/values.npy"}
    write_manifest(str(directory), extra)
    return directory


def test_a_registered_toy_task_runs_through_rsedge_bench(tmp_path, capsys, toy_task, no_tensorrt):
    pytest.importorskip("onnx", reason="builds the test models")
    pytest.importorskip("onnxruntime")
    values = np.zeros(12, np.float32)
    bundle = _retask_bundle(tmp_path / "bundle", "toy-regression", targets=values)
    assert cli.main([str(bundle), "--json", str(tmp_path / "r.json")] + FAST) == 0, capsys.readouterr().err
    doc = json.loads((tmp_path / "r.json").read_text())
    images = np.load(str(bundle / "eval" / "images.npy"))
    first = H.ort_logits(str(bundle / "model_fp32.onnx"), images)[:, 0]
    fp32, int8 = doc["runs"]
    assert fp32["accuracy"]["primary"] == "mae" and fp32["accuracy"]["task"] == "toy-regression"
    assert fp32["accuracy"]["mae"] == pytest.approx(float(np.mean(np.abs(first))), rel=1e-5)
    assert "check" not in fp32 and int8["check"]["reference"] == "bundle:fp32 (onnx)"
    assert 0.0 <= int8["check"]["agreement"] <= 1.0 and int8["check"]["images"] == 12
    assert "mae " in capsys.readouterr().err
    with pytest.raises(RuntimeToolError, match="toy-regression models are evaluated on a bundle"):
        evaluate.evaluate_folder(str(bundle / "model_fp32.onnx"), str(tmp_path))


def test_a_bundle_of_an_unknown_task_is_one_clear_error(tmp_path, capsys, no_tensorrt):
    pytest.importorskip("onnx", reason="builds the test models")
    bundle = _retask_bundle(tmp_path / "bundle", "keypoints")
    assert cli.main([str(bundle)] + FAST) == 2
    err = capsys.readouterr().err
    assert "error: unknown task 'keypoints'" in err and "Traceback" not in err and len(err.splitlines()) <= 3
