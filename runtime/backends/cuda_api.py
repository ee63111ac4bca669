"""One small CUDA interface over pycuda (JetPack 4, Python 3.6) and cuda-python (newer JetPacks).

cuda-python has no Python 3.6 wheels, and pycuda is awkward to build on JetPack 6, so the
TensorRT backend and the INT8 calibrator talk to this adapter and never to either library.
Both share the device's primary context with TensorRT (pycuda retains it explicitly; the
runtime API uses it by default), so there is one context per process, as trtexec has.
"""

import ctypes

import numpy as np

from ..errors import BackendUnavailable


def load_cuda_api(device=0):
    """The first available binding, cuda-python preferred; BackendUnavailable if neither works."""
    errors = []
    for cls in (CudaPythonApi, PyCudaApi):
        try:
            return cls(device)
        except ImportError as e:
            errors.append(f"{cls.name}: {e}")
    raise BackendUnavailable("TensorRT needs pycuda (JetPack 4: pip3 install pycuda) or cuda-python "
                             "(pip install cuda-python) to move data to the GPU; neither imports here ({})".format(
                                 "; ".join(errors)))


def _text(raw):
    """cuda-python returns C strings as bytes."""
    return raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)


class DeviceBuffer:
    def __init__(self, ptr, nbytes, free):
        self.ptr = int(ptr)
        self.nbytes = nbytes
        self._free = free

    def free(self):
        if self._free is not None:
            self._free()
            self._free = None


class PyCudaApi:
    name = "pycuda"

    def __init__(self, device=0):
        import pycuda.driver as cuda

        self.cuda = cuda
        cuda.init()
        self._device = cuda.Device(device)
        self._context = self._device.retain_primary_context()
        self._context.push()
        self._pinned = []

    def device_info(self):
        major, minor = self._device.compute_capability()
        return {"name": self._device.name(), "compute_capability": f"{major}.{minor}",
                "total_memory_mb": self._device.total_memory() / 2.0 ** 20}

    def versions(self):
        import pycuda

        built = self.cuda.get_version()
        driver = self.cuda.get_driver_version()
        return {"cuda": ".".join(str(x) for x in built[:2]), "cuda_driver": f"{driver // 1000}.{(driver % 1000) // 10}",
                "pycuda": getattr(pycuda, "VERSION_TEXT", None)}

    def mem_get_info(self):
        return self.cuda.mem_get_info()

    def pinned_empty(self, shape, dtype):
        return self.cuda.pagelocked_empty(shape, dtype)

    def free_pinned(self, arr):
        """pycuda frees page-locked arrays when they are garbage collected."""

    def device_alloc(self, nbytes):
        alloc = self.cuda.mem_alloc(max(int(nbytes), 1))
        return DeviceBuffer(int(alloc), nbytes, alloc.free)

    def stream(self):
        return self.cuda.Stream()

    @staticmethod
    def stream_handle(stream):
        return stream.handle

    def destroy_stream(self, stream):
        """pycuda destroys a stream when it is garbage collected."""

    def synchronize(self, stream):
        stream.synchronize()

    def htod_async(self, ptr, host, stream):
        self.cuda.memcpy_htod_async(ptr, host, stream)

    def dtoh_async(self, host, ptr, stream):
        self.cuda.memcpy_dtoh_async(host, ptr, stream)

    def htod(self, ptr, host):
        self.cuda.memcpy_htod(ptr, np.ascontiguousarray(host))

    def event(self):
        return self.cuda.Event()

    @staticmethod
    def record(event, stream):
        event.record(stream)

    @staticmethod
    def event_sync(event):
        event.synchronize()

    @staticmethod
    def event_done(event):
        return event.query()

    @staticmethod
    def elapsed_ms(start, end):
        return end.time_since(start)

    def supports_graphs(self):
        return hasattr(self.cuda.Stream, "begin_capture")

    def capture(self, stream, enqueue):
        """Record what enqueue() puts on the stream into an instantiated CUDA graph (pycuda >= 2022.1)."""
        stream.begin_capture()
        try:
            enqueue()
        finally:
            graph = stream.end_capture()
        return graph.instance()

    @staticmethod
    def launch(graph_exec, stream):
        graph_exec.launch(stream)

    def close(self):
        if self._context is not None:
            self._context.pop()
            self._context.detach()
            self._context = None


class CudaPythonApi:
    name = "cuda-python"

    def __init__(self, device=0):
        try:
            from cuda.bindings import runtime as cudart
        except ImportError:
            from cuda import cudart
        self.rt = cudart
        self._check(cudart.cudaSetDevice(device))
        self._check(cudart.cudaFree(0))
        self._device = device
        self._host = {}

    def _check(self, result):
        err = result[0]
        if err != self.rt.cudaError_t.cudaSuccess:
            raise RuntimeError(f"CUDA error {_text(self.rt.cudaGetErrorName(err)[1])}")
        rest = result[1:]
        if not rest:
            return None
        return rest[0] if len(rest) == 1 else rest

    def device_info(self):
        prop = self._check(self.rt.cudaGetDeviceProperties(self._device))
        return {"name": _text(prop.name).split("\x00")[0].strip(), "compute_capability": f"{prop.major}.{prop.minor}",
                "total_memory_mb": prop.totalGlobalMem / 2.0 ** 20}

    def versions(self):
        runtime = self._check(self.rt.cudaRuntimeGetVersion())
        driver = self._check(self.rt.cudaDriverGetVersion())
        try:
            import cuda as cuda_pkg

            pkg = getattr(cuda_pkg, "__version__", None)
        except ImportError:
            pkg = None
        return {"cuda": f"{runtime // 1000}.{(runtime % 1000) // 10}",
                "cuda_driver": f"{driver // 1000}.{(driver % 1000) // 10}", "cuda-python": pkg}

    def mem_get_info(self):
        free, total = self._check(self.rt.cudaMemGetInfo())
        return free, total

    def pinned_empty(self, shape, dtype):
        dtype = np.dtype(dtype)
        count = int(np.prod(shape)) if len(shape) else 1
        nbytes = max(count * dtype.itemsize, 1)
        ptr = self._check(self.rt.cudaMallocHost(nbytes))
        raw = (ctypes.c_uint8 * nbytes).from_address(int(ptr))
        arr = np.frombuffer(raw, dtype=dtype, count=count).reshape(shape)
        self._host[arr.ctypes.data] = ptr
        return arr

    def free_pinned(self, arr):
        ptr = self._host.pop(arr.ctypes.data, None)
        if ptr is not None:
            self._check(self.rt.cudaFreeHost(ptr))

    def device_alloc(self, nbytes):
        ptr = self._check(self.rt.cudaMalloc(max(int(nbytes), 1)))
        return DeviceBuffer(int(ptr), nbytes, lambda: self._check(self.rt.cudaFree(ptr)))

    def stream(self):
        return self._check(self.rt.cudaStreamCreate())

    @staticmethod
    def stream_handle(stream):
        return int(stream)

    def destroy_stream(self, stream):
        self._check(self.rt.cudaStreamDestroy(stream))

    def synchronize(self, stream):
        self._check(self.rt.cudaStreamSynchronize(stream))

    def htod_async(self, ptr, host, stream):
        self._check(self.rt.cudaMemcpyAsync(ptr, host.ctypes.data, host.nbytes,
                                            self.rt.cudaMemcpyKind.cudaMemcpyHostToDevice, stream))

    def dtoh_async(self, host, ptr, stream):
        self._check(self.rt.cudaMemcpyAsync(host.ctypes.data, ptr, host.nbytes,
                                            self.rt.cudaMemcpyKind.cudaMemcpyDeviceToHost, stream))

    def htod(self, ptr, host):
        host = np.ascontiguousarray(host)
        self._check(self.rt.cudaMemcpy(ptr, host.ctypes.data, host.nbytes,
                                       self.rt.cudaMemcpyKind.cudaMemcpyHostToDevice))

    def event(self):
        return self._check(self.rt.cudaEventCreate())

    def record(self, event, stream):
        self._check(self.rt.cudaEventRecord(event, stream))

    def event_sync(self, event):
        self._check(self.rt.cudaEventSynchronize(event))

    def event_done(self, event):
        err = self.rt.cudaEventQuery(event)[0]
        if err == self.rt.cudaError_t.cudaErrorNotReady:
            return False
        self._check((err,))
        return True

    def elapsed_ms(self, start, end):
        return self._check(self.rt.cudaEventElapsedTime(start, end))

    def supports_graphs(self):
        return hasattr(self.rt, "cudaStreamBeginCapture")

    def capture(self, stream, enqueue):
        mode = self.rt.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal
        self._check(self.rt.cudaStreamBeginCapture(stream, mode))
        try:
            enqueue()
        finally:
            graph = self._check(self.rt.cudaStreamEndCapture(stream))
        return self._check(self.rt.cudaGraphInstantiateWithFlags(graph, 0))

    def launch(self, graph_exec, stream):
        self._check(self.rt.cudaGraphLaunch(graph_exec, stream))

    def close(self):
        for ptr in list(self._host.values()):
            self._check(self.rt.cudaFreeHost(ptr))
        self._host = {}
