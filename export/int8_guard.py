"""INT8 with an accuracy guard: keep the layers that quantize worst in floating point until the
top-1 drop against FP32 is within budget.

Sensitivity is measured, not guessed: for every node, the signal-to-quantization-noise ratio
(SQNR, dB, per channel and averaged over channels) of each quantized tensor the node reads or
writes: the FP32 activation against the same activation fake-quantized with the scale the
calibration chose, and each weight against its int8 copy. A node's score is its worst tensor
(a tensor stays float only when its producer and consumers all do); the lowest scores go back
to float first, 1, 2, 4, 8... nodes per attempt, so a model with one bad layer costs a few
quantizations, not one per layer.

The budget is compared in whole images, never in floating-point points: with 100 validation
images, 19 % against 18 % is one image lost, which a budget of 1 point allows, although
100 * (0.19 - 0.18) is 1.0000000000000009 in floating point. A file is shipped only if it meets the
budget and still has compute nodes in int8; otherwise it is rejected, not written, and the record
says why.
"""
from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, Callable

import numpy as np

from rsedge.runtime.tasks import get_task

from .onnx_export import evaluate_onnx
from .onnx_graph import int8_coverage
from .quantize import int8_metadata, preprocess_for_quantization, quantize_qdq


def sqnr_db(signal: np.ndarray, approx: np.ndarray) -> float:
    noise = float(np.sum((signal.astype(np.float64) - approx) ** 2))
    power = float(np.sum(signal.astype(np.float64) ** 2))
    if noise == 0:
        return float("inf")
    if power == 0:
        return float("-inf")
    return 10.0 * np.log10(power / noise)


def channel_sqnr_db(signal: np.ndarray, approx: np.ndarray, axis: int = 1) -> float:
    """Mean over channels of each channel's SQNR (each clamped to [-20, 100] dB). A tensor-wide
    SQNR is dominated by its largest channel, and an outlier channel is exactly what makes int8
    round every other channel to zero."""
    if signal.ndim < 2:
        return float(np.clip(sqnr_db(signal, approx), -20, 100))
    s = np.moveaxis(signal, axis, 0).reshape(signal.shape[axis], -1)
    a = np.moveaxis(approx, axis, 0).reshape(signal.shape[axis], -1)
    return float(np.mean([np.clip(sqnr_db(si, ai), -20, 100) for si, ai in zip(s, a)]))


def fake_quantize(x: np.ndarray, scale: np.ndarray, zero_point: np.ndarray, axis: int | None = None) -> np.ndarray:
    if axis is not None and np.ndim(scale) == 1 and scale.size > 1:
        shape = [1] * x.ndim
        shape[axis] = -1
        scale, zero_point = scale.reshape(shape), zero_point.reshape(shape)
    info = np.iinfo(zero_point.dtype)
    q = np.clip(np.round(x / scale) + zero_point.astype(np.float64), info.min, info.max)
    return (q - zero_point.astype(np.float64)) * scale


def _attr(node, name, default=None):
    for a in node.attribute:
        if a.name == name:
            return a.i
    return default


def node_sensitivity(float_onnx: str | Path, qdq_onnx: str | Path, images: np.ndarray) -> list[dict[str, Any]]:
    """Per node of `float_onnx` (the graph that was quantized): SQNR of each quantized tensor it
    reads or writes, nodes worst first."""
    import onnx
    from onnx import numpy_helper

    fm = onnx.load(str(float_onnx))
    qm = onnx.load(str(qdq_onnx))
    qinit = {i.name: numpy_helper.to_array(i) for i in qm.graph.initializer}
    finit = {i.name: numpy_helper.to_array(i) for i in fm.graph.initializer}
    # tensor -> (scale, zero point, axis) for every activation QuantizeLinear of the QDQ graph
    act_q: dict[str, tuple[np.ndarray, np.ndarray, int | None]] = {}
    weight_err: dict[str, float] = {}
    for n in qm.graph.node:
        if n.op_type == "QuantizeLinear" and n.input[0] not in qinit and n.input[1] in qinit:
            act_q[n.input[0]] = (qinit[n.input[1]], qinit[n.input[2]], _attr(n, "axis"))
        if n.op_type == "DequantizeLinear" and n.input[0] in qinit and qinit[n.input[0]].dtype == np.int8:
            source = n.output[0].rsplit("_DequantizeLinear_Output", 1)[0]
            if source in finit:
                scale, zp = qinit[n.input[1]], qinit[n.input[2]]
                axis = _attr(n, "axis", 1)
                shape = [1] * qinit[n.input[0]].ndim
                if scale.size > 1:
                    shape[axis] = -1
                deq = (qinit[n.input[0]].astype(np.float64) - zp.reshape(shape)) * scale.reshape(shape)
                weight_err[source] = channel_sqnr_db(finit[source], deq, axis=0)
    # the quantizer renames a quantized graph output to <name>_QuantizeLinear_Input
    act_q = {t.removesuffix("_QuantizeLinear_Input"): v for t, v in act_q.items()}
    graph_inputs = {i.name for i in fm.graph.input}
    produced = {o for n in fm.graph.node for o in n.output}
    wanted = [t for t in act_q if t in produced]
    acts: dict[str, np.ndarray] = {}
    if wanted:
        aug = onnx.load(str(float_onnx))
        known = {o.name for o in aug.graph.output}
        for t in wanted:
            if t not in known:
                aug.graph.output.append(onnx.helper.make_empty_tensor_value_info(t))
        with tempfile.TemporaryDirectory() as tmp:
            p = Path(tmp) / "aug.onnx"
            onnx.save(aug, str(p))
            from .onnx_export import ort_session

            sess = ort_session(p)
            names = [o.name for o in sess.get_outputs()]
            inp = sess.get_inputs()[0]
            fixed = inp.shape[0] if isinstance(inp.shape[0], int) else len(images)
            chunks: dict[str, list[np.ndarray]] = {t: [] for t in wanted}
            for i in range(0, len(images), fixed):
                outs = dict(zip(names, sess.run(None, {inp.name: images[i : i + fixed]})))
                for t in wanted:
                    chunks[t].append(outs[t])
            acts = {t: np.concatenate(v) for t, v in chunks.items()}
    for t in graph_inputs & set(act_q):
        acts[t] = images
    act_err = {t: channel_sqnr_db(a, fake_quantize(a, *act_q[t][:2], axis=act_q[t][2])) for t, a in acts.items()}
    rows = []
    for n in fm.graph.node:
        # a tensor stays float only if its producer and its consumers are all excluded, so a
        # tensor's error counts against both
        tensors = {}
        for t in list(n.input) + list(n.output):
            if t in act_err:
                tensors[t] = act_err[t]
            elif t in weight_err:
                tensors[t] = weight_err[t]
        if tensors:
            worst = min(tensors, key=tensors.get)
            rows.append({"node": n.name, "op": n.op_type, "sqnr_db": tensors[worst], "worst_tensor": worst,
                         "tensors": tensors})
    rows.sort(key=lambda r: r["sqnr_db"])
    return rows


def _write_with_metadata(qdq: Path, out_path: Path, fp32_onnx: str | Path, target: str) -> None:
    """The pre-processing pass may drop metadata_props: the device needs them, so copy them."""
    import onnx

    from rsedge.trainer.records import atomic_write_bytes

    from .onnx_export import set_metadata

    model = onnx.load(str(qdq))
    props = {p.key: p.value for p in onnx.load(str(fp32_onnx)).metadata_props}
    props.update(int8_metadata(target, int8_coverage(qdq)))
    set_metadata(model, props)
    atomic_write_bytes(out_path, model.SerializeToString())


def budget_images(max_drop: float, n: int) -> int:
    """How many of `n` images the INT8 model may lose against FP32 for a budget of `max_drop`
    points, in exact decimal arithmetic: the user's 1 (or 0.3) is read as the decimal they typed."""
    return math.floor(Fraction(repr(float(max_drop))) * n / 100)


def guard_budget(max_drop: float | None, n: int, log: Callable[[str], None] = print) -> dict[str, Any]:
    """The budget in images and whether `n` images can resolve it; warns when one image is worth
    more points than the budget (the guard then allows no image lost, stricter than asked)."""
    if max_drop is None:
        return {"budget_images": None, "resolution_points": 100 / n if n else None, "resolves_budget": None}
    if max_drop < 0:
        raise ValueError(f"--max-drop must be at least 0 points, not {max_drop}")
    if n == 0:
        raise ValueError("the INT8 accuracy guard needs labeled validation images")
    resolves = max_drop == 0 or Fraction(100, n) <= Fraction(repr(float(max_drop)))
    budget = {"budget_images": budget_images(max_drop, n), "resolution_points": 100 / n, "resolves_budget": resolves}
    if not resolves:
        log(f"warning: the INT8 guard's evaluation set is too small to resolve --max-drop {max_drop}: one of its {n} "
            f"images is {100 / n:.3g} points, so the guard allows no image lost (0 points), stricter than asked; "
            f"at least {math.ceil(100 / max_drop)} validation images resolve it (--guard-images, or a larger "
            "validation split)")
    return budget


def correct_images(path: str | Path, images: np.ndarray, labels: np.ndarray) -> int:
    """Validation images a file classifies right, by the runtime's evaluation and its classification
    accumulator (the one place top-1 is counted)."""
    return int(evaluate_onnx(path, images, labels, task="classification")["correct"]) if len(labels) else 0


def _counted(predictions: np.ndarray, labels: np.ndarray) -> int:
    """Right predictions among given ones (FP32 classes a caller already has), by the same accumulator."""
    tally = get_task("classification").accumulator({})
    tally.update(predictions, labels)
    return int(tally.result()["correct"])


class ImageScorer:
    """Classification: top-1 counted in whole validation images, the budget in images lost."""

    def __init__(self, fp32_onnx: str | Path, images: np.ndarray, labels: np.ndarray, max_drop: float | None,
                 fp32_predictions: np.ndarray | None, log: Callable[[str], None]):
        self.images, self.labels, self.n = images, labels, int(len(labels))
        self.budget = guard_budget(max_drop, self.n, log)
        self.fp32 = (correct_images(fp32_onnx, images, labels) if fp32_predictions is None
                     else _counted(fp32_predictions, labels))

    def score(self, path: Path) -> dict[str, Any]:
        n, correct = self.n, correct_images(path, self.images, self.labels)
        lost = self.fp32 - correct
        budget = self.budget["budget_images"]
        return {"int8_correct": correct, "int8_top1": correct / n if n else 0.0, "images_lost": lost,
                "drop_points": 100 * lost / n if n else 0.0, "within_budget": budget is None or lost <= budget,
                "score": correct}

    def describe(self, a: dict[str, Any]) -> str:
        return (f"top-1 {a['int8_correct']}/{self.n} (FP32 {self.fp32}/{self.n}), {a['images_lost']} image(s) lost "
                f"= {a['drop_points']:.2f} points")

    def record(self, best: dict[str, Any]) -> dict[str, Any]:
        n = self.n
        return {"fp32_top1": self.fp32 / n if n else 0.0, "fp32_correct": self.fp32, "int8_top1": best["int8_top1"],
                "int8_correct": best["int8_correct"], "images_lost": best["images_lost"], **self.budget}

    def shortfall(self, best: dict[str, Any], max_drop: float | None) -> str:
        return (f"no attempt met --max-drop {max_drop} ({self.budget['budget_images']} of {self.n} images): the best "
                f"lost {best['images_lost']} image(s) ({best['drop_points']:.2f} points)")


class MetricScorer:
    """A dense task's metric over the validation set by the runtime's accumulator, the budget in
    points of it (no whole-image rounding applies): mIoU on segmentation windows, mAP@0.5 on
    detection images."""

    METRICS = {"segmentation": ("miou", "mIoU", "windows"), "detection": ("map50", "mAP@0.5", "images")}

    def __init__(self, fp32_onnx: str | Path, images: np.ndarray, targets: Any, max_drop: float | None,
                 metadata: dict[str, Any], task: str = "segmentation"):
        if max_drop is not None and max_drop < 0:
            raise ValueError(f"--max-drop must be at least 0 points, not {max_drop}")
        self.task = task
        self.metric, self.label, self.unit = self.METRICS[task]
        self.images, self.targets, self.n, self.max_drop = images, targets, int(len(targets)), max_drop
        self.metadata = metadata
        if max_drop is not None and self.n == 0:
            raise ValueError("the INT8 accuracy guard needs labeled validation images")
        self.fp32 = self._value(fp32_onnx)

    def _value(self, path: str | Path) -> float:
        if not self.n:
            return 0.0
        return float(evaluate_onnx(path, self.images, self.targets, task=self.task,
                                   metadata=self.metadata)[self.metric] or 0.0)

    def score(self, path: Path) -> dict[str, Any]:
        value = self._value(path)
        drop = 100 * (self.fp32 - value)
        return {f"int8_{self.metric}": value, "drop_points": drop, "score": value,
                "within_budget": self.max_drop is None or drop <= self.max_drop + 1e-9}

    def describe(self, a: dict[str, Any]) -> str:
        return (f"{self.label} {100 * a[f'int8_{self.metric}']:.2f} % (FP32 {100 * self.fp32:.2f} %) = "
                f"{a['drop_points']:.2f} points")

    def record(self, best: dict[str, Any]) -> dict[str, Any]:
        return {"metric": self.metric, f"fp32_{self.metric}": self.fp32,
                f"int8_{self.metric}": best[f"int8_{self.metric}"]}

    def shortfall(self, best: dict[str, Any], max_drop: float | None) -> str:
        return (f"no attempt met --max-drop {max_drop} {self.label} points on {self.n} validation {self.unit}: the "
                f"best lost {best['drop_points']:.2f} points")


def tail_nodes(onnx_path: str | Path) -> list[str]:
    """Names of the nodes after the last convolutions (a detector's box decode: sigmoid, grid
    offsets, anchor scaling, in input pixels): kept in float, as 8 bits over a 640 px range would
    move every box by up to 2.5 px."""
    import onnx

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    consumers: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    feeds_conv: dict[str, bool] = {}

    def leads_to_conv(node) -> bool:
        key = node.name or id(node)
        if key not in feeds_conv:
            feeds_conv[key] = False
            feeds_conv[key] = any(c.op_type == "Conv" or leads_to_conv(c)
                                  for out in node.output for c in consumers.get(out, []))
        return feeds_conv[key]

    return [n.name for n in graph.node if n.name and n.op_type != "Conv" and not leads_to_conv(n)
            and n.op_type not in ("Constant",)]


class _Attempts:
    """Quantizations of one pre-processed graph for one target, each scored by the task's scorer."""

    def __init__(self, pre: Path, calib: np.ndarray, scorer: Any, method: str, target: str,
                 log: Callable[[str], None]):
        self.pre, self.calib, self.scorer = pre, calib, scorer
        self.method, self.target, self.log = method, target, log
        self.all: list[dict[str, Any]] = []
        self.always_float: list[str] = []

    def run(self, excluded: list[str]) -> dict[str, Any]:
        path = self.pre.with_name(f"q{len(self.all)}.onnx")
        info = quantize_qdq(self.pre, path, self.calib, self.method, exclude_nodes=self.always_float + excluded,
                            preprocess=False,
                            target=self.target, log=self.log)
        a = {"n": len(self.all) + 1, "excluded": list(excluded), **self.scorer.score(path),
             "quantized_nodes": info["quantized_nodes"], "quantizable_nodes": info["quantizable_nodes"],
             "path": path, "info": info}
        self.all.append(a)
        if self.scorer.n:
            self.log(f"INT8 ({self.target}) attempt {a['n']}: {len(excluded)} node(s) in float, "
                     f"{a['quantized_nodes']}/{a['quantizable_nodes']} compute nodes int8, {self.scorer.describe(a)}")
        return a

    def search(self, sensitivity_images: int) -> list[dict[str, Any]]:
        """Plain quantization first; while over budget, the worst 1, 2, 4... nodes go to float."""
        current = self.run([])
        if current["within_budget"]:
            return []
        sensitivity = node_sensitivity(self.pre, current["path"], self.calib[:sensitivity_images])
        order = [r["node"] for r in sensitivity]
        k = 1
        while not current["within_budget"] and k <= len(order):
            current = self.run(order[:k])
            if k == len(order):
                break
            k = min(2 * k, len(order))
        return sensitivity

    def choose(self) -> tuple[dict[str, Any] | None, dict[str, Any]]:
        """(the attempt to ship or None, the attempt the record describes)."""
        chosen = next((a for a in self.all if a["within_budget"] and a["quantized_nodes"] > 0), None)
        best = chosen or max(self.all, key=lambda a: (a["within_budget"], a["score"], a["quantized_nodes"]))
        return chosen, best


def _rejection(best: dict[str, Any], max_drop: float | None, scorer: Any) -> str:
    if best["within_budget"]:
        return ("every compute node had to stay in float to meet the budget: the file would hold no int8"
                if best["excluded"] else "quantization put no compute node in int8")
    return f"{scorer.shortfall(best, max_drop)} with {len(best['excluded'])} node(s) in float"


@dataclass
class GuardOptions:
    """How `quantize_with_guard` quantizes and guards: the budget in top-1 points (None: no guard),
    the calibration method, how many calibration images rank the nodes' sensitivity, and the
    backend the file is made for ("tensorrt": int8 activations; "onnxruntime": uint8)."""

    max_drop: float | None = None
    method: str = "minmax"
    sensitivity_images: int = 32
    target: str = "tensorrt"
    task: str = "classification"  # segmentation / detection: the drop in mIoU / mAP@0.5 points
    keep_tail_float: bool = False  # the nodes after the last convolutions stay float (a detector's decode)
    metadata: dict[str, Any] | None = None  # the model's rsedge.* table (segmentation: classes, ignore label)


def quantize_with_guard(
    fp32_onnx: str | Path,
    out_path: str | Path,
    calib: np.ndarray,
    val_images: np.ndarray,
    val_labels: np.ndarray,
    options: GuardOptions | None = None,
    *,
    log: Callable[[str], None] = print,
    fp32_predictions: np.ndarray | None = None,
    **fields: Any,
) -> dict[str, Any]:
    """Quantize for `target`; with `max_drop` (points of top-1), evaluate on the validation arrays
    and put the most sensitive nodes back to float until the images lost are within it. The file
    written is the first attempt within budget that still has int8 compute nodes; when there is
    none, nothing is written and the record's status is "rejected" with the reason. The record
    lists every attempt. `fp32_predictions` (FP32 class per validation image) saves a second FP32
    evaluation when several targets are guarded on the same images. `fields` replace those of
    `options` (`max_drop=1.0`)."""
    from rsedge.trainer.stage import build_options

    o = build_options(GuardOptions, options, fields)
    max_drop, method, target = o.max_drop, o.method, o.target
    out_path = Path(out_path)
    with tempfile.TemporaryDirectory() as tmp:
        pre = Path(tmp) / "pre.onnx"
        preprocess_for_quantization(fp32_onnx, pre, log)
        if o.task in MetricScorer.METRICS:
            scorer: Any = MetricScorer(fp32_onnx, val_images, val_labels, max_drop, o.metadata or {}, o.task)
        else:
            scorer = ImageScorer(fp32_onnx, val_images, val_labels, max_drop, fp32_predictions, log)
        attempts = _Attempts(pre, calib, scorer, method, target, log)
        if o.keep_tail_float:
            attempts.always_float = tail_nodes(pre)
            log(f"{len(attempts.always_float)} node(s) after the last convolutions (the box decode) kept in float")
        sensitivity = attempts.search(o.sensitivity_images)
        chosen, best = attempts.choose()
        if chosen is not None:
            _write_with_metadata(chosen["path"], out_path, fp32_onnx, target)
    coverage = {k: best["info"][k] for k in ("quantized_nodes", "quantizable_nodes", "quantized_fraction",
                                             "activation_types")}
    return {
        **best["info"],
        "status": "written" if chosen is not None else "rejected",
        "reason": None if chosen is not None else _rejection(best, max_drop, scorer),
        "file": out_path.name if chosen is not None else None,
        "precision": int8_metadata(target, coverage)["rsedge.precision"] if chosen is not None else None,
        **scorer.record(best),
        "drop_points": best["drop_points"],
        "max_drop": max_drop,
        "within_budget": best["within_budget"],
        "kept_in_float": best["excluded"],
        "attempts": [{k: v for k, v in a.items() if k not in ("path", "info")} for a in attempts.all],
        "sensitivity": [{k: r[k] for k in ("node", "op", "sqnr_db", "worst_tensor")} for r in sensitivity[:50]],
        "validation_images": scorer.n,
    }
