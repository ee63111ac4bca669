"""The one small interface every backend implements, and the choice of backend.

Modelled on Polygraphy's runners: a runner is created cheaply, `load()` does the expensive
work, `infer()` maps numpy inputs to numpy outputs, `close()` frees everything. Benchmarks use
`prepare(batch)` instead of `infer()`: it binds a fixed input once and returns a `run()` that
does nothing but execute, so the harness adds no copies or allocations to what it times.
"""

import collections
import os

import numpy as np

from .errors import RuntimeToolError

TensorSpec = collections.namedtuple("TensorSpec", ["name", "shape", "dtype"])
TensorSpec.__doc__ = "An input or output: shape is a tuple with -1 for dynamic axes; dtype a numpy dtype."

ENGINE_EXTENSIONS = (".engine", ".plan", ".trt")
ONNX_EXTENSIONS = (".onnx",)
BACKENDS = ("auto", "tensorrt", "onnxruntime")


class Prepared:
    """A bound inference for one batch size; `run()` returns None or (h2d, compute, d2h) in ms."""

    def __init__(self, run, batch, close=None):
        self.run = run
        self.batch = batch
        self._close = close

    def close(self):
        if self._close is not None:
            self._close()
            self._close = None


class Runner:
    backend = "base"

    def __init__(self):
        self.metadata = {}
        self.info = {}
        self.loaded = False

    def load(self):
        raise NotImplementedError

    def inputs(self):
        raise NotImplementedError

    def outputs(self):
        raise NotImplementedError

    def batch_range(self):
        """(smallest, largest) batch this model accepts; largest None means unbounded."""
        dim = self.inputs()[0].shape[0]
        return (dim, dim) if dim > 0 else (1, None)

    def infer(self, feed):
        """feed: one array (single-input models) or {name: array}; returns the list of outputs."""
        raise NotImplementedError

    def prepare(self, batch, cuda_graph=False, spin_wait=False):
        raise NotImplementedError

    def close(self):
        pass

    def __enter__(self):
        if not self.loaded:
            self.load()
        return self

    def __exit__(self, *exc):
        self.close()


def as_feed(runner, feed):
    """Normalize an array or dict into {input name: contiguous array of the input's dtype}."""
    specs = runner.inputs()
    if not isinstance(feed, dict):
        if len(specs) != 1:
            raise RuntimeToolError("this model has {} inputs ({}): pass a dict".format(
                len(specs), ", ".join(s.name for s in specs)))
        feed = {specs[0].name: feed}
    out = {}
    for spec in specs:
        if spec.name not in feed:
            raise RuntimeToolError(f"missing input {spec.name!r}")
        out[spec.name] = np.ascontiguousarray(feed[spec.name], dtype=spec.dtype)
    return out


def check_batch(runner, batch):
    low, high = runner.batch_range()
    if batch < low or (high is not None and batch > high):
        raise RuntimeToolError("batch {} is outside what this model accepts ({}..{}){}".format(
            batch, low, high if high is not None else "any",
            ": it was exported/built with a fixed batch" if low == high else ": rebuild the engine with a "
            "larger --batch max"))


def random_inputs(specs, batch, seed=0):
    """Deterministic random inputs of batch `batch`; non-batch dims must be static."""
    rng = np.random.RandomState(seed)
    feed = {}
    for spec in specs:
        rest = tuple(spec.shape[1:])
        if any(d is None or d < 0 for d in rest):
            raise RuntimeToolError(f"input {spec.name!r} has dynamic non-batch dimensions {spec.shape}: "
                                   "cannot make benchmark data")
        shape = (batch,) + rest
        dtype = np.dtype(spec.dtype)
        if dtype.kind == "f":
            feed[spec.name] = rng.standard_normal(shape).astype(dtype)
        elif dtype.kind == "b":
            feed[spec.name] = rng.randint(0, 2, size=shape).astype(dtype)
        else:
            feed[spec.name] = rng.randint(0, 8, size=shape).astype(dtype)
    return feed


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
        from .backends_trt import TrtRunner

        if providers:
            raise RuntimeToolError("--providers applies to ONNX Runtime, not to TensorRT engines")
        runner = TrtRunner(model_path, log=log)
    else:
        from .backends_ort import OrtRunner

        runner = OrtRunner(model_path, providers=providers, threads=threads)
    runner.load()
    runner.info["backend_reason"] = reason
    return runner
