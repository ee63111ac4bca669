"""A second task, registered in a few lines on each side and run through train -> prune -> export
(a bundle) -> `rsedge-bench --eval` with no change to the stage code: a regression head that
predicts each image's brightness (its folder's name, a number), scored by mean absolute error.

Host: a `Task` (its datasets, loss, evaluator and bundle eval set) and a `ModelSpec` (its head
and output name). Device: a `DeviceTask` (decode, accumulator, agreement, targets)."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from rsedge.runtime import tasks as device_tasks
from rsedge.runtime.tasks.base import DeviceTask, eval_file, load_array
from rsedge.trainer.datasets import ImageListDataset
from rsedge.trainer.models import ModelSpec, register_model, unregister_model
from rsedge.trainer.tasks import Evaluator, Task, register_task, stack_dataset, unregister_task
from rsedge.trainer.transforms import eval_transform

LEVELS = ("0.2", "0.5", "0.8")

# -- the host side: a model spec and a task ------------------------------------------------------


class ToyRegressor(nn.Module):
    def __init__(self, num_classes: int, width: int = 16):  # one output whatever the folders
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width)
        self.conv2, self.bn2 = nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width)
        self.head = nn.Linear(width, 1)

    def forward(self, x):
        x = F.relu(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))
        return self.head(x.mean((2, 3)))


class Values(ImageListDataset):
    """(image, the number its folder is named after)."""

    def __init__(self, root, items, transform, classes):
        super().__init__(root, items, transform)
        self.classes = classes

    def __getitem__(self, index):
        image, label = super().__getitem__(index)
        return image, torch.tensor([float(self.classes[label])])


class MAE(Evaluator):
    def __init__(self):
        self.error, self.n = 0.0, 0

    def update(self, outputs, targets):
        self.error += float((outputs.float().cpu() - targets.float().cpu()).abs().sum())
        self.n += len(targets)

    def result(self):
        return {"mae": self.error / max(self.n, 1), "samples": self.n}


class Brightness(Task):
    name, primary_metric, higher_is_better = "brightness", "mae", False

    def eval_dataset(self, root, items, meta):
        return Values(root, items, eval_transform(meta["input_size"], **meta["normalization"]), meta["classes"])

    def loss(self, outputs, targets, inputs):
        return F.mse_loss(outputs, targets)

    def evaluator(self, meta):
        return MAE()

    def bundle_eval(self, root, items, meta):
        images, values = stack_dataset(self.eval_dataset(root, items, meta), meta["input_size"])
        return {"images": images, "targets": {"values.npy": np.concatenate([v.numpy() for v in values])}}


TOY_SPEC = ModelSpec("toy_regressor", "brightness", ToyRegressor, head=("head",), outputs=("value",),
                     input_size=(16, 16), normalization={"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]},
                     args={"width": 16})

# -- the device side: decode, score, agree, read the targets ------------------------------------


class DeviceMAE:
    def __init__(self):
        self.error, self.n = 0.0, 0

    def update(self, predictions, targets):
        self.error += float(np.abs(np.asarray(predictions) - np.asarray(targets)).sum())
        self.n += len(targets)

    def result(self):
        return {"primary": "mae", "mae": self.error / self.n if self.n else None, "n": self.n}


class DeviceBrightness(DeviceTask):
    name, outputs = "brightness", ("value",)

    def decode(self, outputs, metadata):
        return np.asarray(self.output(outputs, "value"), np.float64).reshape(-1)

    def accumulator(self, metadata):
        return DeviceMAE()

    def agreement(self, reference, candidate, metadata):
        a, b = self.decode(reference, metadata), self.decode(candidate, metadata)
        return float(np.mean(np.abs(a - b) <= 0.05)) if a.size else 1.0

    def load_targets(self, bundle_dir, entry, limit=None):
        return np.asarray(load_array(eval_file(bundle_dir, entry, "values"), limit), np.float64).reshape(-1)


@pytest.fixture
def toy_task(monkeypatch):
    monkeypatch.setattr(device_tasks, "_TASKS", dict(device_tasks._TASKS))  # the registration ends with the test
    register_model(TOY_SPEC)
    host = register_task(Brightness())
    device = device_tasks.register_task(DeviceBrightness())
    yield host, device
    unregister_model(TOY_SPEC.name)
    unregister_task(host.name)


@pytest.fixture(scope="module")
def brightness_data(tmp_path_factory):
    from PIL import Image

    root = tmp_path_factory.mktemp("brightness")
    rng = np.random.default_rng(0)
    for level in LEVELS:
        (root / level).mkdir()
        for i in range(12):
            pixels = np.clip(float(level) + rng.normal(0, 0.05, (16, 16, 3)), 0, 1)
            Image.fromarray((pixels * 255).astype(np.uint8)).save(root / level / f"{i}.png")
    return root


def test_a_regression_task_runs_through_every_stage(toy_task, brightness_data, tmp_path):
    import onnx

    from rsedge.compress.prune import prune_run
    from rsedge.export.bundle import bundle_run
    from rsedge.runtime.cli import main as bench
    from rsedge.trainer.modelfile import load_model
    from rsedge.trainer.run import train_run
    from rsedge.trainer.train import TrainConfig

    quiet = {"progress": False, "log": lambda m: None}
    cfg = TrainConfig(epochs=1, batch_size=8, optimizer="adamw", lr=1e-2, workers=0, seed=0, device="cpu")
    record = train_run(brightness_data, "toy_regressor", tmp_path / "train", img_size=16, cfg=cfg, **quiet)
    assert set(record["test"]) == {"mae", "samples", "skipped_images"} and record["test"]["samples"] == 6
    assert [set(h) >= {"train_mae", "val_mae"} for h in record["history"]] == [True]
    assert (tmp_path / "train" / "results.csv").read_text().startswith("epoch,train_loss,train_mae,val_mae,")
    model, meta = load_model(tmp_path / "train" / "model.safetensors")
    assert (meta["task"], meta["model_args"], meta["metrics"]["test_mae"]) == ("brightness", {"width": 16},
                                                                              record["test"]["mae"])

    report = prune_run(tmp_path / "train" / "model.safetensors", tmp_path / "prune", method="taylor", ratio=0.5,
                       data=brightness_data, taylor_batches=2, batch_size=8, workers=0, **quiet)
    pruned, _ = load_model(tmp_path / "prune" / "model.safetensors")
    assert (pruned.conv1.out_channels, pruned.conv2.out_channels) == (8, 8)
    assert pruned.head.out_features == 1 and report["after"]["params"] < report["before"]["params"]

    bundle = tmp_path / "bundle"
    said = []
    bundle_run(tmp_path / "prune" / "model.safetensors", bundle, data=brightness_data, calib_size=8, eval_size=6,
               log=said.append)
    # the INT8 guard counts classification top-1: for another task it says so and guards nothing
    assert any("UNGUARDED" in m for m in said)
    int8 = json.loads((bundle / "export_record.json").read_text())["int8"]
    assert int8["max_drop"] is None and int8["validation_images"] == 0
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["eval"] == {"images": "eval/images.npy", "values": "eval/values.npy", "count": 6, "split": "test"}
    assert json.loads((bundle / "preprocess.json").read_text())["task"] == "brightness"
    graph = onnx.load(str(bundle / "model_fp32.onnx"))
    assert [o.name for o in graph.graph.output] == ["value"]  # the spec's output name, with a dynamic batch
    assert graph.graph.output[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert {p.key: p.value for p in graph.metadata_props}["rsedge.task"] == "brightness"
    values = np.load(bundle / "eval" / "values.npy")
    assert values.dtype == np.float32 and values.tolist() == pytest.approx([0.2, 0.2, 0.5, 0.5, 0.8, 0.8])

    out = tmp_path / "bench.json"
    assert bench(["--eval", str(bundle), "--duration", "0.1", "--iterations", "3", "--warmup", "0.02",
                  "--json", str(out), "--quiet"]) == 0
    fp32 = json.loads(out.read_text())["runs"][0]
    assert fp32["label"] == "bundle:fp32 (onnx)"
    assert fp32["accuracy"]["primary"] == "mae" and fp32["accuracy"]["n"] == 6
    # the device scores the exported graph as the host scored the pruned model
    with torch.no_grad():
        host = float((pruned(torch.from_numpy(np.load(bundle / "eval" / "images.npy"))).reshape(-1)
                      - torch.from_numpy(values)).abs().mean())
    assert fp32["accuracy"]["mae"] == pytest.approx(host, abs=1e-4)
