"""Build a TensorRT engine from an ONNX on the device that will run it.

Engines are tied to one GPU and one TensorRT version, so a bundle carries ONNX files and the
device builds its own engines; this module is that builder. It lives in the runtime (not in
the host's export package) because a Jetson has neither torch nor onnx installed. The host CLI
calls `build_engine()` for `rsedge build`; on a device `python3 -m rsedge.runtime.build`
does the same.

Next to each engine goes a JSON sidecar (see sidecar.py) that records TensorRT version, GPU,
precision, I/O, build options, build time, the ONNX's SHA-256 and its preprocessing metadata.
"""

import argparse
import glob
import os
import sys
import time

import numpy as np

from ..bundles.manifest import sha256_file
from ..errors import RuntimeToolError
from ..fileio import atomic_write_bytes
from ..preprocess import onnx_metadata
from . import onnx_meta, trt_compat
from .sidecar import make_sidecar, write_sidecar

DEFAULT_WORKSPACE_MB = 1024


# ---- calibration data (pure numpy) ----------------------------------------------------------

def calibration_files(calib_dir):
    files = sorted(glob.glob(os.path.join(calib_dir, "calib_*.npy")))
    if not files:
        raise RuntimeToolError(f"no calib_*.npy files in {calib_dir} (the bundle's calibration set)")
    return files


def count_calibration_samples(calib_dir):
    return sum(int(np.load(f, mmap_mode="r").shape[0]) for f in calibration_files(calib_dir))


def iter_calibration_batches(calib_dir, batch, sample_shape=None):
    """Batches of exactly `batch` float32 samples across all calib_*.npy files, in order.

    Files may hold any number of samples; a last incomplete batch is dropped (TensorRT wants a
    constant calibration shape). `sample_shape` (C, H, W) is checked so a bundle made for
    another input size fails here with the file's name, not inside TensorRT.
    """
    pending = []
    count = 0
    for path in calibration_files(calib_dir):
        arr = np.load(path, allow_pickle=False)
        if arr.ndim < 2:
            raise RuntimeToolError(f"{path}: expected (N, C, H, W) samples, got shape {arr.shape}")
        if sample_shape is not None and tuple(arr.shape[1:]) != tuple(sample_shape):
            raise RuntimeToolError(f"{path} holds samples of shape {tuple(arr.shape[1:])}, the network input wants "
                                   f"{tuple(sample_shape)}")
        pending.append(arr.astype(np.float32, copy=False))
        count += arr.shape[0]
        while count >= batch:
            joined = np.concatenate(pending) if len(pending) > 1 else pending[0]
            yield np.ascontiguousarray(joined[:batch])
            rest = joined[batch:]
            pending = [rest] if rest.shape[0] else []
            count = rest.shape[0]


def make_entropy_calibrator(trt, cuda, calib_dir, batch, sample_shape, cache_path, log):
    """An IInt8EntropyCalibrator2 feeding the bundle's tensors; it writes and reuses `cache_path`.

    The class is defined here, not at module level, because its base comes from `trt`, which the
    runtime never imports at import time.
    """
    base = trt.IInt8EntropyCalibrator2
    nbytes = int(batch * np.prod(sample_shape) * 4)

    class EntropyCalibrator(base):
        def __init__(self):
            base.__init__(self)
            self._batches = None
            self._buffer = None
            self._done = 0

        def get_batch_size(self):
            return batch

        def get_batch(self, names):
            if self._batches is None:
                self._batches = iter_calibration_batches(calib_dir, batch, sample_shape)
                self._buffer = cuda.device_alloc(nbytes)
            try:
                data = next(self._batches)
            except StopIteration:
                log(f"calibration: {self._done} batches of {batch} done")
                self._buffer.free()
                return None
            cuda.htod(self._buffer.ptr, data)
            self._done += 1
            if self._done % 10 == 1:
                log(f"calibration batch {self._done} ...")
            return [self._buffer.ptr]

        def read_calibration_cache(self):
            if cache_path and os.path.isfile(cache_path):
                log(f"reusing calibration cache {cache_path}")
                with open(cache_path, "rb") as f:
                    return f.read()
            return None

        def write_calibration_cache(self, cache):
            if cache_path:
                atomic_write_bytes(cache_path, bytes(cache))
                log(f"wrote calibration cache {cache_path}")

    return EntropyCalibrator()


# ---- parser errors --------------------------------------------------------------------------

def format_parser_error(error, info):
    """'node 12 'Conv_12' (Conv): <description>' for one ONNX parser error, on any TensorRT.

    TensorRT 10 reports node names and operators itself; older versions give only the node
    index, which we resolve with the ONNX file's own node list.
    """
    index = error.node() if hasattr(error, "node") else None
    name = error.node_name() if hasattr(error, "node_name") else None
    op = error.node_operator() if hasattr(error, "node_operator") else None
    if name or op:
        where = "node {} '{}' ({})".format(index, name or "<unnamed>", op or "?")
    elif index is not None and index >= 0:
        where = onnx_meta.describe_node(info, index)
    else:
        where = "model"
    return f"{where}: {error.desc()}"


# ---- the build ------------------------------------------------------------------------------

def _dtype_name(trt, dtype):
    try:
        return np.dtype(trt.nptype(dtype)).name
    except TypeError:
        return str(dtype)


def build_engine(onnx_path, engine_path, precision="fp16", batch=(1, 1, 1), workspace_mb=DEFAULT_WORKSPACE_MB,
                 int8_from=None, calib_dir=None, calib_cache=None, timing_cache=None, dla_core=None,
                 metadata=None, log=print, verbose=False):
    """Build `engine_path` from `onnx_path` and write its sidecar; returns the sidecar dict.

    precision: fp32 | fp16 | int8 (int8 needs int8_from "qdq" or "calib"; without fast INT8 a
    calib build falls back to FP16 and says so). batch: (min, opt, max) or "N" / "min,opt,max".
    calib_dir: folder of calib_*.npy (default: calib/ next to the ONNX); calib_cache: file to
    reuse or write (default: next to the engine, named by ONNX and TensorRT version).
    timing_cache: file path, None for the default next to the engine, or "" to use none.
    dla_core: DLA core index (Xavier/Orin), GPU fallback on. metadata: preprocessing metadata
    for the sidecar; by default read from the ONNX (and preprocess.json beside it).
    """
    log = log or (lambda msg: None)
    if not os.path.isfile(onnx_path):
        raise RuntimeToolError(f"ONNX file {onnx_path} does not exist")
    batch = trt_compat.parse_batch(batch)
    info = onnx_meta.read_onnx_info(onnx_path)
    if metadata is None:
        metadata = onnx_metadata(onnx_path)

    from ..backends.cuda_api import load_cuda_api
    from ..backends.trt import import_tensorrt

    trt = import_tensorrt()
    feat = trt_compat.features(trt)
    if not feat.tested:
        log(f"warning: TensorRT {trt.__version__} is outside the tested range {trt_compat.TESTED_RANGE_TEXT}")
    cuda = load_cuda_api()
    try:
        # TensorRT objects live in _build's frame and are gone before the CUDA context is released.
        return _build(trt, feat, cuda, onnx_path, engine_path, precision, batch, workspace_mb, int8_from, calib_dir,
                      calib_cache, timing_cache, dla_core, metadata, info, log, verbose)
    finally:
        cuda.close()


def _build(trt, feat, cuda, onnx_path, engine_path, precision, batch, workspace_mb, int8_from, calib_dir,
           calib_cache, timing_cache, dla_core, metadata, info, log, verbose):
    device = cuda.device_info()
    logger = trt.Logger(trt.Logger.VERBOSE if verbose else trt.Logger.WARNING)
    trt.init_libnvinfer_plugins(logger, "")
    builder = trt.Builder(logger)
    network = builder.create_network(trt_compat.network_flags(trt, feat))
    parser = trt.OnnxParser(network, logger)
    log("parsing {} ({} nodes)".format(onnx_path, len(info["nodes"])))
    if not parser.parse_from_file(os.path.abspath(onnx_path)):
        errors = [format_parser_error(parser.get_error(i), info) for i in range(parser.num_errors)]
        raise RuntimeToolError("TensorRT {} could not parse {}:\n  {}".format(
            trt.__version__, onnx_path, "\n  ".join(errors or ["(no error details)"])))
    net_inputs = [network.get_input(i) for i in range(network.num_inputs)]
    net_outputs = [network.get_output(i) for i in range(network.num_outputs)]

    config = builder.create_builder_config()
    trt_compat.set_workspace(trt, config, feat, int(workspace_mb) * 2 ** 20)
    fast_fp16, fast_int8, source = trt_compat.platform_precisions(builder, feat, device["compute_capability"])
    plan = trt_compat.plan_precision(precision, int8_from, fast_fp16, fast_int8,
                                     trt_compat.calibrators_available(trt), feat,
                                     graph_fp16=trt_compat.graph_is_fp16(info))
    for note in plan["notes"]:
        log("note: " + note)
    if plan["fallback"]:
        log("warning: " + plan["fallback"])
    for flag in plan["flags"]:
        config.set_flag(getattr(trt.BuilderFlag, flag))

    shapes = {t.name: trt_compat.profile_shapes(t.name, tuple(t.shape), batch) for t in net_inputs}
    profile_doc = None
    if any(s is not None for s in shapes.values()):
        profile = builder.create_optimization_profile()
        profile_doc = {}
        for name, s in shapes.items():
            if s is not None:
                profile.set_shape(name, *s)
                profile_doc[name] = {"min": list(s[0]), "opt": list(s[1]), "max": list(s[2])}
        config.add_optimization_profile(profile)

    num_dla = getattr(builder, "num_DLA_cores", 0)
    trt_compat.validate_dla(dla_core, num_dla, plan["precision"])
    if dla_core is not None:
        config.default_device_type = trt.DeviceType.DLA
        config.DLA_core = int(dla_core)
        config.set_flag(trt.BuilderFlag.GPU_FALLBACK)

    engine_dir = os.path.dirname(os.path.abspath(engine_path))
    options = {"batch": list(batch), "workspace_mb": int(workspace_mb), "dla_core": dla_core,
               "gpu_fallback": dla_core is not None, "fast_precision_source": source}
    if plan["int8_from"] == "calib" and "INT8" in plan["flags"]:
        calib_dir = calib_dir or os.path.join(os.path.dirname(os.path.abspath(onnx_path)), "calib")
        if len(net_inputs) != 1:
            raise RuntimeToolError(f"INT8 calibration supports single-input models; this one has {len(net_inputs)}")
        first = net_inputs[0]
        dims = [int(d) for d in first.shape]
        sample_shape = tuple(dims[1:])
        available = count_calibration_samples(calib_dir)
        cb = dims[0] if dims[0] > 0 else max(1, min(batch[1], available))
        if available < cb:
            raise RuntimeToolError(f"{calib_dir} holds {available} calibration samples, fewer than one batch of {cb}")
        calib_cache = calib_cache or os.path.join(engine_dir, trt_compat.calib_cache_name(onnx_path,
                                                                                          trt.__version__))
        calibrator = make_entropy_calibrator(trt, cuda, calib_dir, cb, sample_shape, calib_cache, log)
        config.int8_calibrator = calibrator
        if shapes.get(first.name) is not None:
            calib_profile = builder.create_optimization_profile()
            fixed = tuple([cb] + list(sample_shape))
            calib_profile.set_shape(first.name, fixed, fixed, fixed)
            config.set_calibration_profile(calib_profile)
        options.update(calib_dir=os.path.basename(os.path.normpath(calib_dir)),
                       calib_cache=os.path.basename(calib_cache), calib_batch=cb,
                       calib_samples=available - available % cb)
        log(f"INT8 calibration over {available - available % cb} samples in batches of {cb} (entropy calibrator 2)")

    if timing_cache is None:
        timing_cache = os.path.join(engine_dir, trt_compat.timing_cache_name(
            trt.__version__, device["name"], device["compute_capability"]))
    if timing_cache:
        _attach_timing_cache(config, timing_cache, log)
        options["timing_cache"] = os.path.basename(timing_cache)

    log("building {} engine (batch {}..{}, opt {}) for {} with TensorRT {}: this takes minutes on a "
        "Jetson".format(plan["precision"].upper(), batch[0], batch[2], batch[1], device["name"], trt.__version__))
    t0 = time.time()
    serialized = builder.build_serialized_network(network, config)
    build_time = time.time() - t0
    if serialized is None:
        raise RuntimeToolError(f"TensorRT failed to build {engine_path} (see its messages above). Out of memory is the "
                               "usual cause on a Jetson: lower --workspace-mb, close other programs, add "
                               "swap")
    atomic_write_bytes(engine_path, serialized)
    if timing_cache:
        atomic_write_bytes(timing_cache, config.get_timing_cache().serialize())
    io_in = [{"name": t.name, "shape": [int(d) for d in t.shape], "dtype": _dtype_name(trt, t.dtype)}
             for t in net_inputs]
    io_out = [{"name": t.name, "shape": [int(d) for d in t.shape], "dtype": _dtype_name(trt, t.dtype)}
              for t in net_outputs]
    doc = make_sidecar(engine_path, trt.__version__, device, plan, io_in, io_out, options, build_time,
                       onnx_path, sha256_file(onnx_path), metadata, profile=profile_doc,
                       host=dict(cuda.versions(), hostname=_hostname()))
    write_sidecar(engine_path, doc)
    log(f"built {engine_path} in {build_time:.1f} s ({os.path.getsize(engine_path) / 2.0 ** 20:.1f} MB)")
    return doc


def probe_device():
    """What this device's TensorRT can build: version, GPU, fast FP16/INT8, calibrators, DLA cores."""
    from ..backends.cuda_api import load_cuda_api
    from ..backends.trt import import_tensorrt

    trt = import_tensorrt()
    feat = trt_compat.features(trt)
    cuda = load_cuda_api()
    try:
        return _probe(trt, feat, cuda)
    finally:
        cuda.close()


def _probe(trt, feat, cuda):
    device = cuda.device_info()
    builder = trt.Builder(trt.Logger(trt.Logger.WARNING))
    fast_fp16, fast_int8, source = trt_compat.platform_precisions(builder, feat, device["compute_capability"])
    return {"tensorrt_version": trt.__version__, "device": device, "fast_fp16": fast_fp16, "fast_int8": fast_int8,
            "fast_precision_source": source, "calibrators": trt_compat.calibrators_available(trt),
            "dla_cores": int(getattr(builder, "num_DLA_cores", 0) or 0)}


def _attach_timing_cache(config, path, log):
    """Reuse a timing cache when it loads; a cache from another GPU/TensorRT just starts empty."""
    data = b""
    if os.path.isfile(path):
        with open(path, "rb") as f:
            data = f.read()
    try:
        cache = config.create_timing_cache(data)
        config.set_timing_cache(cache, False)
        if data:
            log(f"reusing timing cache {path}")
    except Exception as e:  # noqa: BLE001 - TensorRT reports a foreign cache in version-specific ways
        log(f"timing cache {path} not usable here ({e}): starting a new one")
        cache = config.create_timing_cache(b"")
        config.set_timing_cache(cache, False)


def _hostname():
    import socket

    return socket.gethostname()


def default_engine_path(onnx_path, precision, batch):
    base = os.path.splitext(os.path.basename(onnx_path))[0]
    return os.path.join(os.path.dirname(os.path.abspath(onnx_path)), "engines",
                        f"{base}-{precision}-b{batch[2]}.engine")


def build_parser(prog="rsedge build"):
    from ..helpformat import HelpFormatter

    p = argparse.ArgumentParser(
        prog=prog, formatter_class=HelpFormatter,
        description="Build a TensorRT engine from an ONNX model on this device, with a JSON sidecar next to it "
                    "(TensorRT 8.2 to 10.x).")
    p.add_argument("onnx", help="the ONNX model (from `rsedge export` or a bundle)")
    p.add_argument("-o", "--output", help="engine path; default: engines/<model>-<precision>-b<max>.engine next "
                                          "to the ONNX")
    p.add_argument("--precision", choices=trt_compat.PRECISIONS, default="fp16",
                   help="engine precision; int8 needs --int8-from")
    p.add_argument("--int8-from", choices=trt_compat.INT8_SOURCES, default=None,
                   help="qdq: the ONNX has Q/DQ nodes (explicit quantization, works on 10.x); calib: calibrate "
                        "with the entropy calibrator on --calib-dir")
    p.add_argument("--calib-dir", default=None, help="folder of calib_*.npy tensors (N,C,H,W) float32; default: "
                                                     "calib/ next to the ONNX")
    p.add_argument("--calib-cache", default=None, help="calibration cache to reuse or write; default: next to the "
                                                       "engine, named by model and TensorRT version")
    p.add_argument("--batch", default="1", help="N (any batch 1..N, tuned for N) or MIN,OPT,MAX for the "
                                                "optimization profile")
    p.add_argument("--workspace-mb", type=int, default=DEFAULT_WORKSPACE_MB,
                   help="builder workspace limit; Jetson CPU and GPU share RAM, so keep it small enough to "
                        "avoid the OOM killer (512 on a 4 GB Nano)")
    p.add_argument("--timing-cache", default=None, help="timing cache file; default: next to the engine, named by "
                                                        "TensorRT version and GPU; 'none' disables it")
    p.add_argument("--dla", type=int, default=None, metavar="CORE",
                   help="build for DLA core CORE (Xavier/Orin), with GPU fallback; needs fp16 or int8")
    p.add_argument("--verbose", action="store_true", help="TensorRT's verbose log")
    return p


def main_build(argv=None, prog="rsedge build"):
    args = build_parser(prog).parse_args(argv)
    try:
        batch = trt_compat.parse_batch(args.batch)
        engine = args.output or default_engine_path(args.onnx, args.precision, batch)
        timing = "" if (args.timing_cache or "").lower() == "none" else args.timing_cache
        build_engine(args.onnx, engine, precision=args.precision, batch=batch, workspace_mb=args.workspace_mb,
                     int8_from=args.int8_from, calib_dir=args.calib_dir, calib_cache=args.calib_cache,
                     timing_cache=timing, dla_core=args.dla, log=_print, verbose=args.verbose)
    except RuntimeToolError as e:
        sys.stderr.write(f"error: {e}\n")
        return 2
    return 0


def _print(msg):
    print(msg)
    sys.stdout.flush()


if __name__ == "__main__":
    sys.exit(main_build(prog="python3 -m rsedge.runtime.build.trt_build"))
