"""Runners behind one interface (`base`: Runner, Outputs, TensorSpec), and the choice of backend.

One module per backend: `ort` (ONNX Runtime), `trt` (TensorRT, both binding APIs), `pytorch`
(host only), and `cuda_api` (the CUDA calls TensorRT needs, through pycuda or cuda-python). A
new backend is a Runner subclass in its own module whose `infer()` returns `Outputs`, plus a
line in `select_backend` / `open_runner` below if files of a new kind should open with it.
Backend libraries are imported when a runner is loaded, never here.
"""

import os

from ..errors import RuntimeToolError
from .base import Outputs, Prepared, Runner, TensorSpec, as_feed, check_batch, random_inputs

__all__ = ["Outputs", "Prepared", "Runner", "TensorSpec", "as_feed", "check_batch", "random_inputs",
           "select_backend", "open_runner", "BACKENDS", "ENGINE_EXTENSIONS", "ONNX_EXTENSIONS"]

ENGINE_EXTENSIONS = (".engine", ".plan", ".trt")
ONNX_EXTENSIONS = (".onnx",)
BACKENDS = ("auto", "tensorrt", "onnxruntime")


def select_backend(model_path, backend="auto"):
    """(backend, reason in words) for a model file; the CLI prints the reason."""
    ext = os.path.splitext(model_path)[1].lower()
    if backend not in BACKENDS:
        raise RuntimeToolError("unknown backend {!r} (choose from {})".format(backend, ", ".join(BACKENDS)))
    if backend == "tensorrt":
        if ext not in ENGINE_EXTENSIONS:
            raise RuntimeToolError("--backend tensorrt runs serialized engines ({}), not {}: build one first with "
                                   "`rsedge build {}`".format("/".join(ENGINE_EXTENSIONS), ext or "this file",
                                                              model_path))
        return backend, "requested with --backend tensorrt"
    if backend == "onnxruntime":
        if ext not in ONNX_EXTENSIONS:
            raise RuntimeToolError(f"--backend onnxruntime runs .onnx files, not {ext or model_path}")
        return backend, "requested with --backend onnxruntime"
    if ext in ENGINE_EXTENSIONS:
        return "tensorrt", f"{os.path.basename(model_path)} is a serialized TensorRT engine"
    if ext in ONNX_EXTENSIONS:
        return "onnxruntime", (f"{os.path.basename(model_path)} is an ONNX model, which ONNX Runtime runs directly "
                               "(build a TensorRT engine with `rsedge build` for the fastest path on a GPU)")
    raise RuntimeToolError("cannot tell how to run {}: expected .onnx, {} or a bundle directory".format(
        model_path, ", ".join(ENGINE_EXTENSIONS)))


def open_runner(model_path, backend="auto", providers=None, threads=None, log=None):
    """Create and load the runner for a model file; runner.info says which backend and why."""
    if not os.path.exists(model_path):
        raise RuntimeToolError(f"model file {model_path} does not exist")
    name, reason = select_backend(model_path, backend)
    if name == "tensorrt":
        from .trt import TrtRunner

        if providers:
            raise RuntimeToolError("--providers applies to ONNX Runtime, not to TensorRT engines")
        runner = TrtRunner(model_path, log=log)
    else:
        from .ort import OrtRunner

        runner = OrtRunner(model_path, providers=providers, threads=threads)
    runner.load()
    runner.info["backend_reason"] = reason
    return runner
