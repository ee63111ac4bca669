"""Classification on the device: argmax of the logits, top-1 and per-class accuracy."""

import numpy as np

from ..imagefolder import list_labeled_folder
from .base import DeviceTask, eval_file, load_array


class Tally(object):
    """Running top-1 and per-class counts; result() keys: primary, top1, n, correct, per_class."""

    def __init__(self, class_names):
        self.class_names = list(class_names) if class_names is not None else None
        self.correct = {}
        self.total = {}

    def update(self, predicted, labels):
        for p, y in zip(np.asarray(predicted).tolist(), np.asarray(labels).astype(np.int64).reshape(-1).tolist()):
            self.total[y] = self.total.get(y, 0) + 1
            if p == y:
                self.correct[y] = self.correct.get(y, 0) + 1

    add = update

    def result(self):
        n = sum(self.total.values())
        correct = sum(self.correct.values())
        per_class = {}
        for y in sorted(self.total):
            name = self.class_names[y] if self.class_names and 0 <= y < len(self.class_names) else str(y)
            c = self.correct.get(y, 0)
            per_class[name] = {"n": self.total[y], "correct": c, "accuracy": c / float(self.total[y])}
        return {"primary": "top1", "top1": correct / float(n) if n else None, "n": n, "correct": correct,
                "per_class": per_class}


class ClassificationTask(DeviceTask):
    name = "classification"
    outputs = ("logits",)
    targets_name = "labels"

    def decode(self, outputs, metadata):
        logits = np.asarray(self.output(outputs, "logits"))
        return logits.reshape(logits.shape[0], -1).argmax(axis=1)

    def accumulator(self, metadata):
        return Tally(metadata.get("classes"))

    def agreement(self, reference, candidate, metadata):
        a, b = self.decode(reference, metadata), self.decode(candidate, metadata)
        return float(np.mean(a == b)) if a.size else 1.0

    def load_targets(self, bundle_dir, entry, limit=None):
        return np.asarray(load_array(eval_file(bundle_dir, entry, "labels"), limit)).astype(np.int64).reshape(-1)

    def folder_items(self, folder, metadata):
        """folder/<class>/<image>: the model's classes name the folders (folder names, sorted, without them)."""
        items, class_names = list_labeled_folder(folder, metadata.get("classes"))
        meta = dict(metadata, classes=class_names)
        note = None
        if metadata.get("classes") is None:
            note = "the model carries no class names: folder names, sorted, were taken as class ids"
        return items, meta, note

    def summary(self, result):
        if result.get("top1") is None:
            return None
        return "top-1 {:.2f} % on {} images".format(100.0 * result["top1"], result["n"])

    def describe(self, metadata):
        return "{} classes".format(len(metadata.get("classes") or ()))
