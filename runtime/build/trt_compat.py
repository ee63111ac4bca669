"""One adapter over TensorRT 8.0 (JetPack 4.6), 8.2 (JetPack 4.6.1/4.6.2), 8.5 (JetPack 5),
8.6 (JetPack 6.0), 10.x (JetPack 6.1/6.2, x86) and 11.x (x86).

What moves between versions: 8.0 and 8.2 have only the bindings API (`execute_async_v2`,
`get_binding_shape`, `max_workspace_size`; 8.0 already has `build_serialized_network`,
`parse_from_file` and timing caches); 8.4 adds `set_memory_pool_limit`; 8.5 adds named
tensors (`num_io_tensors`, `set_input_shape`, `set_tensor_address`, `execute_async_v3`); 10.0
removes the bindings API, `build_engine` and `max_workspace_size` and makes every network
explicit-batch; 10.1 deprecates the INT8 calibrators (explicit Q/DQ quantization replaces
them); 10.5 deprecates `platform_has_fast_fp16/int8`; 11.0 removes weak typing altogether
(no `BuilderFlag.FP16/INT8`, no calibrators, no `platform_has_fast_*`): every network is
strongly typed, so the precision of an engine is the precision of the ONNX graph it is built
from (an FP32 graph builds FP32, a Q/DQ graph builds INT8 where its Q/DQ pairs say so, an FP16
graph builds FP16).

Everything that can be decided without a GPU (version dispatch, batch/profile shapes, which
precision to build, cache file names) is plain logic here, tested everywhere; the functions that
touch TensorRT objects take the `trt` module as an argument so tests can pass a fake.
"""

import os
import re

from ..errors import RuntimeToolError

PRECISIONS = ("fp32", "fp16", "int8")
INT8_SOURCES = ("qdq", "calib")
# [first, end) of the versions whose API this adapter is written and tested against
TESTED_RANGE = ((8, 0), (12, 0))
TESTED_RANGE_TEXT = "8.0 .. 11.x"


def parse_version(text):
    """'8.2.1.8' -> (8, 2, 1, 8); missing parts are 0, trailing text ignored."""
    parts = [int(p) for p in re.findall(r"\d+", str(text))[:4]]
    if not parts:
        raise ValueError(f"not a version: {text!r}")
    return tuple(parts + [0] * (4 - len(parts)))


class TrtFeatures:
    """Which API a TensorRT version offers."""

    def __init__(self, version_text):
        v = parse_version(version_text)
        self.version = str(version_text)
        self.v = v
        self.named_tensors = v >= (8, 5)
        self.memory_pool_limit = v >= (8, 4)
        self.explicit_batch_flag = v < (10, 0)
        self.build_engine_api = v < (10, 0)
        self.calibrators_deprecated = v >= (10, 1)
        self.fast_precision_queries_deprecated = v >= (10, 5)
        self.weak_typing = v < (11, 0)
        self.calibrators_removed = v >= (11, 0)
        self.tested = TESTED_RANGE[0] <= v < TESTED_RANGE[1]

    def __repr__(self):
        return f"TrtFeatures({self.version})"


def features(trt):
    return TrtFeatures(trt.__version__)


def calibrators_available(trt):
    """TensorRT 11 removes the implicit-quantization calibrators altogether."""
    return hasattr(trt, "IInt8EntropyCalibrator2") and not features(trt).calibrators_removed


def network_flags(trt, feat):
    if feat.explicit_batch_flag:
        return 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    return 0


def set_workspace(trt, config, feat, nbytes):
    if feat.memory_pool_limit:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(nbytes))
    else:
        config.max_workspace_size = int(nbytes)


# ---- batch and optimization profile ---------------------------------------------------------

def parse_batch(value):
    """'8' -> (1, 8, 8): any batch up to 8, tuned for 8; '1,4,8' -> (1, 4, 8) = min, opt, max."""
    if isinstance(value, int):
        items = [value]
    elif isinstance(value, (tuple, list)):
        items = [int(v) for v in value]
    else:
        try:
            items = [int(v) for v in str(value).split(",") if v.strip()]
        except ValueError:
            raise RuntimeToolError(f"--batch takes N or MIN,OPT,MAX, got {value!r}") from None
    if len(items) == 1:
        items = [1, items[0], items[0]]
    if len(items) != 3:
        raise RuntimeToolError(f"--batch takes N or MIN,OPT,MAX, got {value!r}")
    low, opt, high = items
    if not 1 <= low <= opt <= high:
        raise RuntimeToolError(f"--batch needs 1 <= min <= opt <= max, got {low},{opt},{high}")
    return (low, opt, high)


def profile_shapes(name, shape, batch):
    """(min, opt, max) shapes of one network input for batch=(min, opt, max), or None if static.

    Only the batch axis may be dynamic: rsedge exports fixed H and W, and a profile over other
    axes would be a guess. A static batch must equal the requested one.
    """
    shape = [int(d) for d in shape]
    if not shape:
        raise RuntimeToolError(f"input {name!r} is a scalar; expected a batched tensor")
    rest = shape[1:]
    if any(d < 0 for d in rest):
        raise RuntimeToolError(f"input {name!r} has dynamic non-batch dimensions {shape}: re-export with a fixed input "
                               "size")
    low, opt, high = batch
    if shape[0] >= 0:
        if (low, opt, high) != (shape[0],) * 3:
            raise RuntimeToolError("input {!r} was exported with a fixed batch of {} but --batch {},{},{} was "
                                   "asked: re-export with a dynamic batch axis, or build with --batch {b},{b},{b}"
                                   .format(name, shape[0], low, opt, high, b=shape[0]))
        return None
    return (tuple([low] + rest), tuple([opt] + rest), tuple([high] + rest))


# ---- precision ------------------------------------------------------------------------------

def _cc(cc):
    if isinstance(cc, str):
        major, _, minor = cc.partition(".")
        return int(major), int(minor or 0)
    return tuple(cc)


def fast_precisions_from_cc(cc):
    """(fast fp16, fast int8) from the compute capability, TensorRT's support matrix.

    FP16: 5.3 (Nano), 6.0, 6.2 (TX2), 7.0 and newer; not 6.1 (consumer Pascal).
    INT8: 6.1, 7.0 and newer (Xavier 7.2, Orin 8.7); not 5.3 (Nano), 6.0 or 6.2 (TX2).
    """
    major, minor = _cc(cc)
    fp16 = (major, minor) in ((5, 3), (6, 0), (6, 2)) or major >= 7
    int8 = (major, minor) == (6, 1) or major >= 7
    return fp16, int8


def platform_precisions(builder, feat, cc):
    """(fast fp16, fast int8, source): the builder's own answer while it has one, else the CC table."""
    if (feat.weak_typing and not feat.fast_precision_queries_deprecated
            and hasattr(builder, "platform_has_fast_int8")):
        return bool(builder.platform_has_fast_fp16), bool(builder.platform_has_fast_int8), "builder"
    fp16, int8 = fast_precisions_from_cc(cc)
    return fp16, int8, f"compute capability {cc}"


def plan_precision(requested, int8_from, fast_fp16, fast_int8, calibrators, feat, graph_fp16=False):
    """What to build for a requested precision on this GPU and TensorRT.

    Returns {"precision": built, "requested", "int8_from", "flags": [BuilderFlag names],
    "fallback": why the build differs from the request or None, "notes": [...]}. INT8 builds
    also allow FP16 (as `trtexec --int8 --fp16`), so layers left in float run in half.
    From TensorRT 11 there are no precision flags: `graph_fp16` says whether the ONNX graph
    itself is FP16 (strong typing builds what the graph declares).
    """
    if requested not in PRECISIONS:
        raise RuntimeToolError("precision must be one of {}, got {!r}".format(", ".join(PRECISIONS), requested))
    if requested != "int8" and int8_from:
        raise RuntimeToolError("--int8-from only applies to --precision int8")
    plan = {"precision": requested, "requested": requested, "int8_from": None, "flags": [], "fallback": None,
            "notes": []}
    if requested == "fp32":
        return plan
    if requested == "fp16":
        return _plan_fp16(plan, fast_fp16, feat, graph_fp16)
    if int8_from not in INT8_SOURCES:
        raise RuntimeToolError("--precision int8 needs --int8-from qdq (a Q/DQ ONNX, explicit quantization) or "
                               "--int8-from calib (calibrate on the bundle's calibration tensors)")
    plan["int8_from"] = int8_from
    if int8_from == "calib" and (not calibrators or feat.calibrators_removed):
        raise RuntimeToolError(f"TensorRT {feat.version} has removed the INT8 calibrators: use --int8-from qdq "
                               "(the bundle's Q/DQ ONNX, explicit quantization)")
    if not fast_int8:
        if int8_from == "qdq":
            raise RuntimeToolError("this GPU has no fast INT8 (Jetson TX2 and Nano do not), so a Q/DQ model cannot "
                                   "be built; build the FP32 ONNX with --precision fp16 instead")
        plan.update(precision="fp16", flags=["FP16"],
                    fallback="this GPU has no fast INT8 (Jetson TX2 and Nano do not): built FP16 instead")
        return plan
    if int8_from == "calib" and feat.calibrators_deprecated:
        plan["notes"].append("INT8 calibration is deprecated since TensorRT 10.1; --int8-from qdq is the "
                             "lasting path")
    if not feat.weak_typing:
        plan["notes"].append(f"TensorRT {feat.version} is strongly typed: the layers between Q/DQ pairs run in "
                             "INT8, the others in the graph's own precision")
        return plan
    plan["flags"] = ["INT8", "FP16"] if fast_fp16 else ["INT8"]
    return plan


def _plan_fp16(plan, fast_fp16, feat, graph_fp16):
    if not feat.weak_typing:
        if not graph_fp16:
            raise RuntimeToolError(
                f"TensorRT {feat.version} builds the precision the ONNX graph declares (strong typing, no FP16 "
                "flag): convert the FP32 ONNX to FP16 first (NVIDIA ModelOpt: python -m modelopt.onnx.autocast "
                "--onnx_path model.onnx --output_path model_fp16.onnx) and build that, or build --precision fp32")
        plan["notes"].append("the ONNX graph is FP16: built as typed (strong typing)")
        return plan
    plan["flags"] = ["FP16"]
    if not fast_fp16:
        plan["notes"].append("this GPU has no fast FP16; TensorRT will keep FP32 where FP16 is slower")
    return plan


def graph_is_fp16(info):
    """Whether an ONNX graph (onnx_meta.read_onnx_info) is itself FP16: its metadata says so, or a
    graph input or output is float16. Strongly typed TensorRT (11.x) builds such a graph in FP16."""
    meta = info.get("metadata") or {}
    if meta.get("rsedge.precision", "").lower() in ("fp16", "float16"):
        return True
    return any(t.get("dtype") == "float16" for t in list(info.get("inputs", [])) + list(info.get("outputs", [])))


def validate_dla(dla_core, num_dla_cores, precision):
    """DLA runs FP16 or INT8 only, and only on boards that have DLA cores (Xavier, Orin)."""
    if dla_core is None:
        return
    if num_dla_cores <= 0:
        raise RuntimeToolError(f"--dla {dla_core} asked, but this device has no DLA cores (only Xavier and Orin AGX/NX "
                               "do)")
    if not 0 <= dla_core < num_dla_cores:
        raise RuntimeToolError(f"--dla {dla_core}: this device has DLA cores 0..{num_dla_cores - 1}")
    if precision == "fp32":
        raise RuntimeToolError("DLA runs FP16 or INT8 only: use --precision fp16 or int8 with --dla")


# ---- cache files ----------------------------------------------------------------------------

def slug(text):
    return re.sub(r"[^A-Za-z0-9]+", "-", str(text)).strip("-").lower() or "unknown"


def timing_cache_name(trt_version, gpu_name, cc):
    """Timing caches are per GPU and TensorRT version; the name keeps them apart in one folder."""
    return "timing-trt{}-{}-sm{}.cache".format(trt_version, slug(gpu_name), str(cc).replace(".", ""))


def calib_cache_name(onnx_path, trt_version):
    """Calibration caches are not reliably portable across TensorRT versions either."""
    base = os.path.splitext(os.path.basename(onnx_path))[0]
    return f"calib-{base}-trt{trt_version}.cache"


# ---- engine I/O, both APIs ------------------------------------------------------------------

def engine_io(trt, engine, feat):
    """[{name, index, is_input, shape, dtype, profile}] for an engine, whichever API it has."""
    import numpy as np

    tensors = []
    if feat.named_tensors:
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            is_input = engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT
            shape = tuple(engine.get_tensor_shape(name))
            profile = None
            if is_input and any(d < 0 for d in shape):
                if hasattr(engine, "get_tensor_profile_shape"):
                    profile = engine.get_tensor_profile_shape(name, 0)
                else:
                    profile = engine.get_profile_shape(0, name)
            tensors.append({"name": name, "index": i, "is_input": is_input, "shape": shape,
                            "dtype": np.dtype(trt.nptype(engine.get_tensor_dtype(name))),
                            "profile": _profile_tuple(profile)})
    else:
        for i in range(engine.num_bindings):
            is_input = engine.binding_is_input(i)
            shape = tuple(engine.get_binding_shape(i))
            dynamic = is_input and any(d < 0 for d in shape)
            tensors.append({"name": engine.get_binding_name(i), "index": i, "is_input": is_input, "shape": shape,
                            "dtype": np.dtype(trt.nptype(engine.get_binding_dtype(i))),
                            "profile": _profile_tuple(engine.get_profile_shape(0, i)) if dynamic else None})
    return tensors


def _profile_tuple(profile):
    if profile is None:
        return None
    return tuple(tuple(int(d) for d in shape) for shape in profile)


def set_input_shape(context, tensor, shape, feat):
    ok = (context.set_input_shape(tensor["name"], tuple(shape)) if feat.named_tensors
          else context.set_binding_shape(tensor["index"], tuple(shape)))
    if ok is False:
        raise RuntimeToolError("TensorRT refused shape {} for input {!r} (profile {})".format(
            tuple(shape), tensor["name"], tensor["profile"]))


def output_shape(context, tensor, feat):
    if feat.named_tensors:
        return tuple(context.get_tensor_shape(tensor["name"]))
    return tuple(context.get_binding_shape(tensor["index"]))


def make_enqueue(context, tensors, pointers, feat):
    """A function enqueue(stream_handle) running the engine on device buffers `pointers` (by name)."""
    if feat.named_tensors:
        for t in tensors:
            context.set_tensor_address(t["name"], int(pointers[t["name"]]))

        def enqueue(stream_handle):
            if not context.execute_async_v3(stream_handle):
                raise RuntimeError("TensorRT execute_async_v3 failed")
        return enqueue
    bindings = [0] * len(tensors)
    for t in tensors:
        bindings[t["index"]] = int(pointers[t["name"]])

    def enqueue_v2(stream_handle):
        if not context.execute_async_v2(bindings, stream_handle):
            raise RuntimeError("TensorRT execute_async_v2 failed")
    return enqueue_v2
