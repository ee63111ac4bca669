"""ONNX Runtime backend: TensorRT, CUDA or CPU execution provider, the best available unless told.

It runs the exported ONNX directly, so it is both the reference on the host and the fallback
on a device without TensorRT. Timing is end to end on the host (ONNX Runtime hides its copies).
"""

import os

import numpy as np

from ..errors import BackendUnavailable, RuntimeToolError
from ..preprocess import merge_metadata, normalize_metadata, read_preprocess_json
from .base import Outputs, Prepared, Runner, TensorSpec, as_feed, check_batch, random_inputs

PREFERENCE = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
SHORT_NAMES = {"tensorrt": "TensorrtExecutionProvider", "trt": "TensorrtExecutionProvider",
               "cuda": "CUDAExecutionProvider", "cpu": "CPUExecutionProvider"}
_DTYPES = {
    "tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
    "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(int8)": np.int8, "tensor(uint8)": np.uint8,
    "tensor(bool)": np.bool_,
}


def import_onnxruntime():
    try:
        import onnxruntime
    except ImportError as e:
        raise BackendUnavailable("onnxruntime is not installed (pip install onnxruntime, or onnxruntime-gpu; on "
                                 "Jetson use the wheel from the Jetson Zoo)") from e
    return onnxruntime


def choose_providers(available, requested=None):
    """(providers in priority order, reason in words).

    Unrequested, every preferred provider this build has is listed in order TensorRT > CUDA >
    CPU, so nodes the first cannot run fall back to the next.
    """
    available = list(available)
    if requested:
        chosen = []
        for name in requested:
            full = SHORT_NAMES.get(name.lower(), name)
            if full not in available:
                raise RuntimeToolError("execution provider {} is not available in this onnxruntime build "
                                       "(available: {})".format(full, ", ".join(available)))
            chosen.append(full)
        return chosen, "requested with --providers"
    chosen = [p for p in PREFERENCE if p in available]
    if not chosen:
        chosen = available[:1]
    return chosen, "{} is the fastest provider this onnxruntime offers (available: {})".format(
        chosen[0], ", ".join(available))


def _dim(d):
    return d if isinstance(d, int) and d >= 0 else -1


class OrtRunner(Runner):
    backend = "onnxruntime"

    def __init__(self, model_path, providers=None, threads=None, provider_options=None, log_severity=None):
        """log_severity: ONNX Runtime's (0 verbose .. 4 fatal; None: its default, warnings)."""
        Runner.__init__(self)
        self.log_severity = log_severity
        self.model_path = model_path
        self.requested_providers = providers
        self.threads = threads
        self.provider_options = provider_options
        self.session = None

    def load(self):
        ort = import_onnxruntime()
        providers, reason = choose_providers(ort.get_available_providers(), self.requested_providers)
        options = ort.SessionOptions()
        if self.threads:
            options.intra_op_num_threads = int(self.threads)
        if self.log_severity is not None:
            options.log_severity_level = int(self.log_severity)
        provider_args = providers
        if "TensorrtExecutionProvider" in providers and not self.provider_options:
            cache = os.path.join(os.path.expanduser("~"), ".cache", "rsedge", "ort-trt")
            provider_args = [(p, {"trt_engine_cache_enable": True, "trt_engine_cache_path": cache})
                             if p == "TensorrtExecutionProvider" else p for p in providers]
        elif self.provider_options:
            provider_args = list(zip(providers, self.provider_options))
        try:
            self.session = ort.InferenceSession(self.model_path, sess_options=options, providers=provider_args)
        except Exception as e:  # noqa: BLE001 - onnxruntime's own exception types do not share a base
            raise RuntimeToolError(f"ONNX Runtime could not load {self.model_path}: {e}") from e
        used = self.session.get_providers()
        own = normalize_metadata(self.session.get_modelmeta().custom_metadata_map)
        self.metadata = merge_metadata(own, read_preprocess_json(os.path.dirname(os.path.abspath(self.model_path))))
        self._inputs = [TensorSpec(i.name, tuple(_dim(d) for d in i.shape), np.dtype(_DTYPES.get(i.type, np.float32)))
                        for i in self.session.get_inputs()]
        self._outputs = [TensorSpec(o.name, tuple(_dim(d) for d in o.shape), np.dtype(_DTYPES.get(o.type, np.float32)))
                         for o in self.session.get_outputs()]
        self.info = {
            "backend": self.backend,
            "provider": used[0] if used else None,
            "providers": used,
            "provider_reason": reason,
            "precision": self.metadata.get("precision", "fp32"),
            "threads": self.threads,
            "onnxruntime": ort.__version__,
        }
        if self.requested_providers is None and providers and used and used[0] != providers[0]:
            self.info["provider_reason"] += f"; {providers[0]} failed to initialize, running on {used[0]}"
        self.loaded = True
        return self

    def infer(self, feed):
        feed = as_feed(self, feed)
        return Outputs([o.name for o in self._outputs], self.session.run(None, feed))

    def prepare(self, batch, cuda_graph=False, spin_wait=False):
        if cuda_graph or spin_wait:
            raise RuntimeToolError("--cuda-graph and --spin-wait apply to TensorRT engines, not ONNX Runtime")
        check_batch(self, batch)
        feed = random_inputs(self._inputs, batch)
        session = self.session

        def run():
            session.run(None, feed)

        return Prepared(run, batch)

    def close(self):
        self.session = None
        self.loaded = False
