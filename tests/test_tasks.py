"""The host task seam: the registry, classification's loss / evaluator / tables exactly as the
stages computed them before, and the stages and criteria reading the task instead of assuming
classification."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tiny_models import Tiny

from rsedge.trainer.metrics import confusion_matrix, summarize
from rsedge.trainer.tasks import ClassificationTask, get_task, register_task, task_for, unregister_task


def _meta(arch="resnet18", **extra):
    return {"arch": arch, "classes": ["a", "b", "c", "d"], "input_size": [16, 16],
            "normalization": {"mean": [0.5, 0.4, 0.3], "std": [0.2, 0.2, 0.2]}, **extra}


class Counting(ClassificationTask):
    """A task that is classification in all but its name, and counts its loss calls."""

    name = "counting"

    def __init__(self):
        self.calls = 0

    def loss(self, outputs, targets, inputs):
        self.calls += 1
        return super().loss(outputs, targets, inputs)


@pytest.fixture
def counting():
    task = register_task(Counting())
    yield task
    unregister_task("counting")


def test_registry_and_the_task_of_a_model_file(counting):
    assert isinstance(get_task("classification"), ClassificationTask)
    with pytest.raises(KeyError, match="unknown task 'keypoints'; known: classification, counting, detection, "
                                       "segmentation"):
        get_task("keypoints")
    with pytest.raises(ValueError, match="already registered"):
        register_task(Counting())
    assert task_for(_meta(task="counting")) is counting
    assert task_for(_meta()).name == "classification"  # a file written before `task` was stored
    assert task_for({"classes": ["a", "b"]}).name == "classification"


def test_classification_evaluator_is_top1_per_class_and_confusion():
    g = torch.Generator().manual_seed(0)
    logits, labels = torch.randn(50, 4, generator=g), torch.randint(0, 4, (50,), generator=g)
    ev = get_task("classification").evaluator(_meta())
    ev.update(logits[:20], labels[:20])
    ev.update(logits[20:].numpy(), labels[20:].numpy())  # numpy outputs (the device's) read the same
    result = ev.result()
    assert result == summarize(confusion_matrix(labels.numpy(), logits.argmax(1).numpy(), 4), _meta()["classes"])
    assert result["top1"] == pytest.approx(float((logits.argmax(1) == labels).float().mean()))
    assert result["samples"] == 50


def test_classification_loss_is_cross_entropy_with_the_configured_smoothing():
    from rsedge.trainer.train import TrainConfig

    task = get_task("classification")
    z, y = torch.randn(8, 4), torch.randint(0, 4, (8,))
    assert torch.equal(task.loss(z, y, None), F.cross_entropy(z, y))
    assert torch.equal(task.training_loss(TrainConfig())(z, y, None), F.cross_entropy(z, y))
    smooth = task.training_loss(TrainConfig(label_smoothing=0.1))(z, y, None)
    assert torch.equal(smooth, torch.nn.CrossEntropyLoss(label_smoothing=0.1)(z, y))


def test_one_metadata_table_whose_task_is_the_models(counting):
    from rsedge.export.onnx_export import metadata_props, preprocess_spec
    from rsedge.runtime.preprocess import normalize_metadata

    spec = preprocess_spec(_meta())
    assert spec == {"task": "classification", "classes": ["a", "b", "c", "d"], "input_size": [16, 16],
                    "mean": [0.5, 0.4, 0.3], "std": [0.2, 0.2, 0.2], "layout": "NCHW", "color": "RGB",
                    "resize": "resize"}
    props = metadata_props(_meta(), precision="fp16")
    assert list(props) == ["rsedge." + k for k in (*spec, "version", "precision", "arch")]
    assert props["rsedge.classes"] == '["a", "b", "c", "d"]' and props["rsedge.precision"] == "fp16"
    assert {k: v for k, v in normalize_metadata(props).items() if k in spec} == spec
    assert metadata_props(_meta(task="counting"))["rsedge.task"] == "counting"
    assert preprocess_spec(_meta(task="counting"))["task"] == "counting"


def test_export_names_and_dynamic_axes_come_from_the_task():
    task = get_task("classification")
    assert task.export_outputs(_meta()) == ["logits"]
    assert task.dynamic_axes(_meta(), True) == {"input": {0: "batch"}, "logits": {0: "batch"}}
    assert task.dynamic_axes(_meta(), False) == {}
    assert task.head(_meta("vgg16_bn")) == ("classifier.6",)


def test_bundle_eval_set_is_the_preprocessed_images_and_their_labels(synth_data):
    from rsedge.trainer.datasets import scan_image_folder

    classes, samples = scan_image_folder(synth_data)
    meta = {**_meta(), "classes": classes}
    items = samples[::25]
    task = get_task("classification")
    payload = task.bundle_eval(synth_data, items, meta)
    assert payload["images"].shape == (len(items), 3, 16, 16) and payload["images"].dtype == np.float32
    labels = payload["targets"]["labels.npy"]
    assert labels.dtype == np.int64 and labels.tolist() == [label for _, label in items]
    x0, _ = task.eval_dataset(synth_data, items[:1], meta)[0]
    assert np.array_equal(payload["images"][0], x0.numpy())


def _batches(n=3, classes=4):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(6, 3, 8, 8, generator=g), torch.randint(0, classes, (6,), generator=g)) for _ in range(n)]


def test_taylor_differentiates_the_task_loss():
    from rsedge.compress.taylor import taylor_scores

    torch.manual_seed(0)
    m = Tiny().eval()
    batches = _batches()

    def energy(outputs, targets, inputs):  # any scalar the task trains: here not cross-entropy
        return (outputs ** 2).mean()

    scores = taylor_scores(m, batches, loss=energy)
    direct = 0
    for x, _ in batches:
        g = torch.autograd.grad(energy(m(x), None, x), m.conv2.weight)[0]
        direct = direct + (g * m.conv2.weight).detach().flatten(1).mean(1).abs()
    assert torch.allclose(scores[m.conv2], direct / len(batches), rtol=1e-4, atol=1e-9)
    assert not torch.allclose(scores[m.conv2], taylor_scores(m, batches)[m.conv2])


def test_cap_probes_learn_from_the_task_loss(counting):
    from rsedge.compress.cap import CapOptions, channel_attention

    torch.manual_seed(0)
    m = Tiny().eval()
    batches = _batches(4)
    _, info = channel_attention(m, [m.bn1, m.bn2], batches, [(batches[0][0],)], CapOptions(epochs=2),
                                loss=counting.loss)
    assert counting.calls == 8 and info["final_loss"] is not None


def test_fit_trains_on_the_task_loss_and_scores_with_its_evaluator(tmp_path, counting):
    from rsedge.trainer.models import ModelSpec, register_model, unregister_model
    from rsedge.trainer.train import TrainConfig, fit

    register_model(ModelSpec("tiny_counter", "counting", lambda n: Tiny(), head=("fc",)))
    try:
        g = torch.Generator().manual_seed(0)
        data = [(torch.randn(3, 8, 8, generator=g), int(i % 4)) for i in range(16)]
        meta = {**_meta("tiny_counter", task="counting"), "input_size": [8, 8]}
        cfg = TrainConfig(epochs=1, batch_size=8, workers=0, device="cpu", amp=False)
        _, history = fit(Tiny(), data, data[:8], cfg, tmp_path, meta, progress=False, log=lambda m: None)
    finally:
        unregister_model("tiny_counter")
    assert counting.calls == 2  # two batches of eight
    (entry,) = history
    assert set(entry) >= {"train_loss", "train_acc", "val_top1"} and 0 <= entry["val_top1"] <= 1
    header = (tmp_path / "results.csv").read_text().splitlines()[0]
    assert header == "epoch,train_loss,train_acc,val_top1,lr,seconds"
