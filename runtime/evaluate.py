"""Evaluation on the device: on an image folder, or on a bundle's evaluation tensors.

The point is to check that what runs on the board (an FP16 or INT8 engine, our numpy
preprocessing) still predicts as the host said it would, so the same loop serves every backend
and every task: the runner's outputs go to the model's task (tasks/, chosen by its
`rsedge.task` metadata), which decodes them and scores them against the targets. Corrupt
images are reported by name and skipped, never fatal.
"""

import collections

import numpy as np

from .backends import Outputs, open_runner
from .errors import RuntimeToolError
from .preprocess import PreprocessSpec, load_image
from .tasks import DEFAULT_TASK, get_task, task_for
from .tasks.base import DeviceTask, EvalOptions


def batch_plan(runner, batch):
    """(chunk size, pad to) for a runner: fixed-batch models need every chunk padded to their batch."""
    low, high = runner.batch_range()
    if high is not None and low == high:
        return high, high
    size = batch if high is None else min(batch, high)
    return max(size, low), None


def run_chunk(runner, x, pad_to=None):
    """Every output of one chunk, {name: array} in output order, without the padding rows."""
    n = x.shape[0]
    if pad_to is not None and n < pad_to:
        x = np.concatenate([x, np.zeros((pad_to - n,) + x.shape[1:], dtype=x.dtype)])
    out = runner.infer(x)
    named = out.as_dict() if isinstance(out, Outputs) else collections.OrderedDict(
        ("output{}".format(i), a) for i, a in enumerate(out))
    return collections.OrderedDict((name, np.asarray(a)[:n]) for name, a in named.items())


def iter_outputs(runner, images, batch=32, log=None):
    """(start, stop, {name: array}) for consecutive chunks of preprocessed images (N, C, H, W)."""
    log = log or (lambda msg: None)
    dtype = runner.inputs()[0].dtype
    size, pad_to = batch_plan(runner, batch)
    total = images.shape[0]
    for start in range(0, total, size):
        x = np.ascontiguousarray(images[start:start + size], dtype=dtype)
        yield start, start + x.shape[0], run_chunk(runner, x, pad_to)
        _progress(log, start, size, total)


def infer_arrays(runner, images, batch=32):
    """Every output of `runner` over all `images`, concatenated: Outputs (by position and by name)."""
    images = np.asarray(images)
    chunks = [outputs for _, _, outputs in iter_outputs(runner, images, batch)]
    if not chunks:
        return Outputs([s.name for s in runner.outputs()], [np.zeros((0,), np.float32) for _ in runner.outputs()])
    names = list(chunks[0])
    return Outputs(names, [np.concatenate([c[name] for c in chunks]) for name in names])


def _progress(log, start, size, total):
    done = min(start + size, total)
    if (start // size) % 20 == 0 or done == total:
        log("  evaluated {}/{}".format(done, total))


def _task_metadata(runner, class_names=None):
    meta = dict(getattr(runner, "metadata", None) or {})
    if class_names is not None:
        meta["classes"] = list(class_names)
    return meta


class RunnerLoop(object):
    """A runner as a task's evaluate() sees it: its metadata (class names overridden when given), its
    input, fixed-size chunks of a preprocessed array, and inference of any number of samples in
    chunks of the runner's batch plan (padded for fixed-batch models)."""

    def __init__(self, runner, batch=32, class_names=None, log=None):
        self.runner = runner
        self.batch = int(batch)
        self.log = log or (lambda msg: None)
        self.metadata = _task_metadata(runner, class_names)
        self.input = runner.inputs()[0]
        self.size, self.pad_to = batch_plan(runner, self.batch)

    def chunks(self, images):
        return iter_outputs(self.runner, images, self.batch, self.log)

    def infer(self, x):
        """{name: array} of every output for x (N, ...), N of any size."""
        x = np.asarray(x)
        parts = [run_chunk(self.runner, np.ascontiguousarray(x[i:i + self.size], dtype=self.input.dtype),
                           self.pad_to) for i in range(0, x.shape[0], self.size)]
        if len(parts) == 1:
            return parts[0]
        return collections.OrderedDict((name, np.concatenate([p[name] for p in parts])) for name in parts[0])


def evaluate_arrays(runner, images, targets, batch=32, class_names=None, log=None, task=None, observe=None):
    """The task's metrics (classification: top-1 and per-class accuracy) of `runner` on preprocessed
    images (N, C, H, W) and their targets (one per image; class ids for classification, (H, W)
    masks for segmentation patches of the model's input size).

    task: a DeviceTask (default: the one the runner's metadata names); observe(start, outputs) sees
    every chunk's outputs, which is how rsedge-bench compares variants without a second pass."""
    task = task or task_for(_task_metadata(runner, class_names))
    images = np.asarray(images)
    if images.shape[0] != len(targets):
        raise RuntimeToolError("{} images but {} {}".format(images.shape[0], len(targets), task.targets_name))
    loop = RunnerLoop(runner, batch, class_names, log)
    return DeviceTask.evaluate(task, loop, images, targets, EvalOptions(batch, class_names, log, observe))


def evaluate_eval_set(runner, images, targets, task=None, options=None):
    """The task's metrics of `runner` on an evaluation set as the task's load_eval returned it (a
    bundle's eval/): the task runs its own loop (segmentation: sliding windows over whole images);
    options: EvalOptions (batch, class names, log, observe, save_predictions)."""
    options = options or EvalOptions()
    loop = RunnerLoop(runner, options.batch, options.class_names, options.log)
    task = task or task_for(loop.metadata)
    return task.evaluate(loop, images, targets, options)


def _load_chunk(spec, items, skipped):
    xs, ys = [], []
    for path, target in items:
        try:
            xs.append(spec(load_image(path)))
            ys.append(target)
        except RuntimeToolError:
            raise
        except Exception as e:  # noqa: BLE001 - image decoders raise many types; a bad file is skipped
            skipped.append({"file": path, "error": str(e)})
    return xs, ys


def evaluate_folder_with(runner, folder, batch=32, limit=None, log=None, task=None):
    """evaluate_folder for an already loaded runner."""
    log = log or (lambda msg: None)
    task = task or task_for(runner.metadata)
    items, meta, note = task.folder_items(folder, _task_metadata(runner))
    if limit:
        items = items[:int(limit)]
    spec = PreprocessSpec.from_metadata(meta, runner.inputs()[0].shape, log=log)
    size, pad_to = batch_plan(runner, batch)
    dtype = runner.inputs()[0].dtype
    accumulator = task.accumulator(meta)
    skipped = []
    h, w = spec.input_size
    log("evaluating {} images from {} ({}, input {}x{})".format(len(items), folder, task.describe(meta), h, w))
    for start in range(0, len(items), size):
        xs, ys = _load_chunk(spec, items[start:start + size], skipped)
        if xs:
            outputs = run_chunk(runner, np.ascontiguousarray(np.stack(xs), dtype=dtype), pad_to)
            accumulator.update(task.decode(outputs, meta), ys)
        _progress(log, start, size, len(items))
    result = dict(accumulator.result(), task=task.name)
    result["skipped"] = len(skipped)
    result["skipped_files"] = skipped[:20]
    result["preprocess"] = spec.to_dict()
    if skipped:
        log("warning: skipped {} unreadable image(s), e.g. {}".format(len(skipped), skipped[0]["file"]))
    if note:
        result["note"] = note
    return result


def evaluate_folder(model_path, folder, backend="auto", batch=32, providers=None, threads=None, limit=None,
                    log=None):
    """The task's metrics of a model file on an image folder (classification: folder/<class>/<image>),
    preprocessing from its metadata."""
    runner = open_runner(model_path, backend=backend, providers=providers, threads=threads, log=log)
    try:
        return evaluate_folder_with(runner, folder, batch=batch, limit=limit, log=log)
    finally:
        runner.close()


def load_eval_arrays(bundle_dir, manifest, limit=None, task=None):
    """The bundle's own evaluation set as its task reads it (task.load_eval): classification:
    eval/images.npy (N,C,H,W float32) and eval/labels.npy (N,); segmentation: lists of whole
    images (H, W, 3) uint8 and their masks (H, W), as the manifest's eval entry names them."""
    task = task or get_task(DEFAULT_TASK)
    entry = manifest.get("eval") or {}
    if not entry.get("images"):
        raise RuntimeToolError(f"bundle {bundle_dir} has no evaluation set in its manifest")
    return task.load_eval(bundle_dir, entry, limit)
