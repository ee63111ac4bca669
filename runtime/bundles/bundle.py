"""A deployment bundle on the device: verify it, build the engines it lacks, list what to benchmark.

Layout (written by the host's bundle writer): manifest.json, the ONNX variants (fp32, and Q/DQ
int8 ones each with the backend it is made for in `target`: "tensorrt" or "onnxruntime"),
preprocess.json, labels.json, calib/calib_*.npy, eval/images.npy + eval/labels.npy.
Engines built here go to engines/<variant>-<precision>-b<max>.engine with a JSON sidecar;
engines/ is not covered by the manifest.

Which engines: the fp32 variant at FP32 and FP16, and at INT8 by calibration where the GPU has
fast INT8 and TensorRT still has calibrators; the Q/DQ variant at INT8 where the GPU has fast
INT8. On a TX2 or Nano (no fast INT8) the INT8 builds are skipped with that reason: their FP16
fallback would be the fp32 variant's FP16 engine again. A variant made for ONNX Runtime's CPU
kernels (uint8 activations) gets no engine; without TensorRT, ONNX Runtime runs fp32 and it.

A variant may be carried as an uplink pack (`rsedge bundle --pack`): its `pack` names the
.rspack the manifest lists, its `onnx` the path under unpacked/ where `Bundle.open` unpacks it
(numpy only) before anything builds or runs; unpacked/ is the device's, like engines/.
"""

import json
import os

from ..build import sidecar as sidecar_mod
from ..build import trt_compat
from ..errors import ManifestError, RuntimeToolError
from ..fileio import atomic_write_text
from ..preprocess import normalize_metadata
from ..tasks import task_for
from .manifest import sha256_file, verify_manifest

ENGINE_DIR = "engines"
UNPACK_DIR = "unpacked"
SOURCE_STAMP = "source.sha256"  # in a variant's unpacked folder: the SHA-256 of the pack it came from


def is_bundle(path):
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, "manifest.json"))


def engine_name(variant, precision, max_batch):
    return f"{variant}-{precision}-b{max_batch}.engine"


def precision_warnings(caps):
    """What a report must say loudly about this GPU's precisions: a TX2 or Nano has no INT8 at all,
    so a bundle's INT8 variants give no INT8 engine there and FP16 is the fastest it offers."""
    if caps is None or caps.get("fast_int8", True):
        return []
    device = caps.get("device") or {}
    return ["NO INT8 on this GPU ({}, sm {}): Jetson TX2 and Nano have no INT8 at all, so no INT8 engine was built "
            "and FP16 is the fastest precision here".format(device.get("name", "?"),
                                                           device.get("compute_capability", "?"))]


class Bundle:
    def __init__(self, directory, manifest):
        self.directory = directory
        self.manifest = manifest
        self.warnings = []  # said loudly in the report of every run of this bundle

    @classmethod
    def open(cls, directory, log=None):
        """Verify the manifest (every file's size and SHA-256) and return the bundle."""
        log = log or (lambda msg: None)
        manifest = verify_manifest(directory)
        ver = manifest["verification"]
        log("bundle {}: {} files verified (SHA-256){}".format(
            directory, ver["files"], "; not in the manifest: " + ", ".join(ver["unlisted"]) if ver["unlisted"] else ""))
        bundle = cls(directory, manifest)
        for variant in bundle.variants:
            if variant.get("pack"):
                bundle.unpack(variant, log)
        return bundle

    def unpack(self, variant, log):
        """Unpack a variant's pack where its `onnx` points (unpacked/<variant>/), unless that folder
        was unpacked from the same pack bytes. Engines of the variant found when it is unpacked
        anew were built from another pack (their sidecars know only the graph file, which another
        pack of the same model leaves unchanged): they are removed."""
        from ..pack import read_pack, unpack_to_onnx

        rel, digest = variant.get("onnx") or "", self.sha256(variant["pack"])
        parts = rel.split("/")
        if len(parts) != 3 or parts[0] != UNPACK_DIR or ".." in parts or "" in parts:
            raise ManifestError("{}: variant {!r} must unpack to {}/<folder>/<file>.onnx, not {!r}".format(
                self.directory, variant.get("name"), UNPACK_DIR, rel))
        folder = os.path.dirname(self.path(rel))
        stamp = os.path.join(folder, SOURCE_STAMP)
        old = _read_text(stamp)
        if old == digest and os.path.isfile(self.path(rel)):
            log("{}: unpacked from {} before".format(rel, variant["pack"]))
            return
        self._remove_engines(variant["name"], log)
        pack = read_pack(self.path(variant["pack"]))
        if pack.graph_file != parts[2]:
            raise ManifestError("{}: {} holds {}, the manifest expects {}".format(
                self.directory, variant["pack"], pack.graph_file, parts[2]))
        unpack_to_onnx(pack, folder)
        atomic_write_text(stamp, digest + "\n")
        log("{}: unpacked from {} ({} bytes sent, {} bytes of weights)".format(
            rel, variant["pack"], self.manifest["files"][variant["pack"]]["bytes"], pack.header["weights"]["length"]))

    def _remove_engines(self, name, log):
        folder = os.path.join(self.directory, ENGINE_DIR)
        stale = sorted(f for f in os.listdir(folder) if f.startswith(name + "-")) if os.path.isdir(folder) else []
        for f in stale:
            os.remove(os.path.join(folder, f))
        if stale:
            log("{}: unpacked anew: removed the engines built from another pack ({})".format(name, ", ".join(stale)))

    def path(self, rel):
        return os.path.join(self.directory, *rel.split("/"))

    @property
    def variants(self):
        return list(self.manifest.get("variants") or [])

    def sha256(self, rel):
        """A sent file's SHA-256 from the manifest; a file unpacked here, of the file itself."""
        entry = self.manifest["files"].get(rel)
        return entry["sha256"] if entry is not None else sha256_file(self.path(rel))

    def calib_dir(self):
        rel = (self.manifest.get("calibration") or {}).get("dir")
        return self.path(rel) if rel and os.path.isdir(self.path(rel)) else None

    def class_names(self):
        rel = self.manifest.get("labels")
        if not rel:
            return self.preprocess().get("classes")
        with open(self.path(rel), "r") as f:
            labels = json.load(f)
        if isinstance(labels, dict):
            labels = labels.get("classes", labels.get("labels"))
        return list(labels) if labels is not None else None

    def preprocess(self):
        rel = self.manifest.get("preprocess")
        if not rel:
            return {}
        with open(self.path(rel), "r") as f:
            return normalize_metadata(json.load(f))

    def task(self):
        """The bundle's device task, from the task its preprocess.json names (classification by default)."""
        return task_for(self.preprocess())

    def engine_path(self, name):
        return os.path.join(self.directory, ENGINE_DIR, name)


def _read_text(path):
    try:
        with open(path, "r") as f:
            return f.read().strip()
    except (IOError, OSError):
        return None


def _weak_typing(caps):
    version = caps.get("tensorrt_version")
    return True if not version else trt_compat.TrtFeatures(version).weak_typing


def variants_for(bundle, backend):
    """(variants made for `backend`, [(variant, why not)] for the others).

    A variant without a `target` (fp32, or an int8 variant of a bundle written before targets
    existed) runs on every backend.
    """
    chosen, skipped = [], []
    for v in bundle.variants:
        target = v.get("target")
        if target is None or target == backend:
            chosen.append(v)
        else:
            skipped.append((v, "made for {}, not {}".format(target, backend)))
    return chosen, skipped


def plan_engines(bundle, caps, batch, precisions=None):
    """[{variant, onnx, precision, int8_from, engine, skip}] for this device's capabilities.

    caps: {"fast_fp16", "fast_int8", "calibrators", "tensorrt_version"}; precisions limits the
    engine precisions (None: every one the device supports).
    """
    items = []
    for v in variants_for(bundle, "tensorrt")[0]:
        if v.get("precision") == "int8":
            candidates = [("int8", "qdq")]
        else:
            candidates = [("fp32", None), ("fp16", None), ("int8", "calib")]
        for precision, source in candidates:
            if precisions and precision not in precisions:
                continue
            skip = None
            if precision == "fp16" and not caps["fast_fp16"]:
                skip = "this GPU has no fast FP16"
            elif precision == "fp16" and not _weak_typing(caps):
                skip = ("TensorRT {} is strongly typed: an FP32 graph builds FP32 only (convert the ONNX to FP16 "
                        "to build FP16)".format(caps.get("tensorrt_version")))
            elif precision == "int8" and not caps["fast_int8"]:
                skip = "this GPU has no fast INT8 (Jetson TX2 and Nano do not): FP16 is the fastest it offers"
            elif source == "calib" and not caps["calibrators"]:
                skip = "TensorRT {} has no INT8 calibrators: the Q/DQ variant covers INT8".format(
                    caps.get("tensorrt_version"))
            elif source == "calib" and bundle.calib_dir() is None:
                skip = "the bundle has no calibration set"
            items.append({"variant": v["name"], "onnx": v["onnx"], "precision": precision, "int8_from": source,
                          "engine": bundle.engine_path(engine_name(v["name"], precision, batch[2])), "skip": skip})
    return items


def reuse_reason(item, bundle, caps, batch):
    """None if the existing engine can be reused, else why it must be (re)built."""
    engine = item["engine"]
    if not os.path.isfile(engine):
        return "not built yet"
    try:
        doc = sidecar_mod.load_sidecar(engine)
    except RuntimeToolError as e:
        return str(e)
    if doc is None:
        return "no sidecar"
    options = {"batch": list(batch)}
    if not sidecar_mod.reusable(doc, engine, caps["tensorrt_version"], caps["device"], bundle.sha256(item["onnx"]),
                                options):
        return "built elsewhere, from another ONNX or with other options"
    if doc.get("requested_precision") != item["precision"] or doc.get("int8_from") != item["int8_from"]:
        return "built at another precision"
    return None


def ensure_engines(bundle, caps, batch, precisions=None, build=None, workspace_mb=None, dla_core=None, log=None):
    """Build the engines this device lacks; returns the plan with "status" and "reason" per item."""
    log = log or (lambda msg: None)
    if build is None:
        from ..build.trt_build import build_engine as build
    plan = plan_engines(bundle, caps, batch, precisions)
    if (bundle.manifest.get("calibration") or {}).get("cache") and any(
            p["int8_from"] == "calib" and not p["skip"] for p in plan):
        log("note: the bundle's calibration cache is not used: caches are not reliably portable across TensorRT "
            "versions, so this device calibrates and keeps its own in engines/")
    for item in plan:
        label = "{}/{}".format(item["variant"], item["precision"])
        if item["skip"]:
            item["status"], item["reason"] = "skipped", item["skip"]
            log("{}: skipped: {}".format(label, item["skip"]))
            continue
        why = reuse_reason(item, bundle, caps, batch)
        if why is None:
            item["status"], item["reason"] = "reused", "built here before from the same ONNX"
            log("{}: reusing {}".format(label, os.path.relpath(item["engine"], bundle.directory)))
            continue
        log("{}: building {} ({})".format(label, os.path.relpath(item["engine"], bundle.directory), why))
        kwargs = {"precision": item["precision"], "batch": batch, "int8_from": item["int8_from"], "log": log,
                  "metadata": _engine_metadata(bundle, item), "dla_core": dla_core}
        if workspace_mb:
            kwargs["workspace_mb"] = workspace_mb
        if item["int8_from"] == "calib":
            kwargs["calib_dir"] = bundle.calib_dir()
        try:
            build(bundle.path(item["onnx"]), item["engine"], **kwargs)
            item["status"], item["reason"] = "built", why
        except RuntimeToolError as e:
            item["status"], item["reason"] = "failed", str(e)
            log(f"{label}: build failed: {e}")
    return plan


def _engine_metadata(bundle, item):
    from ..preprocess import merge_metadata, onnx_metadata

    return merge_metadata(onnx_metadata(bundle.path(item["onnx"])), bundle.preprocess())
