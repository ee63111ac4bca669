"""What the device needs to know about a task: decode raw outputs, score them, read the targets.

A task is selected by the model's `rsedge.task` metadata (see tasks/__init__.py), so the
evaluation loop, the comparator and rsedge-bench never look at the shape of an output
themselves. Predictions and targets are per-sample sequences (a numpy array with the sample
on axis 0, or a list with one entry per sample): the loop slices them by sample and hands
each chunk to the accumulator.

A bundle's evaluation set is read by the task (`load_eval`) and evaluated by it (`evaluate`),
so a task whose samples are not one fixed-size tensor each (segmentation: whole tiles of any
size, run by sliding windows) brings its own loop; the defaults are the fixed-size loop every
classifier uses. `evaluate` gets the runner wrapped in evaluate.py's RunnerLoop (chunks of the
runner's batch plan), so no task imports the evaluation module.
"""

import os

import numpy as np

from ..errors import RuntimeToolError


class EvalOptions(object):
    """How one evaluation runs: batch (capped by the runner's), class names (None: the model's), log,
    observe(start, outputs) (sees every chunk of raw outputs, in a deterministic order: how
    rsedge-bench compares variants without a second pass) and save_predictions (a folder, or None:
    tasks that can write their predictions there do)."""

    def __init__(self, batch=32, class_names=None, log=None, observe=None, save_predictions=None):
        self.batch = int(batch)
        self.class_names = list(class_names) if class_names is not None else None
        self.log = log or (lambda msg: None)
        self.observe = observe
        self.save_predictions = save_predictions


class DeviceTask(object):
    """Base class of device tasks; a task module subclasses it and registers one instance."""

    name = "?"
    outputs = ("logits",)
    targets_name = "targets"
    sample_unit = "images"  # what one model input is, in the logs (segmentation: windows of an image)

    def output(self, outputs, name):
        """The output `name`, or the first one when the model does not name it (files exported before
        output names were declared carry one output under another name)."""
        if name in outputs:
            return outputs[name]
        if not outputs:
            raise RuntimeToolError("the model produced no outputs")
        return outputs[next(iter(outputs))]

    def decode(self, outputs, metadata):
        """{output name: array (N, ...)} -> predictions, one per sample."""
        raise NotImplementedError

    def accumulator(self, metadata):
        """A fresh object with .update(predictions, targets) and .result() -> dict with "primary"."""
        raise NotImplementedError

    def agreement(self, reference, candidate, metadata):
        """Fraction of samples whose decoded predictions agree between two {name: array}."""
        raise NotImplementedError

    def load_targets(self, bundle_dir, entry, limit=None):
        """The bundle's evaluation targets, from the files its manifest's eval entry names."""
        raise NotImplementedError

    def load_eval(self, bundle_dir, entry, limit=None):
        """(images, targets) of a bundle's evaluation set; default: eval/images.npy, preprocessed
        (N, C, H, W) and read with mmap, and the task's load_targets."""
        return load_array(eval_file(bundle_dir, entry, "images"), limit), self.load_targets(bundle_dir, entry, limit)

    def evaluate(self, loop, images, targets, options):
        """The task's metrics over what load_eval returned; default: every fixed-size chunk of
        preprocessed images through the runner, decoded and scored (evaluate.evaluate_arrays).

        loop: evaluate.RunnerLoop (.metadata, .chunks(images) -> (start, stop, {name: array}),
        .infer(x) -> {name: array} for any number of samples); options: EvalOptions."""
        meta = loop.metadata
        if images.shape[0] != len(targets):
            raise RuntimeToolError("{} images but {} {}".format(images.shape[0], len(targets), self.targets_name))
        if options.save_predictions:
            options.log("note: {} runs write no predictions (--save-predictions is for segmentation and "
                        "detection)".format(self.name))
        accumulator = self.accumulator(meta)
        for start, stop, outputs in loop.chunks(images):
            if options.observe is not None:
                options.observe(start, outputs)
            accumulator.update(self.decode(outputs, meta), targets[start:stop])
        return dict(accumulator.result(), task=self.name)

    def folder_items(self, folder, metadata):
        """(items [(image path, target)], metadata to evaluate with, note or None) for an image folder.

        Tasks whose targets do not live in a folder layout evaluate on a bundle's eval set only.
        """
        raise RuntimeToolError("{} models are evaluated on a bundle's evaluation set, not on an image folder "
                               "(give the bundle to rsedge-bench)".format(self.name))

    def reads_folders(self):
        """Whether folder_items is implemented (evaluation on an image folder), so a command can
        refuse `--eval DIR` before it spends minutes benchmarking."""
        return type(self).folder_items is not DeviceTask.folder_items

    def summary(self, result):
        """One line for the log: the primary metric of an accumulator's result (None: nothing measured)."""
        value = result.get(result.get("primary"))
        if value is None:
            return None
        return "{} {:.4f} on {} images".format(result["primary"], value, result.get("n"))

    def describe(self, metadata):
        """A few words for the log line that starts an evaluation."""
        return self.name


def eval_file(bundle_dir, entry, key):
    """The path of the eval file `key`, from the eval entry's own key or its "targets" table."""
    rel = entry.get(key) or (entry.get("targets") or {}).get(key)
    if not rel:
        raise RuntimeToolError("bundle {} has no eval/{} in its manifest's evaluation set".format(bundle_dir, key))
    return os.path.join(bundle_dir, *rel.split("/"))


def load_array(path, limit=None):
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (IOError, OSError, ValueError) as e:
        raise RuntimeToolError("cannot read {}: {}".format(path, e)) from e
    return array[:int(limit)] if limit else array
