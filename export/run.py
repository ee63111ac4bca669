"""The `export` stage: model file in; ONNX (and optionally INT8 Q/DQ ONNX, one for TensorRT and
one for ONNX Runtime's CPU kernels), calibration tensors and a record with parity numbers and
graph statistics out."""
from __future__ import annotations

import random
import shutil
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from rsedge.compress.counting import count_macs, count_params
from rsedge.trainer.datasets import ImageListDataset, check_classes, find_corrupt, load_split, scan_image_folder
from rsedge.trainer.modelfile import load_model
from rsedge.trainer.records import prepare_run_dir, write_record
from rsedge.trainer.sampling import check_fraction, fraction_info, stratified_fraction
from rsedge.trainer.transforms import eval_transform

from .int8_guard import quantize_with_guard
from .onnx_export import DEFAULT_OPSET, export_onnx, parity, run_onnx
from .onnx_graph import graph_stats

# target -> (record key, file name); the TensorRT file keeps the name it always had
INT8_OUTPUTS = {"tensorrt": ("int8", "model_int8.onnx"), "onnxruntime": ("int8_cpu", "model_int8_cpu.onnx")}
EXPORT_OUTPUTS = ("record.json", "model.onnx", "model_int8*.onnx", "calib")


def stratified_sample(items: Sequence[Sequence[Any]], n: int, seed: int = 0) -> list[tuple[str, int]]:
    """`n` items with every class represented in proportion (all items when there are fewer)."""
    items = [(str(a), int(b)) for a, b in items]
    if n >= len(items):
        return items
    by_class: dict[int, list[tuple[str, int]]] = defaultdict(list)
    for it in sorted(items):
        by_class[it[1]].append(it)
    rng = random.Random(seed)
    for v in by_class.values():
        rng.shuffle(v)
    picked: list[tuple[str, int]] = []
    quota = {c: n * len(v) / len(items) for c, v in by_class.items()}
    for c, v in by_class.items():
        picked.extend(v[: max(1, int(quota[c]))])
    rest = [it for c, v in by_class.items() for it in v[max(1, int(quota[c])):]]
    rng.shuffle(rest)
    return (picked + rest)[:n]


def preprocess_items(
    root: str | Path, items: Sequence[Sequence[Any]], meta: dict[str, Any]
) -> tuple[np.ndarray, np.ndarray]:
    ds = ImageListDataset(root, items, eval_transform(meta["input_size"], **meta["normalization"]))
    if len(ds) == 0:
        h, w = meta["input_size"]
        return np.zeros((0, 3, h, w), np.float32), np.zeros(0, np.int64)
    xs, ys = zip(*(ds[i] for i in range(len(ds))))
    return np.stack([x.numpy() for x in xs]).astype(np.float32), np.asarray(ys, np.int64)


def split_items(meta: dict[str, Any], data: str | Path | None, part: str) -> tuple[Path, list] | None:
    """Items of `part` from the model's own split, or every readable image of `data` when the
    model was trained elsewhere; None when no images are at hand."""
    if meta.get("split") and Path(meta["split"]).is_file():
        split = load_split(meta["split"])
        if data is None or Path(split["root"]) == Path(data).resolve():
            if Path(split["root"]).is_dir():
                return Path(split["root"]), split[part]
    if data is None:
        return None
    root = Path(data).resolve()
    classes, samples = scan_image_folder(root)
    check_classes(meta["classes"], classes, what=f"folder {root}")
    bad = find_corrupt(root, samples, progress=False)
    return root, [s for s in samples if s[0] not in bad]


def save_calibration(images: np.ndarray, folder: Path, per_file: int = 64) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(0, len(images), per_file):
        name = f"calib_{i // per_file:05d}.npy"
        np.save(folder / name, images[i : i + per_file])
        names.append(name)
    return names


def prepare_export_dir(out: str | Path, exist_ok: bool = False) -> Path:
    """An export folder holds one export: refuse an earlier one unless `exist_ok`, then remove
    every file an export writes, so no stale INT8 file or calibration set outlives the record
    that described it."""
    out = Path(out)
    found = sorted({p.name for pattern in EXPORT_OUTPUTS for p in out.glob(pattern)}) if out.is_dir() else []
    if found and not exist_ok:
        raise FileExistsError(f"{out} already holds an export ({', '.join(found)}): pass --exist-ok to overwrite it, "
                              "or choose another --out")
    prepare_run_dir(out, exist_ok=True)
    for pattern in EXPORT_OUTPUTS:
        for p in out.glob(pattern):
            if p.is_dir():
                shutil.rmtree(p)
            else:
                p.unlink()
    return out


@dataclass
class Int8Settings:
    """How `export --int8` quantizes: calibration, the accuracy guard, and for which backends."""

    calib_data: str | Path | None = None
    calib_size: int = 512
    calib_method: str = "minmax"
    max_drop: float | None = None
    guard_images: int = 1000
    targets: tuple[str, ...] = tuple(INT8_OUTPUTS)
    calib_fraction: float = 1.0  # --fraction: the calibration images come from this part of the pool


def export_run(
    model_file: str | Path,
    out: str | Path,
    opset: int = DEFAULT_OPSET,
    dynamic_batch: bool = False,
    simplifier: str = "onnxslim",
    int8: bool = False,
    calib_data: str | Path | None = None,
    calib_size: int = 512,
    calib_method: str = "minmax",
    data: str | Path | None = None,
    parity_images: int = 64,
    max_drop: float | None = None,
    guard_images: int = 1000,
    exist_ok: bool = False,
    int8_targets: tuple[str, ...] = tuple(INT8_OUTPUTS),
    log: Callable[[str], None] = print,
    fraction: float = 1.0,
) -> dict[str, Any]:
    if check_fraction(fraction) < 1 and not int8:
        raise ValueError("--fraction thins the INT8 calibration images: it needs --int8")
    if max_drop is not None and max_drop < 0:
        raise ValueError(f"--max-drop must be at least 0 points, not {max_drop}")
    unknown = [t for t in int8_targets if t not in INT8_OUTPUTS]
    if unknown:
        raise ValueError(f"unknown INT8 target(s) {', '.join(unknown)}; choose from {', '.join(INT8_OUTPUTS)}")
    model, meta = load_model(model_file)
    out = prepare_export_dir(out, exist_ok)
    check, check_source = parity_set(meta, data, parity_images, log)
    onnx_path = out / "model.onnx"
    info = export_onnx(model, meta, onnx_path, check, opset, dynamic_batch, simplifier, log)
    p = info["parity"]
    log(f"ONNX written to {onnx_path}: parity on {check_source}: max abs diff {p['max_abs_diff']:.2e}, "
        f"top-1 agreement {p['top1_agreement']:.4f}")
    stats = graph_stats(onnx_path)
    torch_counts = {"params": count_params(model), "macs": count_macs(model, meta["input_size"])}
    record: dict[str, Any] = {
        "inputs": {"model": str(Path(model_file).resolve())},
        "parameters": {"opset": opset, "dynamic_batch": dynamic_batch, "simplifier": simplifier, "int8": int8,
                       "calib_size": calib_size, "calib_method": calib_method, "max_drop": max_drop,
                       "guard_images": guard_images, "int8_targets": list(int8_targets) if int8 else [],
                       "fraction": fraction},
        "onnx": {"file": onnx_path.name, **info, "parity_images": check_source, "graph": stats,
                 "pytorch": torch_counts},
    }
    if int8:
        settings = Int8Settings(calib_data, calib_size, calib_method, max_drop, guard_images, tuple(int8_targets),
                                calib_fraction=fraction)
        record.update(export_int8(onnx_path, meta, data, check, settings, log))
    write_record(out, "export", record)
    return record


def parity_set(meta: dict[str, Any], data: str | Path | None, n: int, log: Callable[[str], None]
               ) -> tuple[np.ndarray, str]:
    """Preprocessed images to compare PyTorch and ONNX on: real ones when any are at hand."""
    src = None
    for part in ("val", "test", "train"):  # a split may have no validation part (e.g. 80/20)
        src = split_items(meta, data, part)
        if src is None or src[1]:
            break
    if src is not None and src[1]:
        check, _ = preprocess_items(src[0], stratified_sample(src[1], n, seed=1), meta)
        return check, f"{len(check)} real images from {src[0]}"
    h, w = meta["input_size"]
    check = np.random.default_rng(0).standard_normal((8, 3, h, w)).astype(np.float32)
    source = "8 random tensors (no image folder at hand: pass --data)"
    log(f"warning: parity checked on {source}")
    return check, source


def export_int8(onnx_path: Path, meta: dict[str, Any], data: str | Path | None, check: np.ndarray,
                s: Int8Settings, log: Callable[[str], None]) -> dict[str, Any]:
    """Calibrate once, then one guarded Q/DQ file per target; {record key: record}."""
    out = onnx_path.parent
    csrc = split_items(meta, s.calib_data if s.calib_data is not None else data, "train")
    if csrc is None or not csrc[1]:
        raise ValueError("--int8 needs calibration images: pass --calib-data DIR (the training data folder)")
    pool = stratified_fraction(csrc[1], s.calib_fraction, seed=2)
    pool_info = fraction_info(s.calib_fraction, 2, pool, csrc[1]) if s.calib_fraction < 1 else None
    calib_items = stratified_sample(pool, s.calib_size, seed=2)
    if pool_info is not None:
        log(f"--fraction {s.calib_fraction:g}: calibration drawn from {len(pool)} of {len(csrc[1])} images")
    log(f"calibrating INT8 on {len(calib_items)} images from {csrc[0]} ({s.calib_method})")
    calib, _ = preprocess_items(csrc[0], calib_items, meta)
    files = ["calib/" + f for f in save_calibration(calib, out / "calib")]
    vsrc = split_items(meta, data, "val")
    if vsrc is not None and vsrc[1]:
        val_x, val_y = preprocess_items(vsrc[0], stratified_sample(vsrc[1], s.guard_images, seed=3), meta)
    elif s.max_drop is not None:
        raise ValueError("--max-drop needs labeled validation images: the model's split, or --data DIR")
    else:
        val_x, val_y = check[:0], np.zeros(0, np.int64)
    fp32_pred = run_onnx(onnx_path, val_x).argmax(1) if len(val_y) else np.zeros(0, np.int64)
    fp32_check = run_onnx(onnx_path, check)
    fp32_bytes = onnx_path.stat().st_size
    records = {}
    for target in s.targets:
        key, name = INT8_OUTPUTS[target]
        q_path = out / name
        qinfo = quantize_with_guard(onnx_path, q_path, calib, val_x, val_y, max_drop=s.max_drop, method=s.calib_method,
                                    log=log, target=target, fp32_predictions=fp32_pred)
        rec: dict[str, Any] = {**qinfo, "calibration_files": files, "calibration_pool": pool_info}
        if qinfo["status"] == "written":
            q_stats = graph_stats(q_path)
            rec.update(graph=q_stats, size_vs_fp32=q_stats["file_bytes"] / fp32_bytes,
                       agreement_with_fp32=parity(fp32_check, run_onnx(q_path, check)))
            _log_written(q_path, rec, log)
        else:
            log(f"warning: INT8 for {target} REJECTED, {name} not written: {qinfo['reason']}")
            log(f"warning: no {name} is shipped (a bundle carries no INT8 of this kind); loosen --max-drop, "
                "calibrate on more images (--calib-size) or with another --calib-method")
        records[key] = rec
    return records


def _log_written(q_path: Path, rec: dict[str, Any], log: Callable[[str], None]) -> None:
    q, n = rec["quantized_nodes"], rec["quantizable_nodes"]
    acc = (f", validation top-1 {rec['int8_correct']}/{rec['validation_images']} vs FP32 "
           f"{rec['fp32_correct']}/{rec['validation_images']}" if rec["validation_images"] else "")
    log(f"INT8 Q/DQ for {rec['target']} written to {q_path}: {q}/{n} compute nodes in int8"
        f"{f' ({n - q} kept in float by the guard)' if q < n else ''}, {rec['graph']['file_bytes'] / 1e6:.2f} MB "
        f"({rec['size_vs_fp32']:.0%} of FP32){acc}")
