"""`rsedge bundle`: everything a device needs in one verifiable folder.

The device builds (and ideally calibrates) its own engines, because engines and calibration
caches are not portable across GPUs and TensorRT versions. So the bundle carries sources, not
engines: the FP32 ONNX, an INT8 Q/DQ ONNX for TensorRT and one for ONNX Runtime's CPU kernels
(each only if the accuracy guard accepted it), the exact calibration tensors, a small preprocessed
evaluation set, labels and the preprocessing spec, and a manifest with every file's SHA-256 that
the runtime checks before it builds or runs anything. Each variant says which backend it is made
for (`target`); the device runs those made for the backend it has.
"""
from __future__ import annotations

import json
import shutil
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from rsedge.runtime.bundles.manifest import verify_manifest, write_manifest
from rsedge.trainer.modelfile import load_model
from rsedge.trainer.records import atomic_write_json, versions
from rsedge.trainer.sampling import stratified_fraction
from rsedge.trainer.stage import build_options, model_items
from rsedge.trainer.tasks import task_for

from .onnx_export import preprocess_spec
from .run import ExportOptions, export_run, preprocess_items, save_calibration, stratified_sample

FP32_NAME = "model_fp32.onnx"
INT8_NAME = "model_int8_qdq.onnx"
INT8_CPU_NAME = "model_int8_cpu.onnx"
PACK_NAME = "model.rspack"
# export record key -> (variant name, file in the bundle); the device tells them apart by `target`
INT8_VARIANTS = {"int8": ("int8-qdq", INT8_NAME), "int8_cpu": ("int8-cpu", INT8_CPU_NAME)}
GUARD_KEYS = ("status", "reason", "target", "precision", "fp32_top1", "int8_top1", "fp32_correct", "int8_correct",
              "images_lost", "drop_points", "max_drop", "budget_images", "resolution_points", "resolves_budget",
              "validation_images", "kept_in_float", "quantized_nodes", "quantizable_nodes", "quantized_fraction",
              "metric", "fp32_miou", "int8_miou", "fp32_map50", "int8_map50")


def write_eval_set(out: Path, root: Path, items: list, meta: dict[str, Any]) -> dict[str, Any]:
    """The task's evaluation set under eval/ (`Task.bundle_eval`): images.npy and one file per
    target (labels.npy for classification); returns the manifest's `eval` entry, which names
    each target file by its stem ("labels": "eval/labels.npy")."""
    payload = task_for(meta).bundle_eval(root, items, meta)
    (out / "eval").mkdir()
    np.save(out / "eval" / "images.npy", payload["images"])
    entry: dict[str, Any] = {"images": "eval/images.npy"}
    for name, array in payload["targets"].items():
        np.save(out / "eval" / name, array)
        entry[Path(name).stem] = f"eval/{name}"
    entry["count"] = int(payload.get("count", len(payload["images"])))
    return entry


def int8_variants(record: dict[str, Any], export_dir: Path, out: Path, log: Callable[[str], None]
                  ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Copy the INT8 files the guard accepted; (their manifest variants, the rejected ones and why)."""
    variants, rejected = [], []
    for key, (name, file_name) in INT8_VARIANTS.items():
        rec = record.get(key)
        if rec is None:
            continue
        if rec["status"] != "written":
            rejected.append({"name": name, "target": rec["target"], "reason": rec["reason"]})
            log(f"warning: the bundle carries no {name} variant (for {rec['target']}): {rec['reason']}")
            continue
        shutil.copyfile(export_dir / rec["file"], out / file_name)
        variants.append({"name": name, "onnx": file_name, "precision": "int8", "target": rec["target"],
                         "label": rec["precision"],
                         "int8_nodes": f"{rec['quantized_nodes']}/{rec['quantizable_nodes']}"})
    return variants, rejected


@dataclass
class BundleOptions:
    """`rsedge bundle`: the images (the model's split, or `data`), calibration, the evaluation
    set's size, the INT8 guard, the ONNX graph, and whether to write OUT.tar.gz too. pack: an
    .rspack of the model (`rsedge pack`) carried instead of the FP32 and INT8 ONNX files."""

    data: str | Path | None = None
    calib_size: int = 512
    calib_method: str = "minmax"
    eval_size: int = 500
    max_drop: float | None = 1.0
    opset: int = 13
    dynamic_batch: bool = True
    tar: bool = False
    fraction: float = 1.0  # --fraction: the calibration images come from this part of the training split
    pack: str | Path | None = None


def onnx_parts(model_file: str | Path, out: Path, o: BundleOptions, log: Callable[[str], None]) -> dict[str, Any]:
    """The FP32 ONNX, the INT8 files the guard accepted and their calibration set: the manifest's
    variants, rejected_variants, calibration and export entries."""
    with tempfile.TemporaryDirectory() as tmp:
        record = export_run(model_file, tmp, ExportOptions(
            opset=o.opset, dynamic_batch=o.dynamic_batch, int8=True, calib_data=o.data, calib_size=o.calib_size,
            calib_method=o.calib_method, data=o.data, max_drop=o.max_drop, fraction=o.fraction), log=log)
        out.mkdir(parents=True, exist_ok=True)  # only now: a failed export leaves no empty bundle folder
        shutil.copyfile(Path(tmp) / "model.onnx", out / FP32_NAME)
        variants, rejected = int8_variants(record, Path(tmp), out, log)
        shutil.copytree(Path(tmp) / "calib", out / "calib")
        atomic_write_json(out / "export_record.json", json.loads((Path(tmp) / "record.json").read_text()))
    return {
        "variants": [{"name": "fp32", "onnx": FP32_NAME, "precision": "fp32"}] + variants,
        "rejected_variants": rejected,
        "calibration": {"dir": "calib", "cache": None, "images": record["int8"]["calibration_images"],
                        "method": o.calib_method},
        "export": {"parity": record["onnx"]["parity"], "int8_guard": {
            INT8_VARIANTS[key][0]: {k: record[key].get(k) for k in GUARD_KEYS} for key in INT8_VARIANTS
            if key in record}},
    }


def _pack_of(pack_file: str | Path, model_file: str | Path, meta: dict[str, Any]):
    """The checked pack, refused when its metadata says it was made from another model."""
    from rsedge.runtime.pack import read_pack

    pack = read_pack(str(pack_file))
    arch, classes = pack.model.get("arch"), pack.model.get("classes")
    if (arch is not None and arch != meta["arch"]) or (classes is not None and list(classes) != list(meta["classes"])):
        raise ValueError(f"{pack_file} is a pack of a {arch} with classes {classes}, not of {model_file} "
                         f"({meta['arch']}, {len(meta['classes'])} classes)")
    return pack


def pack_parts(model_file: str | Path, meta: dict[str, Any], out: Path, o: BundleOptions,
               log: Callable[[str], None]) -> dict[str, Any]:
    """The model as its uplink pack: the .rspack (the device unpacks it to unpacked/pack/ before
    it builds or runs anything) and, unless calib_size is 0, calibration images for the device's
    own INT8 calibration; no ONNX file travels."""
    from rsedge.runtime.pack import describe

    pack = _pack_of(o.pack, model_file, meta)
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(o.pack, out / PACK_NAME)
    info = describe(pack)
    record = Path(o.pack).parent / "record.json"
    accuracy = json.loads(record.read_text()).get("accuracy") if record.is_file() else None
    calib = None
    if o.calib_size:
        src = model_items(meta, o.data, "train")
        if src is None or not src[1]:
            raise ValueError("no training images for the calibration set: pass --data DIR, or --calib-size 0")
        items = stratified_sample(stratified_fraction(src[1], o.fraction, seed=2), o.calib_size, seed=2)
        images, _ = preprocess_items(src[0], items, meta)
        save_calibration(images, out / "calib")
        calib = {"dir": "calib", "cache": None, "images": len(images), "method": None}
    log(f"the bundle carries {Path(o.pack).name}: {info['bytes']:,} bytes, CR {info['cr'] or 0:.2f}, "
        f"{info['quantized']} tensors at {', '.join(map(str, info['bits']))} bits")
    return {
        "variants": [{"name": "pack", "pack": PACK_NAME, "onnx": f"unpacked/pack/{pack.graph_file}",
                      "precision": "fp32"}],
        "rejected_variants": [],
        "calibration": calib,
        "pack": {"file": PACK_NAME, "bytes": info["bytes"], "cr": info["cr"], "fp32_bytes": info["fp32_bytes"],
                 "fp32_reference": info["fp32_reference"], "bits": info["bits"], "recipe": pack.model.get("recipe"),
                 "payload_sha256": pack.header["payload"]["sha256"], "accuracy": accuracy},
        "export": None,
    }


def transfer(out: Path) -> dict[str, Any]:
    """The bytes a link must carry: every file the manifest lists (manifest.json aside), by part."""
    from rsedge.runtime.bundles.manifest import list_bundle_files

    sizes = {rel: (out / rel).stat().st_size for rel in list_bundle_files(str(out))}
    parts = {"model": 0, "calibration": 0, "eval": 0, "other": 0}
    for rel, size in sizes.items():
        top = rel.split("/")[0]
        key = ("calibration" if top == "calib" else "eval" if top == "eval" else
               "model" if rel.endswith((".onnx", ".rspack")) else "other")
        parts[key] += size
    return {"bytes": sum(sizes.values()), **{f"{k}_bytes": v for k, v in parts.items()}}


def bundle_run(model_file: str | Path, out: str | Path, options: BundleOptions | None = None, *,
               log: Callable[[str], None] = print, **fields: Any) -> dict[str, Any]:
    """Write the bundle into the new folder `out`; `fields` replace those of `options`."""
    o = build_options(BundleOptions, options, fields)
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty: a bundle is written into a new folder")
    _, meta = load_model(model_file)
    parts = pack_parts(model_file, meta, out, o, log) if o.pack is not None else onnx_parts(model_file, out, o, log)
    src = model_items(meta, o.data, "test")
    if src is None or not src[1]:
        raise ValueError("no labeled images for the evaluation set: pass --data DIR")
    items = stratified_sample(src[1], o.eval_size, seed=4)
    eval_entry = write_eval_set(out, src[0], items, meta)
    atomic_write_json(out / "labels.json", {"classes": list(meta["classes"])})
    atomic_write_json(out / "preprocess.json", preprocess_spec(meta))
    description = {
        "versions": versions(),
        "model": {"arch": meta["arch"], "source": str(Path(model_file).resolve()), "metrics": meta.get("metrics", {})},
        **parts,
        "preprocess": "preprocess.json",
        "labels": "labels.json",
        "eval": {**eval_entry, "split": "test"},
        "transfer": transfer(out),
    }
    manifest = write_manifest(str(out), description)
    verify_manifest(str(out))
    sent = manifest["transfer"]
    log(f"bundle written to {out}: {len(manifest['files'])} files, {sent['bytes'] / 1e6:.2f} MB to send "
        f"(model {sent['model_bytes'] / 1e6:.2f} MB), manifest verified")
    archive = write_archive(out, log) if o.tar else None
    return {"bundle": str(out), "archive": str(archive) if archive else None, "files": len(manifest["files"]),
            "manifest": manifest}


def write_archive(out: Path, log: Callable[[str], None]) -> Path:
    """OUT.tar.gz next to the bundle, written under a temporary name first: a partial archive is
    never mistaken for a bundle."""
    archive = out.with_name(out.name + ".tar.gz")
    tmp_archive = archive.with_name(archive.name + ".tmp")
    with tarfile.open(tmp_archive, "w:gz") as t:
        t.add(out, arcname=out.name)
    tmp_archive.replace(archive)
    log(f"archive: {archive}")
    return archive
