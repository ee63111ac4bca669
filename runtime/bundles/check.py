"""rsedge-bench's device check: each variant of a bundle against the bundle's FP32 variant.

While the bundle's evaluation set runs through every variant, the FP32 variant's outputs (the
ONNX with ONNX Runtime, or its FP32 engine with TensorRT) are kept as the reference, and every
other variant's outputs on the same images are compared with them by the one comparator
(compare.py): per-output max / mean absolute difference and the task's agreement (top-1
agreement for classifiers). The reference is kept for at most MAX_REFERENCE_BYTES of outputs
(every image of a classifier's eval set; the first images of a segmentation set), so the
check costs no second pass and little memory.

The thresholds below decide `passed`; it is a smoke alarm in the JSON, not a gate (the exit
code does not depend on it, accuracy is measured on its own): FP32 engines may run TF32 on
Ampere and later, FP16 rounds every layer, and an INT8 file's outputs are not expected to be
close element by element, only to predict the same.
"""

import collections

import numpy as np

from ..compare import compare

MAX_REFERENCE_BYTES = 64 * 1024 * 1024
THRESHOLDS = {  # precision: (atol, rtol) of every output or None (not bounded), minimum agreement
    "fp32": ((1e-2, 1e-2), 0.99),
    "fp16": ((5e-2, 5e-2), 0.98),
    "int8": (None, 0.95),
}


class _Recorder(object):
    """The first images' outputs of one run, up to a byte budget (or up to `limit` images)."""

    def __init__(self, max_bytes=None, limit=None):
        self.max_bytes, self.limit = max_bytes, limit
        self.chunks, self.bytes, self.images, self.full = [], 0, 0, False

    def __call__(self, start, outputs):
        if self.full or start != self.images:
            return
        n = len(next(iter(outputs.values()))) if outputs else 0
        if self.limit is not None:
            n = min(n, self.limit - self.images)
        size = sum(np.asarray(a)[:n].nbytes for a in outputs.values())
        if n <= 0 or (self.max_bytes is not None and self.bytes + size > self.max_bytes):
            self.full = True
            return
        self.chunks.append(collections.OrderedDict((k, np.array(a[:n])) for k, a in outputs.items()))
        self.bytes += size
        self.images += n

    def outputs(self):
        if not self.chunks:
            return collections.OrderedDict()
        return collections.OrderedDict((k, np.concatenate([c[k] for c in self.chunks])) for k in self.chunks[0])


class VariantCheck(object):
    """Record the reference run, then compare each candidate run with it."""

    def __init__(self, task, metadata, max_bytes=MAX_REFERENCE_BYTES):
        self.task, self.metadata, self.max_bytes = task, metadata, max_bytes
        self.reference, self.reference_label = None, None

    def observer(self, is_reference):
        """The observe(start, outputs) callback for one run's evaluation."""
        return _Recorder(self.max_bytes) if is_reference else _Recorder(
            limit=self.reference.images if self.reference is not None else 0)

    def finish(self, recorder, label, precision, is_reference):
        """The run's "check" entry (None for the reference itself)."""
        if is_reference:
            self.reference, self.reference_label = recorder, label
            return None
        if self.reference is None or not self.reference.images:
            return {"reference": None, "skipped": "no FP32 run of this bundle to compare with (it was not run, "
                                                 "or failed)"}
        bound, min_agreement = THRESHOLDS.get(_precision_key(precision), (None, None))
        names = list(self.reference.chunks[0])
        per_output = {name: (None if bound is None else {"atol": bound[0], "rtol": bound[1]}) for name in names}
        result = compare(self.reference.outputs(), recorder.outputs(), task=self.task, metadata=self.metadata,
                         per_output=per_output, min_agreement=min_agreement)
        return dict(result, reference=self.reference_label, images=recorder.images,
                    unit=getattr(self.task, "sample_unit", "images"),
                    tolerance={"atol": bound[0], "rtol": bound[1]} if bound else None, min_agreement=min_agreement)


def _precision_key(precision):
    text = str(precision or "").lower()
    for key in ("int8", "fp16", "fp32"):
        if text.startswith(key):
            return key
    return None


def describe(check):
    """One log line for a run's check entry."""
    if check is None:
        return None
    if check.get("skipped"):
        return "  check: " + check["skipped"]
    diffs = ", ".join("{} max {:.3g} mean {:.3g}".format(n, o["max_abs_diff"], o["mean_abs_diff"])
                      for n, o in check["outputs"].items())
    agreement = "" if check["agreement"] is None else "agreement {:.2f} %, ".format(100.0 * check["agreement"])
    return "  check vs {} on {} {}: {}abs diff {} -> {}".format(
        check["reference"], check["images"], check.get("unit", "images"), agreement, diffs,
        "ok" if check["passed"] else "outside thresholds")
