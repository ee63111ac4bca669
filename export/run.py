"""The `export` stage: model file in; ONNX (and optionally INT8 Q/DQ ONNX), calibration
tensors and a record with parity numbers and graph statistics out."""
from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Callable

import numpy as np

from rsedge.compress.counting import count_macs, count_params
from rsedge.trainer.datasets import ImageListDataset, check_classes, find_corrupt, load_split, scan_image_folder
from rsedge.trainer.modelfile import load_model
from rsedge.trainer.records import write_record
from rsedge.trainer.transforms import eval_transform

from .int8_guard import quantize_with_guard
from .onnx_export import DEFAULT_OPSET, export_onnx, parity, run_onnx
from .onnx_graph import graph_stats


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
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model, meta = load_model(model_file)
    src = None
    for part in ("val", "test", "train"):  # a split may have no validation part (e.g. 80/20)
        src = split_items(meta, data, part)
        if src is None or src[1]:
            break
    if src is not None and src[1]:
        picked = stratified_sample(src[1], parity_images, seed=1)
        check, _ = preprocess_items(src[0], picked, meta)
        check_source = f"{len(check)} real images from {src[0]}"
    else:
        h, w = meta["input_size"]
        check = np.random.default_rng(0).standard_normal((8, 3, h, w)).astype(np.float32)
        check_source = "8 random tensors (no image folder at hand: pass --data)"
        log(f"warning: parity checked on {check_source}")
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
                       "guard_images": guard_images},
        "onnx": {"file": onnx_path.name, **info, "parity_images": check_source, "graph": stats,
                 "pytorch": torch_counts},
    }
    if int8:
        csrc = split_items(meta, calib_data if calib_data is not None else data, "train")
        if csrc is None or not csrc[1]:
            raise ValueError("--int8 needs calibration images: pass --calib-data DIR (the training data folder)")
        calib_items = stratified_sample(csrc[1], calib_size, seed=2)
        log(f"calibrating INT8 on {len(calib_items)} images from {csrc[0]} ({calib_method})")
        calib, _ = preprocess_items(csrc[0], calib_items, meta)
        files = save_calibration(calib, out / "calib")
        q_path = out / "model_int8.onnx"
        vsrc = split_items(meta, data, "val")
        if vsrc is not None and vsrc[1]:
            val_items = stratified_sample(vsrc[1], guard_images, seed=3)
            val_x, val_y = preprocess_items(vsrc[0], val_items, meta)
        elif max_drop is not None:
            raise ValueError("--max-drop needs labeled validation images: the model's split, or --data DIR")
        else:
            val_x, val_y = check[:0], np.zeros(0, np.int64)
        qinfo = quantize_with_guard(onnx_path, q_path, calib, val_x, val_y, max_drop=max_drop, method=calib_method,
                                    log=log)
        q_stats = graph_stats(q_path)
        q_parity = parity(run_onnx(onnx_path, check), run_onnx(q_path, check))
        int8_rec: dict[str, Any] = {"file": q_path.name, **qinfo, "graph": q_stats,
                                    "size_vs_fp32": q_stats["file_bytes"] / stats["file_bytes"],
                                    "agreement_with_fp32": q_parity, "calibration_files": ["calib/" + f for f in files]}
        if max_drop is not None and not qinfo["within_budget"]:
            log(f"warning: INT8 drop {qinfo['drop_points']:.2f} points exceeds --max-drop {max_drop} even with "
                f"{len(qinfo['kept_in_float'])} node(s) in float; the best attempt was written")
        record["int8"] = int8_rec
        acc = (f", validation top-1 {qinfo['int8_top1']:.4f} vs FP32 {qinfo['fp32_top1']:.4f}"
               if qinfo["validation_images"] else "")
        log(f"INT8 Q/DQ written to {q_path}: {q_stats['file_bytes'] / 1e6:.2f} MB "
            f"({int8_rec['size_vs_fp32']:.0%} of FP32){acc}")
    write_record(out, "export", record)
    return record
