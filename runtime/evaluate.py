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
from .tasks.base import eval_file, load_array


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


def evaluate_arrays(runner, images, targets, batch=32, class_names=None, log=None, task=None, observe=None):
    """The task's metrics (classification: top-1 and per-class accuracy) of `runner` on preprocessed
    images (N, C, H, W) and their targets (one per image; class ids for classification).

    task: a DeviceTask (default: the one the runner's metadata names); observe(start, outputs) sees
    every chunk's outputs, which is how rsedge-bench compares variants without a second pass."""
    meta = _task_metadata(runner, class_names)
    task = task or task_for(meta)
    images = np.asarray(images)
    if images.shape[0] != len(targets):
        raise RuntimeToolError("{} images but {} {}".format(images.shape[0], len(targets), task.targets_name))
    accumulator = task.accumulator(meta)
    for start, stop, outputs in iter_outputs(runner, images, batch, log):
        if observe is not None:
            observe(start, outputs)
        accumulator.update(task.decode(outputs, meta), targets[start:stop])
    return dict(accumulator.result(), task=task.name)


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
    """The bundle's own evaluation set: eval/images.npy (N,C,H,W float32) and the targets its task reads
    (classification: eval/labels.npy (N,)), as the manifest's eval entry names them."""
    task = task or get_task(DEFAULT_TASK)
    entry = manifest.get("eval") or {}
    if not entry.get("images"):
        raise RuntimeToolError(f"bundle {bundle_dir} has no evaluation set in its manifest")
    images = load_array(eval_file(bundle_dir, entry, "images"), limit)
    return images, task.load_targets(bundle_dir, entry, limit)
