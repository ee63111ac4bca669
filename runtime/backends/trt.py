"""TensorRT backend: deserialize an engine built on this device and run it like trtexec does.

Pinned host buffers and device buffers are allocated once for the profile's largest batch; one
stream carries the asynchronous copies and the inference; CUDA events around the three stages
give host-to-device, compute and device-to-host times apart. The engine's sidecar is checked
before TensorRT sees the file, so an engine from another GPU or TensorRT version is refused
with "rebuild on this device" instead of failing inside deserialization.
"""

import os

import numpy as np

from ..build import sidecar as sidecar_mod
from ..build import trt_compat
from ..errors import BackendUnavailable, RebuildOnDevice, RuntimeToolError
from .base import Outputs, Prepared, Runner, TensorSpec, as_feed, check_batch, random_inputs
from .cuda_api import load_cuda_api


def import_tensorrt():
    try:
        import tensorrt
    except ImportError as e:
        raise BackendUnavailable("TensorRT's Python package is not importable here (it comes with JetPack on a "
                                 "Jetson: python3-libnvinfer; on x86: pip install tensorrt, or NVIDIA's "
                                 "container)") from e
    return tensorrt


class TrtRunner(Runner):
    backend = "tensorrt"

    def __init__(self, engine_path, log=None, check_hash=True):
        Runner.__init__(self)
        self.engine_path = engine_path
        self.log = log or (lambda msg: None)
        self.check_hash = check_hash
        self.cuda = None
        self._buffers = []
        self._pinned = []

    def load(self):
        trt = import_tensorrt()
        self.trt = trt
        self.feat = trt_compat.features(trt)
        self.cuda = load_cuda_api()
        device = self.cuda.device_info()
        side = sidecar_mod.check_engine(self.engine_path, trt.__version__, device, check_hash=self.check_hash)
        if side is None:
            name = os.path.basename(sidecar_mod.sidecar_path(self.engine_path))
            self.log(f"warning: {self.engine_path} has no sidecar ({name}): cannot check that it was built on this "
                     "device")
        free_before = self.cuda.mem_get_info()[0]
        with open(self.engine_path, "rb") as f:
            data = f.read()
        self._logger = trt.Logger(trt.Logger.WARNING)
        trt.init_libnvinfer_plugins(self._logger, "")
        self._runtime = trt.Runtime(self._logger)
        dla = ((side or {}).get("build_options") or {}).get("dla_core")
        if dla is not None:
            self._runtime.DLA_core = int(dla)
        try:
            engine = self._runtime.deserialize_cuda_engine(data)
        except Exception as e:  # noqa: BLE001 - any failure here means the same thing: rebuild
            engine = None
            self.log(f"TensorRT: {e}")
        if engine is None:
            hint = sidecar_mod.rebuild_hint(side, self.engine_path)
            raise RebuildOnDevice(f"TensorRT {trt.__version__} could not deserialize {self.engine_path}: it was built "
                                  "for another GPU or TensorRT version, or the file is damaged. Rebuild on this "
                                  f"device: {hint}")
        self.engine = engine
        self.context = engine.create_execution_context()
        self.tensors = trt_compat.engine_io(trt, engine, self.feat)
        self._in = [t for t in self.tensors if t["is_input"]]
        self._out = [t for t in self.tensors if not t["is_input"]]
        self._max_batch = self._batch_limits()[1]
        self._allocate()
        self.stream = self.cuda.stream()
        self.device_memory_mb = (free_before - self.cuda.mem_get_info()[0]) / 2.0 ** 20
        self.metadata = dict((side or {}).get("metadata") or {})
        self.sidecar = side
        versions = self.cuda.versions()
        self.info = {
            "backend": self.backend,
            "provider": "TensorRT {} on {} (sm {}{})".format(trt.__version__, device["name"],
                                                             device["compute_capability"],
                                                             f", DLA {dla}" if dla is not None else ""),
            "precision": (side or {}).get("precision", "unknown (no sidecar)"),
            "tensorrt": trt.__version__,
            "cuda_binding": self.cuda.name,
            "device": device,
            "api": "named tensors" if self.feat.named_tensors else "bindings",
        }
        self.info.update(versions)
        self.loaded = True
        return self

    def _batch_limits(self):
        first = self._in[0]
        if first["shape"][0] >= 0:
            return first["shape"][0], first["shape"][0]
        if first["profile"] is None:
            raise RuntimeToolError("engine input {!r} is dynamic but has no optimization profile".format(
                first["name"]))
        return first["profile"][0][0], first["profile"][2][0]

    def batch_range(self):
        return self._batch_limits()

    def _input_shape(self, tensor, batch):
        return (batch,) + tuple(tensor["shape"][1:])

    def _set_batch(self, batch):
        for t in self._in:
            if t["shape"][0] < 0:
                trt_compat.set_input_shape(self.context, t, self._input_shape(t, batch), self.feat)
        return {t["name"]: trt_compat.output_shape(self.context, t, self.feat) for t in self._out}

    def _allocate(self):
        """Host (pinned) and device buffers for the largest batch, reused for every smaller one."""
        out_shapes = self._set_batch(self._max_batch)
        self._host = {}
        self._dev = {}
        for t in self.tensors:
            shape = self._input_shape(t, self._max_batch) if t["is_input"] else out_shapes[t["name"]]
            count = int(np.prod(shape))
            host = self.cuda.pinned_empty((count,), t["dtype"])
            self._pinned.append(host)
            self._host[t["name"]] = host
            buf = self.cuda.device_alloc(host.nbytes)
            self._buffers.append(buf)
            self._dev[t["name"]] = buf.ptr
        self._enqueue = trt_compat.make_enqueue(self.context, self.tensors, self._dev, self.feat)

    def inputs(self):
        return [TensorSpec(t["name"], t["shape"], t["dtype"]) for t in self._in]

    def outputs(self):
        return [TensorSpec(t["name"], t["shape"], t["dtype"]) for t in self._out]

    def _views(self, batch, out_shapes):
        views = {}
        for t in self._in:
            shape = self._input_shape(t, batch)
            views[t["name"]] = self._host[t["name"]][:int(np.prod(shape))].reshape(shape)
        for t in self._out:
            shape = out_shapes[t["name"]]
            views[t["name"]] = self._host[t["name"]][:int(np.prod(shape))].reshape(shape)
        return views

    def infer(self, feed):
        feed = as_feed(self, feed)
        batch = feed[self._in[0].get("name")].shape[0]
        high = self.batch_range()[1]
        if batch > high:
            parts = [self.infer({k: v[i:i + high] for k, v in feed.items()}) for i in range(0, batch, high)]
            return Outputs([t["name"] for t in self._out],
                           [np.concatenate([p[j] for p in parts]) for j in range(len(self._out))])
        check_batch(self, batch)
        out_shapes = self._set_batch(batch)
        views = self._views(batch, out_shapes)
        cuda, stream = self.cuda, self.stream
        for t in self._in:
            views[t["name"]][...] = feed[t["name"]]
            cuda.htod_async(self._dev[t["name"]], views[t["name"]], stream)
        self._enqueue(cuda.stream_handle(stream))
        for t in self._out:
            cuda.dtoh_async(views[t["name"]], self._dev[t["name"]], stream)
        cuda.synchronize(stream)
        return Outputs([t["name"] for t in self._out], [np.array(views[t["name"]]) for t in self._out])

    def prepare(self, batch, cuda_graph=False, spin_wait=False):
        """A run() timing H2D, compute and D2H apart with CUDA events, like trtexec.

        With cuda_graph the enqueue is captured once into a CUDA graph and replayed (trtexec
        --useCudaGraph); with spin_wait the host polls the last event instead of blocking in
        the driver (trtexec --useSpinWait), which trims wake-up latency.
        """
        check_batch(self, batch)
        out_shapes = self._set_batch(batch)
        views = self._views(batch, out_shapes)
        for name, value in random_inputs(self.inputs(), batch).items():
            views[name][...] = value
        cuda, stream = self.cuda, self.stream
        handle = cuda.stream_handle(stream)
        enqueue = self._enqueue
        # One plain run first: TensorRT finishes shape-dependent setup outside the timed loop
        # and outside any graph capture.
        enqueue(handle)
        cuda.synchronize(stream)
        compute = lambda: enqueue(handle)
        if cuda_graph:
            if not cuda.supports_graphs():
                raise RuntimeToolError("--cuda-graph needs cuda-python or pycuda >= 2022.1")
            try:
                graph = cuda.capture(stream, compute)
            except Exception as e:  # noqa: BLE001 - capture fails in driver-specific ways
                raise RuntimeToolError(f"CUDA graph capture failed ({e}); run without --cuda-graph") from e
            compute = lambda: cuda.launch(graph, stream)
        inputs = [(self._dev[t["name"]], views[t["name"]]) for t in self._in]
        outputs = [(views[t["name"]], self._dev[t["name"]]) for t in self._out]
        events = [cuda.event() for _ in range(4)]
        e0, e1, e2, e3 = events
        record, htod, dtoh, elapsed = cuda.record, cuda.htod_async, cuda.dtoh_async, cuda.elapsed_ms
        event_done, event_sync = cuda.event_done, cuda.event_sync

        def run():
            record(e0, stream)
            for ptr, host in inputs:
                htod(ptr, host, stream)
            record(e1, stream)
            compute()
            record(e2, stream)
            for host, ptr in outputs:
                dtoh(host, ptr, stream)
            record(e3, stream)
            if spin_wait:
                while not event_done(e3):
                    pass
            else:
                event_sync(e3)
            return elapsed(e0, e1), elapsed(e1, e2), elapsed(e2, e3)

        return Prepared(run, batch)

    def close(self):
        for buf in self._buffers:
            buf.free()
        self._buffers = []
        if self.cuda is not None:
            for arr in self._pinned:
                self.cuda.free_pinned(arr)
        self._pinned = []
        self._host = {}
        if self.cuda is not None and getattr(self, "stream", None) is not None:
            self.cuda.destroy_stream(self.stream)
            self.stream = None
        for attr in ("context", "engine", "_runtime"):
            if hasattr(self, attr):
                setattr(self, attr, None)
        if self.cuda is not None:
            self.cuda.close()
            self.cuda = None
        self.loaded = False
