"""Shared builders for the runtime tests: tiny ONNX classifiers (onnx helper API, no torch) and bundles.

Test files import it as a plain module (`import runtime_fakes as H`, as tests/tiny_models.py is
imported): pytest puts tests/ on sys.path (rootdir conftest, default import mode).
"""

import json
import os

import numpy as np

# rsedge-bench options for a quick run in tests: no warm-up, three timed runs, no power sampling
FAST = ["--warmup", "0", "--iterations", "3", "--duration", "0", "--no-power"]

CLASSES = ("forest", "river", "urban")
MEAN = [0.485, 0.456, 0.406]
STD = [0.229, 0.224, 0.225]


def metadata_props(input_size=(16, 16), classes=CLASSES, precision="fp32"):
    return {
        "rsedge.task": "classification",
        "rsedge.classes": json.dumps(list(classes)),
        "rsedge.input_size": json.dumps(list(input_size)),
        "rsedge.mean": json.dumps(MEAN),
        "rsedge.std": json.dumps(STD),
        "rsedge.layout": "NCHW",
        "rsedge.color": "RGB",
        "rsedge.resize": "resize",
        "rsedge.version": "0.1.0",
        "rsedge.precision": precision,
    }


def make_classifier_onnx(path, input_size=(16, 16), classes=CLASSES, batch="batch", metadata=True, qdq=False,
                         channels=4, seed=0, features=None):
    """Conv(3x3) + Relu + GlobalAveragePool + Flatten + Gemm, batch axis dynamic unless `batch` is an int.
    features="first" / "last": the pooled features are a second output named "features", before / after "logits"."""
    from onnx import TensorProto, helper, numpy_helper, save

    rng = np.random.RandomState(seed)
    h, w = input_size
    n = len(classes)
    inits = [
        numpy_helper.from_array(rng.standard_normal((channels, 3, 3, 3)).astype(np.float32), "conv_w"),
        numpy_helper.from_array(rng.standard_normal((channels,)).astype(np.float32), "conv_b"),
        numpy_helper.from_array(rng.standard_normal((n, channels)).astype(np.float32), "fc_w"),
        numpy_helper.from_array(rng.standard_normal((n,)).astype(np.float32), "fc_b"),
    ]
    nodes = []
    conv_in = "input"
    if qdq:
        inits += [numpy_helper.from_array(np.array(1.0 / 32, dtype=np.float32), "q_scale"),
                  numpy_helper.from_array(np.array(0, dtype=np.int8), "q_zero")]
        nodes += [helper.make_node("QuantizeLinear", ["input", "q_scale", "q_zero"], ["input_q"], name="quant_in"),
                  helper.make_node("DequantizeLinear", ["input_q", "q_scale", "q_zero"], ["input_dq"],
                                   name="dequant_in")]
        conv_in = "input_dq"
    nodes += [
        helper.make_node("Conv", [conv_in, "conv_w", "conv_b"], ["conv"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["conv"], ["relu"], name="relu1"),
        helper.make_node("GlobalAveragePool", ["relu"], ["pool"], name="pool"),
        helper.make_node("Flatten", ["pool"], ["flat"], name="flatten", axis=1),
        helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["logits"], name="fc", transB=1),
    ]
    if features is not None:
        nodes.append(helper.make_node("Identity", ["flat"], ["features"], name="features"))
    graph = helper.make_graph(
        nodes, "tiny_classifier",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [batch, 3, h, w])],
        _outputs(helper, TensorProto, batch, n, channels, features),
        initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], producer_name="rsedge-tests")
    model.ir_version = 8
    if metadata:
        helper.set_model_props(model, metadata_props(input_size, classes, "int8-qdq" if qdq else "fp32"))
    save(model, path)
    return path


def _outputs(helper, TensorProto, batch, n, channels, features):
    logits = helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, n])
    if features is None:
        return [logits]
    feats = helper.make_tensor_value_info("features", TensorProto.FLOAT, [batch, channels])
    return [feats, logits] if features == "first" else [logits, feats]


def ort_logits(path, x):
    import onnxruntime as ort

    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    return sess.run(None, {"input": np.ascontiguousarray(x, dtype=np.float32)})[0]


def make_bundle(directory, input_size=(16, 16), n_eval=12, n_calib=10):
    """A bundle exactly as the host's writer lays it out, with a manifest over every file."""
    from rsedge.runtime.bundles.manifest import write_manifest

    os.makedirs(os.path.join(directory, "calib"))
    os.makedirs(os.path.join(directory, "eval"))
    fp32 = make_classifier_onnx(os.path.join(directory, "model_fp32.onnx"), input_size)
    make_classifier_onnx(os.path.join(directory, "model_int8_qdq.onnx"), input_size, qdq=True)
    rng = np.random.RandomState(1)
    h, w = input_size
    np.save(os.path.join(directory, "calib", "calib_00000.npy"), rng.standard_normal((n_calib, 3, h, w)).astype(
        np.float32))
    images = rng.standard_normal((n_eval, 3, h, w)).astype(np.float32)
    labels = ort_logits(fp32, images).argmax(axis=1).astype(np.int64)
    np.save(os.path.join(directory, "eval", "images.npy"), images)
    np.save(os.path.join(directory, "eval", "labels.npy"), labels)
    with open(os.path.join(directory, "preprocess.json"), "w") as f:
        json.dump({"task": "classification", "classes": list(CLASSES), "input_size": list(input_size),
                   "mean": MEAN, "std": STD, "layout": "NCHW", "color": "RGB", "resize": "resize"}, f)
    with open(os.path.join(directory, "labels.json"), "w") as f:
        json.dump(list(CLASSES), f)
    extra = {
        "versions": {"rsedge": "0.1.0"},
        "variants": [{"name": "fp32", "onnx": "model_fp32.onnx", "precision": "fp32"},
                     {"name": "int8-qdq", "onnx": "model_int8_qdq.onnx", "precision": "int8"}],
        "preprocess": "preprocess.json",
        "labels": "labels.json",
        "calibration": {"dir": "calib", "cache": None},
        "eval": {"images": "eval/images.npy", "labels": "eval/labels.npy"},
    }
    return write_manifest(directory, extra)


# ---- a fake TensorRT + CUDA, numpy-backed, to exercise the TensorRT code paths without a GPU ----------------

class FakeCuda:
    """cuda_api's interface over numpy: 'device' memory is a dict of byte arrays."""

    name = "fake-cuda"

    def __init__(self, device=None):
        self.device = device or {"name": "Fake Orin", "compute_capability": "8.7", "total_memory_mb": 8192.0}
        self.mem = {}
        self.next_ptr = 4096
        self.clock = 0.0
        self.closed = False
        self.free = 1 << 30

    def device_info(self):
        return dict(self.device)

    def versions(self):
        return {"cuda": "12.2", "cuda_driver": "12.2"}

    def mem_get_info(self):
        return self.free, 1 << 30

    def pinned_empty(self, shape, dtype):
        return np.zeros(shape, dtype=dtype)

    def free_pinned(self, arr):
        pass

    def device_alloc(self, nbytes):
        from rsedge.runtime.backends.cuda_api import DeviceBuffer

        ptr = self.next_ptr
        self.next_ptr += max(int(nbytes), 1) + 256
        self.mem[ptr] = np.zeros(max(int(nbytes), 1), dtype=np.uint8)
        self.free -= int(nbytes)
        return DeviceBuffer(ptr, nbytes, lambda: self.mem.pop(ptr))

    def stream(self):
        return object()

    def stream_handle(self, stream):
        return 7

    def destroy_stream(self, stream):
        pass

    def synchronize(self, stream):
        pass

    def htod_async(self, ptr, host, stream):
        raw = np.ascontiguousarray(host).reshape(-1).view(np.uint8)
        self.mem[ptr][:raw.size] = raw

    def dtoh_async(self, host, ptr, stream):
        flat = host.reshape(-1).view(np.uint8)
        flat[...] = self.mem[ptr][:flat.size]

    def htod(self, ptr, host):
        self.htod_async(ptr, host, None)

    def event(self):
        return {"t": 0.0}

    def record(self, event, stream):
        self.clock += 0.5
        event["t"] = self.clock

    def event_sync(self, event):
        pass

    def event_done(self, event):
        return True

    def elapsed_ms(self, start, end):
        return end["t"] - start["t"]

    def supports_graphs(self):
        return True

    def capture(self, stream, enqueue):
        return enqueue

    def launch(self, graph, stream):
        graph()

    def close(self):
        self.closed = True


def fake_logits(x, n_classes):
    """What the fake engine computes: class k gets (k + 1) x the sample mean."""
    means = x.reshape(x.shape[0], -1).mean(axis=1)
    return (means[:, None] * np.arange(1, n_classes + 1, dtype=np.float32)[None, :]).astype(np.float32)


def make_fake_trt(version="8.6.1", fast_fp16=True, fast_int8=True, calibrators=True, dla_cores=0, n_classes=3,
                  input_shape=(-1, 3, 16, 16), profile=((1, 3, 16, 16), (4, 3, 16, 16), (8, 3, 16, 16)),
                  parse_error=None):
    """A module-like object with the slice of the tensorrt API the runtime uses, for one version."""
    import types

    from rsedge.runtime.build.trt_compat import TrtFeatures

    feat = TrtFeatures(version)
    trt = types.SimpleNamespace(__version__=version)
    trt.calls = []
    trt.NetworkDefinitionCreationFlag = types.SimpleNamespace(EXPLICIT_BATCH=0)
    trt.MemoryPoolType = types.SimpleNamespace(WORKSPACE="WORKSPACE")
    trt.TensorIOMode = types.SimpleNamespace(INPUT="INPUT", OUTPUT="OUTPUT")
    trt.BuilderFlag = types.SimpleNamespace(FP16="FP16", INT8="INT8", GPU_FALLBACK="GPU_FALLBACK")
    trt.DeviceType = types.SimpleNamespace(DLA="DLA", GPU="GPU")
    trt.nptype = lambda dt: dt
    trt.init_libnvinfer_plugins = lambda logger, ns: True

    class Logger:
        WARNING, VERBOSE = "W", "V"

        def __init__(self, severity="W"):
            self.severity = severity

    trt.Logger = Logger
    if calibrators:
        class IInt8EntropyCalibrator2:
            def __init__(self):
                pass

        trt.IInt8EntropyCalibrator2 = IInt8EntropyCalibrator2

    io = {"input": (tuple(input_shape), np.float32), "logits": ((input_shape[0], n_classes), np.float32)}

    class Context:
        def __init__(self):
            self.shape = tuple(input_shape) if input_shape[0] >= 0 else None
            self.addresses = {}

        def _out_shape(self):
            return (self.shape[0], n_classes)

        # named tensors (>= 8.5)
        def set_input_shape(self, name, shape):
            trt.calls.append(("set_input_shape", name, shape))
            self.shape = tuple(shape)
            return True

        def get_tensor_shape(self, name):
            return self.shape if name == "input" else self._out_shape()

        def set_tensor_address(self, name, ptr):
            self.addresses[name] = ptr

        def execute_async_v3(self, stream_handle):
            trt.calls.append(("execute_async_v3", stream_handle))
            self._run(self.addresses["input"], self.addresses["logits"])
            return True

        # bindings (8.2)
        def set_binding_shape(self, index, shape):
            trt.calls.append(("set_binding_shape", index, shape))
            self.shape = tuple(shape)
            return True

        def get_binding_shape(self, index):
            return self.shape if index == 0 else self._out_shape()

        def execute_async_v2(self, bindings, stream_handle):
            trt.calls.append(("execute_async_v2", stream_handle))
            self._run(bindings[0], bindings[1])
            return True

        def _run(self, in_ptr, out_ptr):
            shape = self.shape if input_shape[0] < 0 else tuple(input_shape)
            n = int(np.prod(shape))
            x = trt.cuda.mem[in_ptr][:n * 4].view(np.float32).reshape(shape)
            y = fake_logits(x, n_classes).reshape(-1).view(np.uint8)
            trt.cuda.mem[out_ptr][:y.size] = y

    class Engine:
        def create_execution_context(self):
            return Context()

    if feat.named_tensors:
        Engine.num_io_tensors = 2
        Engine.get_tensor_name = lambda self, i: ["input", "logits"][i]
        Engine.get_tensor_mode = lambda self, name: "INPUT" if name == "input" else "OUTPUT"
        Engine.get_tensor_shape = lambda self, name: io[name][0]
        Engine.get_tensor_dtype = lambda self, name: io[name][1]
        Engine.get_tensor_profile_shape = lambda self, name, p: profile
    else:
        Engine.num_bindings = 2
        Engine.get_binding_name = lambda self, i: ["input", "logits"][i]
        Engine.binding_is_input = lambda self, i: i == 0
        Engine.get_binding_shape = lambda self, i: io[["input", "logits"][i]][0]
        Engine.get_binding_dtype = lambda self, i: io[["input", "logits"][i]][1]
        Engine.get_profile_shape = lambda self, p, i: profile

    class Runtime:
        def __init__(self, logger):
            self.DLA_core = None

        def deserialize_cuda_engine(self, data):
            trt.calls.append(("deserialize",))
            return Engine() if bytes(data) == b"fake-engine" else None

    trt.Runtime = Runtime

    # ---- builder side
    class Tensor:
        def __init__(self, name, shape):
            self.name, self.shape, self.dtype = name, shape, np.float32

    class Network:
        def __init__(self, flags):
            trt.calls.append(("create_network", flags))
            self.inputs, self.outputs = [], []

        num_inputs = property(lambda self: len(self.inputs))
        num_outputs = property(lambda self: len(self.outputs))

        def get_input(self, i):
            return self.inputs[i]

        def get_output(self, i):
            return self.outputs[i]

    class ParserError:
        def __init__(self, node, desc, name=None, op=None):
            self._node, self._desc = node, desc
            if name is not None:
                self.node_name = lambda: name
                self.node_operator = lambda: op

        def node(self):
            return self._node

        def desc(self):
            return self._desc

    class OnnxParser:
        def __init__(self, network, logger):
            self.network = network
            self.errors = []

        def parse_from_file(self, path):
            from rsedge.runtime.build.onnx_meta import read_onnx_info

            if parse_error is not None:
                self.errors.append(ParserError(*parse_error))
                return False
            info = read_onnx_info(path)
            for t in info["inputs"]:
                self.network.inputs.append(Tensor(t["name"], tuple(d if isinstance(d, int) else -1
                                                                   for d in t["shape"])))
            for t in info["outputs"]:
                self.network.outputs.append(Tensor(t["name"], tuple(d if isinstance(d, int) else -1
                                                                    for d in t["shape"])))
            return True

        num_errors = property(lambda self: len(self.errors))

        def get_error(self, i):
            return self.errors[i]

    class Profile:
        def __init__(self):
            self.shapes = {}

        def set_shape(self, name, low, opt, high):
            self.shapes[name] = (tuple(low), tuple(opt), tuple(high))

    class TimingCache:
        def __init__(self, data):
            if bytes(data) not in (b"", b"timing-v1"):
                raise RuntimeError("timing cache from another version")
            self.data = data

        def serialize(self):
            return b"timing-v1"

    class Config:
        def __init__(self):
            self.flags, self.profiles, self.int8_calibrator, self.calibration_profile = [], [], None, None
            self.cache = None
            self.default_device_type, self.DLA_core = "GPU", None

        def set_flag(self, flag):
            self.flags.append(flag)

        def add_optimization_profile(self, profile):
            self.profiles.append(profile)

        def set_calibration_profile(self, profile):
            self.calibration_profile = profile

        def create_timing_cache(self, data):
            return TimingCache(data)

        def set_timing_cache(self, cache, ignore_mismatch):
            self.cache = cache

        def get_timing_cache(self):
            return self.cache

    if feat.memory_pool_limit:
        Config.set_memory_pool_limit = lambda self, pool, nbytes: trt.calls.append(("pool", pool, nbytes))
    else:
        Config.max_workspace_size = property(lambda self: None,
                                             lambda self, v: trt.calls.append(("max_workspace_size", v)))

    class Builder:
        num_DLA_cores = dla_cores

        def __init__(self, logger):
            self.platform_has_fast_fp16 = fast_fp16
            self.platform_has_fast_int8 = fast_int8

        def create_network(self, flags):
            return Network(flags)

        def create_builder_config(self):
            trt.last_config = Config()
            return trt.last_config

        def create_optimization_profile(self):
            return Profile()

        def build_serialized_network(self, network, config):
            calib = config.int8_calibrator
            if calib is not None:
                cached = calib.read_calibration_cache()
                trt.calib_batches = 0
                if cached is None:
                    while calib.get_batch(["input"]) is not None:
                        trt.calib_batches += 1
                    calib.write_calibration_cache(b"calibration-table")
            return b"fake-engine"

    trt.Builder = Builder
    trt.OnnxParser = OnnxParser
    return trt


def install_fake_tensorrt(monkeypatch, trt, cuda):
    """Route the runtime's TensorRT and CUDA imports to the fakes."""
    from rsedge.runtime.backends import cuda_api
    from rsedge.runtime.backends import trt as backends_trt

    trt.cuda = cuda
    monkeypatch.setattr(backends_trt, "import_tensorrt", lambda: trt)
    monkeypatch.setattr(backends_trt, "load_cuda_api", lambda device=0: cuda)
    monkeypatch.setattr(cuda_api, "load_cuda_api", lambda device=0: cuda)
