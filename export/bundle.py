"""`rsedge bundle`: everything a device needs in one verifiable folder.

The device builds (and ideally calibrates) its own engines, because engines and calibration
caches are not portable across GPUs and TensorRT versions. So the bundle carries sources, not
engines: the FP32 ONNX, the INT8 Q/DQ ONNX, the exact calibration tensors, a small preprocessed
evaluation set, labels and the preprocessing spec, and a manifest with every file's SHA-256 that
the runtime checks before it builds or runs anything.
"""
from __future__ import annotations

import json
import shutil
import tarfile
import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np

from rsedge.runtime.manifest import verify_manifest, write_manifest
from rsedge.trainer.modelfile import load_model
from rsedge.trainer.records import atomic_write_json, versions

from .run import export_run, preprocess_items, split_items, stratified_sample

FP32_NAME = "model_fp32.onnx"
INT8_NAME = "model_int8_qdq.onnx"


def preprocess_spec(meta: dict[str, Any]) -> dict[str, Any]:
    """The ONNX metadata_props without their prefix, for devices that read engines, not ONNX."""
    return {
        "task": "classification",
        "classes": list(meta["classes"]),
        "input_size": list(meta["input_size"]),
        "mean": list(meta["normalization"]["mean"]),
        "std": list(meta["normalization"]["std"]),
        "layout": "NCHW",
        "color": "RGB",
        "resize": "resize",
    }


def bundle_run(
    model_file: str | Path,
    out: str | Path,
    data: str | Path | None = None,
    calib_size: int = 512,
    calib_method: str = "minmax",
    eval_size: int = 500,
    max_drop: float | None = 1.0,
    opset: int = 13,
    dynamic_batch: bool = True,
    tar: bool = False,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty: a bundle is written into a new folder")
    out.mkdir(parents=True, exist_ok=True)
    _, meta = load_model(model_file)
    with tempfile.TemporaryDirectory() as tmp:
        record = export_run(model_file, tmp, opset=opset, dynamic_batch=dynamic_batch, int8=True, calib_data=data,
                            calib_size=calib_size, calib_method=calib_method, data=data, max_drop=max_drop, log=log)
        shutil.copyfile(Path(tmp) / "model.onnx", out / FP32_NAME)
        shutil.copyfile(Path(tmp) / "model_int8.onnx", out / INT8_NAME)
        shutil.copytree(Path(tmp) / "calib", out / "calib")
        atomic_write_json(out / "export_record.json", json.loads((Path(tmp) / "record.json").read_text()))
    src = split_items(meta, data, "test")
    if src is None or not src[1]:
        raise ValueError("no labeled images for the evaluation set: pass --data DIR")
    items = stratified_sample(src[1], eval_size, seed=4)
    images, labels = preprocess_items(src[0], items, meta)
    (out / "eval").mkdir()
    np.save(out / "eval" / "images.npy", images)
    np.save(out / "eval" / "labels.npy", labels.astype(np.int64))
    atomic_write_json(out / "labels.json", {"classes": list(meta["classes"])})
    atomic_write_json(out / "preprocess.json", preprocess_spec(meta))
    description = {
        "versions": versions(),
        "model": {"arch": meta["arch"], "source": str(Path(model_file).resolve()), "metrics": meta.get("metrics", {})},
        "variants": [
            {"name": "fp32", "onnx": FP32_NAME, "precision": "fp32"},
            {"name": "int8-qdq", "onnx": INT8_NAME, "precision": "int8"},
        ],
        "preprocess": "preprocess.json",
        "labels": "labels.json",
        "calibration": {"dir": "calib", "cache": None, "images": record["int8"]["calibration_images"],
                        "method": calib_method},
        "eval": {"images": "eval/images.npy", "labels": "eval/labels.npy", "count": int(len(labels)),
                 "split": "test"},
        "export": {"parity": record["onnx"]["parity"], "int8_guard": {
            k: record["int8"][k] for k in ("fp32_top1", "int8_top1", "drop_points", "max_drop", "kept_in_float")}},
    }
    manifest = write_manifest(str(out), description)
    verify_manifest(str(out))
    log(f"bundle written to {out}: {len(manifest['files'])} files, "
        f"{sum(f['bytes'] for f in manifest['files'].values()) / 1e6:.1f} MB, manifest verified")
    archive = None
    if tar:
        archive = out.with_name(out.name + ".tar.gz")
        tmp_archive = archive.with_name(archive.name + ".tmp")
        with tarfile.open(tmp_archive, "w:gz") as t:
            t.add(out, arcname=out.name)
        tmp_archive.replace(archive)
        log(f"archive: {archive}")
    return {"bundle": str(out), "archive": str(archive) if archive else None, "files": len(manifest["files"]),
            "manifest": manifest}

