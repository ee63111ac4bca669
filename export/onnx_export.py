"""PyTorch -> ONNX with rsedge metadata, simplification that is checked, and a parity check.

Opset 13 by default because TensorRT 8.2 (JetPack 4, TX2) parses opsets 7 to 13. The
TorchScript exporter writes any opset directly; where only the dynamo exporter exists it writes
its own opset and the graph is converted down, then checked again like any other.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from rsedge.trainer.records import atomic_write_bytes

INPUT_NAME = "input"
OUTPUT_NAME = "logits"
DEFAULT_OPSET = 13
SIMPLIFIERS = ("onnxslim", "onnxsim", "none")


def metadata_props(meta: dict[str, Any], precision: str = "fp32") -> dict[str, str]:
    """What the device needs to preprocess and label with no other file (runtime/README.md)."""
    try:
        from importlib.metadata import version

        rsedge_version = version("rsedge")
    except Exception:  # noqa: BLE001
        rsedge_version = "unknown"
    return {
        "rsedge.task": "classification",
        "rsedge.classes": json.dumps(list(meta["classes"])),
        "rsedge.input_size": json.dumps(list(meta["input_size"])),
        "rsedge.mean": json.dumps(list(meta["normalization"]["mean"])),
        "rsedge.std": json.dumps(list(meta["normalization"]["std"])),
        "rsedge.layout": "NCHW",
        "rsedge.color": "RGB",
        "rsedge.resize": "resize",
        "rsedge.version": rsedge_version,
        "rsedge.precision": precision,
        "rsedge.arch": meta.get("arch", ""),
    }


def set_metadata(model_proto, props: dict[str, str]) -> None:
    existing = {p.key: p for p in model_proto.metadata_props}
    for k, v in props.items():
        if k in existing:
            existing[k].value = v
        else:
            entry = model_proto.metadata_props.add()
            entry.key, entry.value = k, v


def _torch_export(model: nn.Module, example: torch.Tensor, path: Path, opset: int, dynamic_batch: bool) -> str:
    dynamic_axes = {INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}} if dynamic_batch else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(
                model, (example,), str(path), dynamo=False, opset_version=opset,
                input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], dynamic_axes=dynamic_axes,
                do_constant_folding=True,
            )
            return "torchscript"
        except TypeError:
            pass  # this torch has no TorchScript exporter any more
    import onnx
    from onnx import version_converter

    dynamic_shapes = ({0: torch.export.Dim("batch", min=1, max=1024)},) if dynamic_batch else None
    prog = torch.onnx.export(model, (example,), dynamo=True, input_names=[INPUT_NAME],
                             output_names=[OUTPUT_NAME], dynamic_shapes=dynamic_shapes)
    proto = prog.model_proto
    native = max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
    if native != opset:
        try:
            proto = version_converter.convert_version(proto, opset)
        except Exception as e:
            raise RuntimeError(
                f"the dynamo exporter wrote opset {native} and it cannot be converted to opset {opset}: {e}; "
                f"try --opset {native} (TensorRT 8.5+ parses it; TensorRT 8.2 on JetPack 4 needs <= 13)"
            ) from e
    onnx.save(proto, str(path))
    return f"dynamo (opset {native} converted to {opset})"


def ort_session(path: str | Path, threads: int | None = None):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def run_onnx(path: str | Path, images: np.ndarray, batch: int = 32) -> np.ndarray:
    sess = ort_session(path)
    name = sess.get_inputs()[0].name
    fixed = sess.get_inputs()[0].shape[0]
    step = fixed if isinstance(fixed, int) else batch
    return np.concatenate([sess.run(None, {name: images[i : i + step]})[0] for i in range(0, len(images), step)])


@torch.no_grad()
def run_torch(model: nn.Module, images: np.ndarray, batch: int = 64) -> np.ndarray:
    model.eval()
    outs = [model(torch.from_numpy(images[i : i + batch])).numpy() for i in range(0, len(images), batch)]
    return np.concatenate(outs)


def parity(reference: np.ndarray, candidate: np.ndarray) -> dict[str, float]:
    return {
        "max_abs_diff": float(np.max(np.abs(reference - candidate))) if reference.size else 0.0,
        "top1_agreement": float(np.mean(reference.argmax(1) == candidate.argmax(1))) if reference.size else 1.0,
        "images": int(len(reference)),
    }


def simplify(src: Path, dst: Path, tool: str, check_images: np.ndarray, tol: float = 1e-4,
             log: Callable[[str], None] = print) -> dict[str, Any]:
    """Simplify `src` into `dst`; on failure or changed outputs, `dst` gets the unsimplified graph."""
    import onnx

    info: dict[str, Any] = {"tool": tool}
    if tool == "none":
        atomic_write_bytes(dst, src.read_bytes())
        info["applied"] = False
        return info
    try:
        model = onnx.load(str(src))
        if tool == "onnxslim":
            import onnxslim

            simplified = onnxslim.slim(model)
        elif tool == "onnxsim":
            import onnxsim

            simplified, ok = onnxsim.simplify(model)
            if not ok:
                raise RuntimeError("onnxsim's own check failed")
        else:
            raise ValueError(f"unknown simplifier {tool!r}; choose from {', '.join(SIMPLIFIERS)}")
        tmp = dst.with_suffix(".simplified.tmp")
        onnx.save(simplified, str(tmp))
        diff = parity(run_onnx(src, check_images), run_onnx(tmp, check_images))
        if diff["max_abs_diff"] > tol or diff["top1_agreement"] < 1.0:
            tmp.unlink()
            raise RuntimeError(f"outputs changed (max abs diff {diff['max_abs_diff']:.3g})")
        tmp.replace(dst)
        info.update(applied=True, nodes_before=len(model.graph.node), nodes_after=len(simplified.graph.node))
    except Exception as e:  # noqa: BLE001 - any simplifier failure falls back to the exported graph
        log(f"warning: {tool} could not simplify the graph ({e}); keeping the unsimplified graph")
        atomic_write_bytes(dst, src.read_bytes())
        info.update(applied=False, error=str(e))
    return info


def export_onnx(
    model: nn.Module,
    meta: dict[str, Any],
    path: str | Path,
    check_images: np.ndarray,
    opset: int = DEFAULT_OPSET,
    dynamic_batch: bool = False,
    simplifier: str = "onnxslim",
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Export, simplify, add metadata, then compare ONNX Runtime with PyTorch on `check_images`
    (preprocessed, float32 NCHW)."""
    import onnx

    if simplifier not in SIMPLIFIERS:
        raise ValueError(f"unknown simplifier {simplifier!r}; choose from {', '.join(SIMPLIFIERS)}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = model.cpu().eval()
    h, w = meta["input_size"]
    raw = path.with_suffix(".raw.onnx")
    exporter = _torch_export(model, torch.zeros(1, 3, h, w), raw, opset, dynamic_batch)
    probe = check_images[: min(len(check_images), 8)] if dynamic_batch else check_images[:1]
    simp = simplify(raw, path, simplifier, probe, log=log)
    raw.unlink(missing_ok=True)
    proto = onnx.load(str(path))
    set_metadata(proto, metadata_props(meta))
    onnx.checker.check_model(proto)
    atomic_write_bytes(path, proto.SerializeToString())
    result = parity(run_torch(model, check_images), run_onnx(path, check_images))
    return {"exporter": exporter, "opset": opset, "dynamic_batch": dynamic_batch, "simplify": simp, "parity": result}
