"""Top-1 accuracy on the device: on a labeled image folder, or on a bundle's evaluation tensors.

The point is to check that what runs on the board (an FP16 or INT8 engine, our numpy
preprocessing) still classifies as the host said it would, so the same functions serve every
backend. Corrupt images are reported by name and skipped, never fatal.
"""

import os

import numpy as np

from .backends import open_runner
from .errors import RuntimeToolError
from .preprocess import PreprocessSpec, list_labeled_folder, load_image


def batch_plan(runner, batch):
    """(chunk size, pad to) for a runner: fixed-batch models need every chunk padded to their batch."""
    low, high = runner.batch_range()
    if high is not None and low == high:
        return high, high
    size = batch if high is None else min(batch, high)
    return max(size, low), None


def _predict(runner, x, pad_to):
    n = x.shape[0]
    if pad_to is not None and n < pad_to:
        x = np.concatenate([x, np.zeros((pad_to - n,) + x.shape[1:], dtype=x.dtype)])
    logits = np.asarray(runner.infer(x)[0])
    return logits[:n].reshape(n, -1)


class Tally:
    """Running top-1 and per-class counts."""

    def __init__(self, class_names):
        self.class_names = list(class_names) if class_names is not None else None
        self.correct = {}
        self.total = {}

    def add(self, predicted, labels):
        for p, y in zip(np.asarray(predicted).tolist(), np.asarray(labels).tolist()):
            self.total[y] = self.total.get(y, 0) + 1
            if p == y:
                self.correct[y] = self.correct.get(y, 0) + 1

    def result(self):
        n = sum(self.total.values())
        correct = sum(self.correct.values())
        per_class = {}
        for y in sorted(self.total):
            name = self.class_names[y] if self.class_names and 0 <= y < len(self.class_names) else str(y)
            c = self.correct.get(y, 0)
            per_class[name] = {"n": self.total[y], "correct": c, "accuracy": c / float(self.total[y])}
        return {"top1": correct / float(n) if n else None, "n": n, "correct": correct, "per_class": per_class}


def evaluate_arrays(runner, images, labels, batch=32, class_names=None, log=None):
    """Top-1 and per-class accuracy of `runner` on preprocessed images (N, C, H, W) and int labels (N,)."""
    log = log or (lambda msg: None)
    images = np.asarray(images)
    labels = np.asarray(labels).astype(np.int64).reshape(-1)
    if images.shape[0] != labels.shape[0]:
        raise RuntimeToolError(f"{images.shape[0]} images but {labels.shape[0]} labels")
    dtype = runner.inputs()[0].dtype
    size, pad_to = batch_plan(runner, batch)
    tally = Tally(class_names)
    for start in range(0, images.shape[0], size):
        x = np.ascontiguousarray(images[start:start + size], dtype=dtype)
        tally.add(_predict(runner, x, pad_to).argmax(axis=1), labels[start:start + size])
        done = min(start + size, images.shape[0])
        if (start // size) % 20 == 0 or done == images.shape[0]:
            log(f"  evaluated {done}/{images.shape[0]}")
    return tally.result()


def evaluate_folder_with(runner, folder, batch=32, limit=None, log=None):
    """evaluate_folder for an already loaded runner."""
    log = log or (lambda msg: None)
    meta = runner.metadata
    classes = meta.get("classes")
    items, class_names = list_labeled_folder(folder, classes)
    if limit:
        items = items[:int(limit)]
    spec = PreprocessSpec.from_metadata(meta, runner.inputs()[0].shape, log=log)
    size, pad_to = batch_plan(runner, batch)
    dtype = runner.inputs()[0].dtype
    tally = Tally(class_names)
    skipped = []
    h, w = spec.input_size
    log(f"evaluating {len(items)} images from {folder} ({len(class_names)} classes, input {h}x{w})")
    for start in range(0, len(items), size):
        xs, ys = [], []
        for path, label in items[start:start + size]:
            try:
                xs.append(spec(load_image(path)))
                ys.append(label)
            except RuntimeToolError:
                raise
            except Exception as e:  # noqa: BLE001 - image decoders raise many types; a bad file is skipped
                skipped.append({"file": path, "error": str(e)})
        if xs:
            x = np.ascontiguousarray(np.stack(xs), dtype=dtype)
            tally.add(_predict(runner, x, pad_to).argmax(axis=1), ys)
        done = min(start + size, len(items))
        if (start // size) % 20 == 0 or done == len(items):
            log(f"  evaluated {done}/{len(items)}")
    result = tally.result()
    result["skipped"] = len(skipped)
    result["skipped_files"] = skipped[:20]
    result["preprocess"] = spec.to_dict()
    if skipped:
        log("warning: skipped {} unreadable image(s), e.g. {}".format(len(skipped), skipped[0]["file"]))
    if classes is None:
        result["note"] = "the model carries no class names: folder names, sorted, were taken as class ids"
    return result


def evaluate_folder(model_path, folder, backend="auto", batch=32, providers=None, threads=None, limit=None,
                    log=None):
    """Top-1 and per-class accuracy of a model file on folder/<class>/<image>, preprocessing from its metadata."""
    runner = open_runner(model_path, backend=backend, providers=providers, threads=threads, log=log)
    try:
        return evaluate_folder_with(runner, folder, batch=batch, limit=limit, log=log)
    finally:
        runner.close()


def load_eval_arrays(bundle_dir, manifest, limit=None):
    """The bundle's own evaluation set: eval/images.npy (N,C,H,W float32) and eval/labels.npy (N,)."""
    entry = manifest.get("eval") or {}
    if not entry.get("images") or not entry.get("labels"):
        raise RuntimeToolError(f"bundle {bundle_dir} has no evaluation set in its manifest")
    images = np.load(os.path.join(bundle_dir, entry["images"]), mmap_mode="r", allow_pickle=False)
    labels = np.load(os.path.join(bundle_dir, entry["labels"]), allow_pickle=False)
    if limit:
        images, labels = images[:int(limit)], labels[:int(limit)]
    return images, labels
