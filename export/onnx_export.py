"""PyTorch -> ONNX with rsedge metadata, simplification that is checked, and a parity check.

Opset 13 by default because TensorRT 8.2 (JetPack 4, TX2) parses opsets 7 to 13. The
TorchScript exporter writes any opset directly; where only the dynamo exporter exists it writes
its own opset and the graph is converted down, then checked again like any other. The model's
task names the outputs and their dynamic axes (`Task.export_outputs`, `Task.dynamic_axes`) and
writes the rsedge.* metadata table (`Task.preprocess`), so a new task exports with no change here.
"""
from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from rsedge.runtime import tasks as device_tasks
from rsedge.runtime.backends.ort import OrtRunner
from rsedge.runtime.compare import compare, max_abs_diff
from rsedge.runtime.evaluate import evaluate_arrays, infer_arrays
from rsedge.runtime.preprocess import to_metadata_props
from rsedge.trainer.records import atomic_write_bytes
from rsedge.trainer.tasks import INPUT_NAME, task_for

DEFAULT_OPSET = 13
SIMPLIFIERS = ("onnxslim", "onnxsim", "none")


def preprocess_spec(meta: dict[str, Any]) -> dict[str, Any]:
    """The rsedge.* table without its prefix (the model's task writes it: `Task.preprocess`), as
    a bundle's preprocess.json carries it for devices that read engines, not ONNX."""
    return task_for(meta).preprocess(meta)


def metadata_props(meta: dict[str, Any], precision: str = "fp32") -> dict[str, str]:
    """What the device needs to preprocess and read the outputs with no other file
    (runtime/README.md): the same table, prefixed, plus the version, precision and arch."""
    try:
        from importlib.metadata import version

        rsedge_version = version("rsedge")
    except Exception:  # noqa: BLE001
        rsedge_version = "unknown"
    return to_metadata_props({**preprocess_spec(meta), "version": rsedge_version, "precision": precision,
                              "arch": meta.get("arch", "")})


def set_metadata(model_proto, props: dict[str, str]) -> None:
    existing = {p.key: p for p in model_proto.metadata_props}
    for k, v in props.items():
        if k in existing:
            existing[k].value = v
        else:
            entry = model_proto.metadata_props.add()
            entry.key, entry.value = k, v


class FixedAdaptiveAvgPool(nn.Module):
    """AdaptiveAvgPool2d for one known input size, as two constant matrix products.

    ONNX has no adaptive pooling: the TorchScript exporter cannot write one whose bins do not
    tile the input (VGG's 7x7 pool on the 2x2 map of a 64 px image), and the dynamo exporter's
    graph cannot be converted down to opset 13 for TensorRT 8.2. Averaging over PyTorch's bins is
    linear in each axis, so out = P_h @ x @ P_w^T with constant P is exact and exports as MatMul.
    """

    def __init__(self, in_hw: tuple[int, int], out_hw: tuple[int, int]):
        super().__init__()
        self.register_buffer("p_h", self._bins(in_hw[0], out_hw[0]))
        self.register_buffer("p_w", self._bins(in_hw[1], out_hw[1]).t().contiguous())

    @staticmethod
    def _bins(n_in: int, n_out: int) -> torch.Tensor:
        p = torch.zeros(n_out, n_in)
        for i in range(n_out):
            start, end = (i * n_in) // n_out, -((-(i + 1) * n_in) // n_out)
            p[i, start:end] = 1.0 / (end - start)
        return p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.matmul(torch.matmul(self.p_h, x), self.p_w)


def exportable(model: nn.Module, example: torch.Tensor) -> tuple[nn.Module, list[str]]:
    """A copy of `model` whose adaptive average pools that ONNX cannot express are replaced by
    their exact fixed-size equivalent; returns the names replaced."""
    import copy

    sizes: dict[str, tuple[int, int]] = {}
    hooks = []
    for name, m in model.named_modules():
        if isinstance(m, nn.AdaptiveAvgPool2d):
            hooks.append(m.register_forward_hook(
                lambda mod, inp, out, name=name: sizes.__setitem__(name, tuple(inp[0].shape[-2:]))))
    with torch.no_grad():
        model(example)
    for h in hooks:
        h.remove()
    replace = []
    for name, (h, w) in sizes.items():
        pool = model.get_submodule(name)
        oh, ow = (pool.output_size, pool.output_size) if isinstance(pool.output_size, int) else pool.output_size
        oh, ow = oh or h, ow or w
        if (oh, ow) != (1, 1) and (h % oh or w % ow):
            replace.append((name, (h, w), (oh, ow)))
    if not replace:
        return model, []
    model = copy.deepcopy(model)
    for name, in_hw, out_hw in replace:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, FixedAdaptiveAvgPool(in_hw, out_hw))
    return model, [r[0] for r in replace]


def _torch_export(model: nn.Module, example: torch.Tensor, path: Path, opset: int,
                  outputs: list[str], dynamic_axes: dict[str, dict[int, str]]) -> str:
    """Export with the task's output names; `dynamic_axes` (the task's, by tensor name) empty for
    a fixed batch."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(
                model, (example,), str(path), dynamo=False, opset_version=opset,
                input_names=[INPUT_NAME], output_names=outputs, dynamic_axes=dynamic_axes or None,
                do_constant_folding=True,
            )
            return "torchscript"
        except TypeError:
            torchscript_error = "this torch has no TorchScript exporter"
        except Exception as e:  # noqa: BLE001 - e.g. VGG's 7x7 adaptive pool on a 2x2 map below 224 px
            torchscript_error = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
    import onnx
    from onnx import version_converter

    axes = dynamic_axes.get(INPUT_NAME)
    dynamic_shapes = ({a: torch.export.Dim(n, min=1, max=1024) for a, n in axes.items()},) if axes else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prog = torch.onnx.export(model, (example,), dynamo=True, input_names=[INPUT_NAME],
                                 output_names=outputs, dynamic_shapes=dynamic_shapes, verbose=False)
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
    return f"dynamo (opset {native} converted to {opset}; TorchScript exporter: {torchscript_error})"


def ort_session(path: str | Path, threads: int | None = None):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def onnx_runner(path: str | Path):
    """The runtime's own ONNX Runtime runner on the CPU (what the device runs, minus the GPU)."""
    return OrtRunner(str(path), providers=["cpu"], log_severity=3)


def run_onnx_outputs(path: str | Path, images: np.ndarray, batch: int = 32):
    """Every output of an ONNX file on preprocessed images: the runtime's Outputs (by position and name)."""
    with onnx_runner(path) as runner:
        return infer_arrays(runner, images, batch)


def run_onnx(path: str | Path, images: np.ndarray, batch: int = 32) -> np.ndarray:
    """The first output of an ONNX file (a classifier's logits) on preprocessed images."""
    return run_onnx_outputs(path, images, batch)[0]


def predict_onnx(path: str | Path, images: np.ndarray, task: str | None = None, batch: int = 32) -> np.ndarray:
    """The task's decoded predictions of an ONNX file (a classifier's class per image), by the runtime."""
    device_task = device_tasks.get_task(task or device_tasks.DEFAULT_TASK)
    return np.asarray(device_task.decode(run_onnx_outputs(path, images, batch).as_dict(), {}))


def evaluate_onnx(path: str | Path, images: np.ndarray, targets: Any, task: str | None = None,
                  batch: int = 32, metadata: dict[str, Any] | None = None) -> dict[str, Any]:
    """The task's metrics of an ONNX file on preprocessed images, by the runtime's evaluation (its
    accumulator counts: "correct" and "top1" for classification; "miou" for segmentation windows):
    the INT8 guard and the demo use it. `metadata`: the model's classes when the file may lack them."""
    with onnx_runner(path) as runner:
        return evaluate_arrays(runner, images, targets, batch=batch, class_names=(metadata or {}).get("classes"),
                               task=device_tasks.get_task(task or device_tasks.DEFAULT_TASK))


@torch.no_grad()
def run_torch_outputs(module: nn.Module, images: np.ndarray, names: Sequence[str], batch: int = 64
                      ) -> dict[str, np.ndarray]:
    """Every output of the module an export writes (one tensor, or a tuple: a detector's boxes and
    scores), by the export's output names."""
    module.eval()
    chunks: list[tuple[np.ndarray, ...]] = []
    for i in range(0, len(images), batch):
        out = module(torch.from_numpy(images[i : i + batch]))
        chunks.append(tuple(o.numpy() for o in (out if isinstance(out, (tuple, list)) else (out,))))
    return {name: np.concatenate([c[k] for c in chunks]) for k, name in enumerate(names)}


def _named(outputs: Any, first_only: bool = False) -> dict[str, np.ndarray]:
    named = outputs.as_dict() if hasattr(outputs, "as_dict") else dict(outputs) if isinstance(outputs, dict) else {
        "output0": np.asarray(outputs)}
    return {"output0": next(iter(named.values()))} if first_only and named else named


def parity(reference: Any, candidate: Any, task: str | None = None) -> dict[str, float]:
    """Parity by the runtime's comparator: the largest difference over every output and the task's
    agreement (top-1 agreement for classifiers), under the record keys exports have always had.
    reference / candidate: {name: array} or a runner's Outputs; a bare array is a first output, compared
    with the other side's first output."""
    first_only = isinstance(reference, np.ndarray) or isinstance(candidate, np.ndarray)
    ref, cand = _named(reference, first_only), _named(candidate, first_only)
    n = int(len(next(iter(ref.values())))) if ref else 0
    if n == 0:
        return {"max_abs_diff": 0.0, "top1_agreement": 1.0, "images": 0}
    result = compare(ref, cand, task=device_tasks.get_task(task or device_tasks.DEFAULT_TASK))
    return {"max_abs_diff": max_abs_diff(result), "top1_agreement": result["agreement"], "images": n}


def simplify(src: Path, dst: Path, tool: str, check_images: np.ndarray, tol: float = 1e-4,
             log: Callable[[str], None] = print, task: str | None = None) -> dict[str, Any]:
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
        diff = parity(run_onnx_outputs(src, check_images), run_onnx_outputs(tmp, check_images), task=task)
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
    example = torch.zeros(1, 3, h, w)
    task = task_for(meta)
    module = task.export_module(model, meta).eval()
    to_export, replaced = exportable(module, example)
    if replaced:
        log(f"adaptive pooling of {', '.join(replaced)} exported as its exact fixed-size equivalent (MatMul)")
    exporter = _torch_export(to_export, example, raw, opset, task.export_outputs(meta),
                             task.dynamic_axes(meta, dynamic_batch))
    probe = check_images[: min(len(check_images), 8)] if dynamic_batch else check_images[:1]
    simp = simplify(raw, path, simplifier, probe, log=log, task=task.name)
    raw.unlink(missing_ok=True)
    proto = onnx.load(str(path))
    set_metadata(proto, metadata_props(meta))
    onnx.checker.check_model(proto)
    atomic_write_bytes(path, proto.SerializeToString())
    result = parity(run_torch_outputs(module, check_images, task.export_outputs(meta)),
                    run_onnx_outputs(path, check_images), task=task.name)
    return {"exporter": exporter, "opset": opset, "dynamic_batch": dynamic_batch, "simplify": simp, "parity": result,
            "fixed_adaptive_pools": replaced}
