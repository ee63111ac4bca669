"""Image classification: ROOT/<class>/<image> folders, one logit per class, top-1 accuracy."""
from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..metrics import confusion_matrix, plot_confusion, summarize
from .base import Evaluator, LossFn, Task, stack_dataset


class ClassificationEvaluator(Evaluator):
    """Top-1, per-class accuracy and the confusion matrix (`metrics.summarize`): the one place
    the host computes top-1."""

    def __init__(self, classes: Sequence[str]):
        self.classes = list(classes)
        self.cm = np.zeros((len(self.classes), len(self.classes)), np.int64)

    def update(self, outputs, targets) -> None:
        """`outputs`: logits (N, classes), torch or numpy; `targets`: class indices (N,)."""
        preds = outputs.detach().argmax(1).cpu().numpy() if hasattr(outputs, "detach") else np.argmax(outputs, 1)
        truth = targets.detach().cpu().numpy() if hasattr(targets, "detach") else np.asarray(targets)
        self.cm += confusion_matrix(truth, preds, len(self.classes))

    def result(self) -> dict[str, Any]:
        return summarize(self.cm, self.classes)


def grad_cam_masks(fm, images, labels, batch: int = 32):
    """Grad-CAM of the label, thresholded at its per-image mean (>=, so a 1x1 map is all target).
    `fm` returns (logits, F); Grad-CAM weights make this the classic CAM for a pooling + linear
    head and keep it defined for VGG's MLP head."""
    import torch

    masks = []
    for i in range(0, len(images), batch):
        x = images[i:i + batch]
        y = labels[i:i + batch]
        with torch.enable_grad():
            logits, feat = fm(x)
            grads = torch.autograd.grad(logits.gather(1, y[:, None]).sum(), feat)[0]
        cam = (grads.mean((2, 3), keepdim=True) * feat).sum(1).detach()
        masks.append((cam >= cam.mean((1, 2), keepdim=True)).float())
    return torch.cat(masks)


class ClassificationTask(Task):
    name = "classification"
    primary_metric = "top1"
    higher_is_better = True
    record_keys = ("top1", "samples", "per_class", "skipped_images")

    def eval_dataset(self, root: str | os.PathLike, items: Sequence[Sequence[Any]], meta: dict[str, Any]):
        from ..datasets import ImageListDataset
        from ..transforms import eval_transform

        return ImageListDataset(root, items, eval_transform(meta["input_size"], **meta["normalization"]))

    def train_dataset(self, root: str | os.PathLike, items: Sequence[Sequence[Any]], meta: dict[str, Any]):
        from ..datasets import ImageListDataset
        from ..transforms import train_transform

        return ImageListDataset(root, items, train_transform(meta["input_size"], **meta["normalization"]))

    def loss(self, outputs, targets, inputs):
        import torch.nn.functional as F

        return F.cross_entropy(outputs, targets)

    def training_loss(self, cfg: Any) -> LossFn:
        import torch.nn.functional as F

        smoothing = float(getattr(cfg, "label_smoothing", 0.0) or 0.0)
        if not smoothing:
            return self.loss
        return lambda outputs, targets, inputs: F.cross_entropy(outputs, targets, label_smoothing=smoothing)

    def evaluator(self, meta: dict[str, Any]) -> ClassificationEvaluator:
        return ClassificationEvaluator(meta["classes"])

    def metric_key(self, part: str) -> str:
        return "train_acc" if part == "train" else f"{part}_top1"

    def summary(self, result: dict[str, Any]) -> str:
        width = max(len(c) for c in result["per_class"])
        lines = [f"top-1 accuracy: {result['top1']:.4f} ({result['samples']} images)"]
        for name, acc in result["per_class"].items():
            lines.append(f"  {name:<{width}}  {'n/a' if acc is None else f'{acc:.4f}'}")
        return "\n".join(lines)

    def write_eval_outputs(self, out: Path, result: dict[str, Any], meta: dict[str, Any], title: str) -> None:
        super().write_eval_outputs(out, result, meta, title)
        plot_confusion(np.asarray(result["confusion"]), meta["classes"], Path(out) / "confusion.png", title)

    def target_regions(self, feature_model, images, targets):
        return grad_cam_masks(feature_model, images, targets)

    def bundle_eval(self, root: str | os.PathLike, items: Sequence[Sequence[Any]], meta: dict[str, Any]
                    ) -> dict[str, Any]:
        images, labels = stack_dataset(self.eval_dataset(root, items, meta), meta["input_size"])
        return {"images": images, "targets": {"labels.npy": np.asarray(labels, np.int64)}}
