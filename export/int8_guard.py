"""INT8 with an accuracy guard: keep the layers that quantize worst in floating point until the
top-1 drop against FP32 is within budget.

Sensitivity is measured, not guessed: for every node, the signal-to-quantization-noise ratio
(SQNR, dB, per channel and averaged over channels) of each quantized tensor the node reads or
writes: the FP32 activation against the same activation fake-quantized with the scale the
calibration chose, and each weight against its int8 copy. A node's score is its worst tensor
(a tensor stays float only when its producer and consumers all do); the lowest scores go back
to float first, 1, 2, 4, 8... nodes per attempt, so a model with one bad layer costs a few
quantizations, not one per layer.
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .onnx_export import run_onnx
from .quantize import preprocess_for_quantization, quantize_qdq


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


def _write_with_metadata(qdq: Path, out_path: Path, fp32_onnx: str | Path) -> None:
    """The pre-processing pass may drop metadata_props: the device needs them, so copy them."""
    import onnx

    from rsedge.trainer.records import atomic_write_bytes

    from .onnx_export import set_metadata

    model = onnx.load(str(qdq))
    props = {p.key: p.value for p in onnx.load(str(fp32_onnx)).metadata_props}
    if props:
        props["rsedge.precision"] = "int8-qdq"
        set_metadata(model, props)
    atomic_write_bytes(out_path, model.SerializeToString())


def top1(path: str | Path, images: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(run_onnx(path, images).argmax(1) == labels)) if len(labels) else 0.0


def quantize_with_guard(
    fp32_onnx: str | Path,
    out_path: str | Path,
    calib: np.ndarray,
    val_images: np.ndarray,
    val_labels: np.ndarray,
    max_drop: float | None = None,
    method: str = "minmax",
    sensitivity_images: int = 32,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Quantize; with `max_drop` (points of top-1), evaluate on the validation arrays and put the
    most sensitive nodes back to float until the drop is within it. The record lists every
    attempt; the file written is the first attempt within budget, else the best one."""
    out_path = Path(out_path)
    with tempfile.TemporaryDirectory() as tmp:
        pre = Path(tmp) / "pre.onnx"
        preprocess_for_quantization(fp32_onnx, pre, log)
        fp32_top1 = top1(fp32_onnx, val_images, val_labels)
        attempts: list[dict[str, Any]] = []

        def attempt(excluded: list[str]) -> dict[str, Any]:
            path = Path(tmp) / f"q{len(attempts)}.onnx"
            info = quantize_qdq(pre, path, calib, method, exclude_nodes=excluded, preprocess=False, log=log)
            acc = top1(path, val_images, val_labels)
            a = {"excluded": list(excluded), "int8_top1": acc, "drop_points": 100 * (fp32_top1 - acc),
                 "path": path, "info": info}
            attempts.append(a)
            if len(val_labels):
                log(f"INT8 attempt {len(attempts)}: {len(excluded)} node(s) in float, top-1 {acc:.4f} "
                    f"(FP32 {fp32_top1:.4f}, drop {a['drop_points']:.2f} points)")
            return a

        current = attempt([])
        sensitivity: list[dict[str, Any]] = []
        if max_drop is not None and current["drop_points"] > max_drop:
            sensitivity = node_sensitivity(pre, current["path"], calib[:sensitivity_images])
            order = [r["node"] for r in sensitivity]
            k = 1
            while current["drop_points"] > max_drop and k <= len(order):
                current = attempt(order[:k])
                if k == len(order):
                    break
                k = min(2 * k, len(order))
        within = [a for a in attempts if max_drop is None or a["drop_points"] <= max_drop]
        chosen = within[0] if within else max(attempts, key=lambda a: a["int8_top1"])
        _write_with_metadata(chosen["path"], out_path, fp32_onnx)
    return {
        **chosen["info"],
        "fp32_top1": fp32_top1,
        "int8_top1": chosen["int8_top1"],
        "drop_points": chosen["drop_points"],
        "max_drop": max_drop,
        "within_budget": max_drop is None or chosen["drop_points"] <= max_drop,
        "kept_in_float": chosen["excluded"],
        "attempts": [{k: v for k, v in a.items() if k not in ("path", "info")} for a in attempts],
        "sensitivity": [{k: r[k] for k in ("node", "op", "sqnr_db", "worst_tensor")} for r in sensitivity[:50]],
        "validation_images": int(len(val_labels)),
    }
