"""The JSON sidecar written next to every engine, and the check made before loading one.

A TensorRT engine only runs on the GPU model and TensorRT version that built it; feeding it to
another one fails deep inside deserialization, or worse, crashes. The sidecar records where and
how the engine was built, so a mismatch becomes a clear "rebuild on this device" before
TensorRT sees the file. It also carries the model's preprocessing metadata, which TensorRT
cannot store in the engine.
"""

import os

from ..bundles.manifest import sha256_file
from ..errors import RebuildOnDevice
from ..fileio import read_json, utc_now, write_json

FORMAT = "rsedge-engine/1"


def sidecar_path(engine_path):
    """engines/fp32-fp16-b8.engine -> engines/fp32-fp16-b8.json"""
    return os.path.splitext(engine_path)[0] + ".json"


def make_sidecar(engine_path, trt_version, device, plan, inputs, outputs, build_options, build_time_s,
                 onnx_path, onnx_sha256, metadata, profile=None, host=None):
    """The sidecar document; `device` is {"name", "compute_capability"} of the building GPU."""
    return {
        "format": FORMAT,
        "engine": os.path.basename(engine_path),
        "engine_bytes": os.path.getsize(engine_path),
        "engine_sha256": sha256_file(engine_path),
        "tensorrt_version": str(trt_version),
        "device": {"name": device["name"], "compute_capability": device["compute_capability"]},
        "precision": plan["precision"],
        "requested_precision": plan["requested"],
        "int8_from": plan["int8_from"],
        "builder_flags": list(plan["flags"]),
        "fallback": plan["fallback"],
        "inputs": inputs,
        "outputs": outputs,
        "profile": profile,
        "build_options": build_options,
        "build_time_s": round(float(build_time_s), 3),
        "built": utc_now(),
        "onnx": {"file": os.path.basename(onnx_path), "sha256": onnx_sha256},
        "metadata": metadata,
        "host": host or {},
    }


def write_sidecar(engine_path, doc):
    return write_json(sidecar_path(engine_path), doc)


def load_sidecar(engine_path):
    path = sidecar_path(engine_path)
    if not os.path.isfile(path):
        return None
    try:
        doc = read_json(path)
    except ValueError as e:
        raise RebuildOnDevice(f"sidecar {path} is not valid JSON ({e}): rebuild on this device") from e
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise RebuildOnDevice("{} is not an rsedge engine sidecar (format {!r}): rebuild on this device".format(
            path, doc.get("format") if isinstance(doc, dict) else None))
    return doc


def mismatches(doc, trt_version, device):
    """Reasons this engine cannot run here (empty if it can), comparing TensorRT and GPU."""
    problems = []
    if str(doc.get("tensorrt_version")) != str(trt_version):
        problems.append("built with TensorRT {}, this device has {}".format(doc.get("tensorrt_version"), trt_version))
    built_on = doc.get("device") or {}
    if built_on.get("compute_capability") != device.get("compute_capability"):
        problems.append("built for compute capability {}, this GPU is {}".format(
            built_on.get("compute_capability"), device.get("compute_capability")))
    elif built_on.get("name") != device.get("name"):
        problems.append("built on a {}, this GPU is a {}".format(built_on.get("name"), device.get("name")))
    return problems


def file_problems(doc, engine_path, check_hash=True):
    """Size, then hash: a truncated or replaced engine is caught before TensorRT reads it."""
    if not os.path.isfile(engine_path):
        return [f"engine file {engine_path} does not exist"]
    size = os.path.getsize(engine_path)
    if doc.get("engine_bytes") is not None and size != doc["engine_bytes"]:
        return ["engine file has {} bytes, its sidecar says {} (truncated or replaced)".format(
            size, doc["engine_bytes"])]
    if check_hash and doc.get("engine_sha256") and sha256_file(engine_path) != doc["engine_sha256"]:
        return ["engine file content does not match its sidecar's SHA-256 (damaged or replaced)"]
    return []


def rebuild_hint(doc, engine_path):
    onnx = (doc or {}).get("onnx", {}).get("file") or "MODEL.onnx"
    options = (doc or {}).get("build_options") or {}
    args = ["--precision", (doc or {}).get("requested_precision") or "fp16"]
    if (doc or {}).get("int8_from"):
        args += ["--int8-from", doc["int8_from"]]
    if options.get("batch"):
        args += ["--batch", ",".join(str(b) for b in options["batch"])]
    return "rsedge build {} {} -o {}   (or: python3 -m rsedge.runtime.build ...)".format(
        onnx, " ".join(args), engine_path)


def check_engine(engine_path, trt_version, device, check_hash=True):
    """Raise RebuildOnDevice if the engine's sidecar says it was not built for this device.

    Returns the sidecar, or None when there is none (the caller warns: nothing to check).
    """
    doc = load_sidecar(engine_path)
    if doc is None:
        return None
    problems = mismatches(doc, trt_version, device) + file_problems(doc, engine_path, check_hash)
    if problems:
        raise RebuildOnDevice("{} cannot run here: {}. Rebuild on this device: {}".format(
            engine_path, "; ".join(problems), rebuild_hint(doc, engine_path)))
    return doc


def reusable(doc, engine_path, trt_version, device, onnx_sha256, options):
    """True if an existing engine was built here, from this ONNX, with these options."""
    if doc is None or not os.path.isfile(engine_path):
        return False
    if mismatches(doc, trt_version, device) or file_problems(doc, engine_path, check_hash=False):
        return False
    if (doc.get("onnx") or {}).get("sha256") != onnx_sha256:
        return False
    built = doc.get("build_options") or {}
    return all(built.get(k) == v for k, v in options.items())

