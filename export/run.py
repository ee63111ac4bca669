"""The `export` stage: model file in; ONNX (and optionally INT8 Q/DQ ONNX, one for TensorRT and
one for ONNX Runtime's CPU kernels), calibration tensors and a record with parity numbers and
graph statistics out."""
from __future__ import annotations

import dataclasses
import random
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from rsedge.compress.counting import count_macs, count_params
from rsedge.trainer.modelfile import load_model
from rsedge.trainer.records import write_record
from rsedge.trainer.sampling import check_fraction, fraction_info, item_target, stratified_fraction
from rsedge.trainer.stage import RunDirKind, build_options, model_items, open_run_dir
from rsedge.trainer.tasks import stack_dataset, task_for

from .int8_guard import GuardOptions, MetricScorer, quantize_with_guard
from .msb_onnx import int8_weight_onnx
from .onnx_export import DEFAULT_OPSET, export_onnx, parity, predict_onnx, preprocess_spec, run_onnx_outputs
from .onnx_graph import graph_stats

# target -> (record key, file name); the TensorRT file keeps the name it always had
INT8_OUTPUTS = {"tensorrt": ("int8", "model_int8.onnx"), "onnxruntime": ("int8_cpu", "model_int8_cpu.onnx")}
# what an export writes: an earlier export is refused unless --exist-ok, which removes all of it, so no
# stale INT8 file or calibration set outlives the record that described it
EXPORT_DIR = RunDirKind("an export", ("calib", "model.onnx", "model_int8*.onnx", "record.json"), resumable=False,
                        announce=False)


def stratified_sample(items: Sequence[Sequence[Any]], n: int, seed: int = 0) -> list[tuple[str, Any]]:
    """`n` items with every class represented in proportion (all items when there are fewer); items
    whose target is no class index (a segmentation pair's mask) form one stratum."""
    items = [(str(a), item_target(b)) for a, b in items]
    if n >= len(items):
        return items
    by_class: dict[Any, list[tuple[str, Any]]] = defaultdict(list)
    for it in sorted(items):
        by_class[it[1] if isinstance(it[1], int) else None].append(it)
    rng = random.Random(seed)
    for v in by_class.values():
        rng.shuffle(v)
    picked: list[tuple[str, Any]] = []
    quota = {c: n * len(v) / len(items) for c, v in by_class.items()}
    for c, v in by_class.items():
        picked.extend(v[: max(1, int(quota[c]))])
    rest = [it for c, v in by_class.items() for it in v[max(1, int(quota[c])):]]
    rng.shuffle(rest)
    return (picked + rest)[:n]


def preprocess_items(
    root: str | Path, items: Sequence[Sequence[Any]], meta: dict[str, Any]
) -> tuple[np.ndarray, np.ndarray]:
    """The samples of `items` at the model's input size, preprocessed as the task's evaluation does
    (float32 NCHW; segmentation: a few windows of each image), and their targets."""
    task = task_for(meta)
    images, targets = stack_dataset(task.tensor_dataset(root, items, meta), meta["input_size"])
    return images, task.device_targets(targets) if targets else np.zeros(0, np.int64)


def save_calibration(images: np.ndarray, folder: Path, per_file: int = 64) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(0, len(images), per_file):
        name = f"calib_{i // per_file:05d}.npy"
        np.save(folder / name, images[i : i + per_file])
        names.append(name)
    return names


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


@dataclass
class ExportOptions:
    """`rsedge export`: the ONNX graph (opset, batch, simplifier), the images it is checked on,
    and INT8 (calibration, the accuracy guard, the backends)."""

    opset: int = DEFAULT_OPSET
    dynamic_batch: bool = False
    simplifier: str = "onnxslim"
    data: str | Path | None = None  # images for the parity check (default: the model's own split)
    parity_images: int = 64
    int8: bool = False
    calib_data: str | Path | None = None
    calib_size: int = 512
    calib_method: str = "minmax"
    max_drop: float | None = None
    guard_images: int = 1000
    int8_targets: tuple[str, ...] = tuple(INT8_OUTPUTS)
    fraction: float = 1.0  # the calibration images come from this part of the pool
    nms: str = "none"  # detection: "trt" also writes model_nms_trt.onnx with TensorRT's EfficientNMS_TRT
    nms_class_agnostic: bool = False  # EfficientNMS_TRT's class_agnostic (TensorRT >= 8.6)
    exist_ok: bool = False

    def check(self) -> None:
        if self.nms not in ("none", "trt"):
            raise ValueError(f"--nms must be none or trt, not {self.nms!r}")
        if check_fraction(self.fraction) < 1 and not self.int8:
            raise ValueError("--fraction thins the INT8 calibration images: it needs --int8")
        if self.max_drop is not None and self.max_drop < 0:
            raise ValueError(f"--max-drop must be at least 0 points, not {self.max_drop}")
        unknown = [t for t in self.int8_targets if t not in INT8_OUTPUTS]
        if unknown:
            raise ValueError(f"unknown INT8 target(s) {', '.join(unknown)}; choose from {', '.join(INT8_OUTPUTS)}")

    def int8_settings(self) -> Int8Settings:
        return Int8Settings(self.calib_data, self.calib_size, self.calib_method, self.max_drop, self.guard_images,
                            tuple(self.int8_targets), calib_fraction=self.fraction)

    def parameters(self) -> dict[str, Any]:
        return {"opset": self.opset, "dynamic_batch": self.dynamic_batch, "simplifier": self.simplifier,
                "int8": self.int8, "calib_size": self.calib_size, "calib_method": self.calib_method,
                "max_drop": self.max_drop, "guard_images": self.guard_images,
                "int8_targets": list(self.int8_targets) if self.int8 else [], "fraction": self.fraction,
                "nms": self.nms, "nms_class_agnostic": self.nms_class_agnostic}


def export_run(model_file: str | Path, out: str | Path, options: ExportOptions | None = None, *,
               log: Callable[[str], None] = print, **fields: Any) -> dict[str, Any]:
    """The `export` stage: ONNX checked against PyTorch, and with `int8` the guarded Q/DQ files;
    `fields` replace those of `options`."""
    o = build_options(ExportOptions, options, fields)
    o.check()
    model, meta = load_model(model_file)
    out = open_run_dir(out, exist_ok=o.exist_ok, log=None, kind=EXPORT_DIR)
    check, check_source = parity_set(meta, o.data, o.parity_images, log)
    onnx_path = out / "model.onnx"
    info = export_onnx(model, meta, onnx_path, check, o.opset, o.dynamic_batch, o.simplifier, log)
    p = info["parity"]
    log(f"ONNX written to {onnx_path}: parity on {check_source}: max abs diff {p['max_abs_diff']:.2e}, "
        f"{task_for(meta).agreement_name} {p['top1_agreement']:.4f}")
    stats = graph_stats(onnx_path)
    torch_counts = {"params": count_params(model), "macs": count_macs(model, meta["input_size"])}
    record: dict[str, Any] = {
        "inputs": {"model": str(Path(model_file).resolve())},
        "parameters": o.parameters(),
        "onnx": {"file": onnx_path.name, **info, "parity_images": check_source, "graph": stats,
                 "pytorch": torch_counts},
    }
    if o.nms == "trt":
        record["nms"] = _trt_nms(onnx_path, meta, o, log)
    if o.int8:
        record.update(export_int8(onnx_path, meta, o.data, check, o.int8_settings(), log))
    # msb-fixed model (`rsedge quantize`): model.onnx -> int8 weights behind DequantizeLinear ({} otherwise)
    record["onnx"].update(int8_weight_onnx(onnx_path, model, meta, check, log))
    write_record(out, "export", record)
    return record


def _trt_nms(onnx_path: Path, meta: dict[str, Any], o: ExportOptions, log: Callable[[str], None]) -> dict[str, Any]:
    """model_nms_trt.onnx beside model.onnx, at the model's deployment thresholds."""
    from .trt_nms import NMS_FILE, NmsOptions, append_efficient_nms

    if task_for(meta).name != "detection":
        raise ValueError(f"--nms trt is for detectors; this is a {task_for(meta).name} model")
    pre = task_for(meta).preprocess(meta)
    options = NmsOptions(score_threshold=pre["conf_threshold"], iou_threshold=pre["iou_threshold"],
                         max_output_boxes=min(int(pre["max_det"]), 100), class_agnostic=o.nms_class_agnostic)
    info = append_efficient_nms(onnx_path, onnx_path.parent / NMS_FILE, options)
    log(f"{NMS_FILE} written: EfficientNMS_TRT at confidence {options.score_threshold:g}, IoU "
        f"{options.iou_threshold:g}, {options.max_output_boxes} boxes (TensorRT >= {info['min_tensorrt']} only; "
        f"ONNX Runtime runs model.onnx)")
    return info


def parity_set(meta: dict[str, Any], data: str | Path | None, n: int, log: Callable[[str], None]
               ) -> tuple[np.ndarray, str]:
    """Preprocessed images to compare PyTorch and ONNX on: real ones when any are at hand."""
    src = None
    for part in ("val", "test", "train"):  # a split may have no validation part (e.g. 80/20)
        src = model_items(meta, data, part)
        if src is None or src[1]:
            break
    if src is not None and src[1]:
        items = stratified_sample(src[1], n, seed=1)
        check, _ = preprocess_items(src[0], items, meta)
        what = f"windows of {len(items)} images" if len(check) != len(items) else "images"
        return check, f"{len(check)} real {what} from {src[0]}"
    h, w = meta["input_size"]
    check = np.random.default_rng(0).standard_normal((8, 3, h, w)).astype(np.float32)
    source = "8 random tensors (no image folder at hand: pass --data)"
    log(f"warning: parity checked on {source}")
    return check, source


GUARDED_TASKS = ("classification", "segmentation", "detection")  # top-1; mIoU points on windows; mAP@0.5 points


def _guardable(meta: dict[str, Any]) -> bool:
    """The accuracy guard measures classification top-1, segmentation mIoU and detection mAP@0.5;
    for another task its numbers would mean nothing."""
    return task_for(meta).name in GUARDED_TASKS


def _guard_for_task(s: Int8Settings, meta: dict[str, Any], log: Callable[[str], None]) -> Int8Settings:
    """Another task's INT8 files are written unguarded, and the log says so."""
    if _guardable(meta) or s.max_drop is None:
        return s
    log(f"warning: the INT8 accuracy guard measures classification top-1, segmentation mIoU and detection mAP "
        f"only: the "
        f"{meta.get('task')} model's INT8 "
        f"files are written UNGUARDED (--max-drop {s.max_drop} ignored)")
    return dataclasses.replace(s, max_drop=None)


def _guard_source(meta: dict[str, Any], data: str | Path | None, log: Callable[[str], None]):
    """The labeled images the guard scores: the validation part, else (a detector on the paper's
    80/20 split has none) training images, which measure the INT8 drop against FP32 as well,
    though not generalization; the log says so."""
    vsrc = model_items(meta, data, "val")
    if (vsrc is None or not vsrc[1]) and task_for(meta).name == "detection":
        vsrc = model_items(meta, data, "train")
        if vsrc is not None and vsrc[1]:
            log("note: the split has no validation part: the INT8 guard scores training images")
    return vsrc


def export_int8(onnx_path: Path, meta: dict[str, Any], data: str | Path | None, check: np.ndarray,
                s: Int8Settings, log: Callable[[str], None]) -> dict[str, Any]:
    """Calibrate once, then one guarded Q/DQ file per target; {record key: record}."""
    out = onnx_path.parent
    s = _guard_for_task(s, meta, log)
    csrc = model_items(meta, s.calib_data if s.calib_data is not None else data, "train")
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
    vsrc = _guard_source(meta, data, log) if _guardable(meta) else None
    if vsrc is not None and vsrc[1]:
        val_x, val_y = preprocess_items(vsrc[0], stratified_sample(vsrc[1], s.guard_images, seed=3), meta)
    elif s.max_drop is not None:
        raise ValueError("--max-drop needs labeled validation images: the model's split, or --data DIR")
    else:
        val_x, val_y = check[:0], np.zeros(0, np.int64)
    task = task_for(meta).name
    fp32_pred = (predict_onnx(onnx_path, val_x, task) if len(val_y) and task == "classification"
                 else None)
    fp32_check = run_onnx_outputs(onnx_path, check)
    fp32_bytes = onnx_path.stat().st_size
    records = {}
    for target in s.targets:
        key, name = INT8_OUTPUTS[target]
        q_path = out / name
        qinfo = quantize_with_guard(onnx_path, q_path, calib, val_x, val_y,
                                    GuardOptions(max_drop=s.max_drop, method=s.calib_method, target=target,
                                                 task=task, metadata=preprocess_spec(meta),
                                                 keep_tail_float=task == "detection"),
                                    log=log, fp32_predictions=fp32_pred)
        rec: dict[str, Any] = {**qinfo, "calibration_files": files, "calibration_pool": pool_info}
        if qinfo["status"] == "written":
            q_stats = graph_stats(q_path)
            rec.update(graph=q_stats, size_vs_fp32=q_stats["file_bytes"] / fp32_bytes,
                       agreement_with_fp32=parity(fp32_check, run_onnx_outputs(q_path, check), task=task))
            _log_written(q_path, rec, log)
        else:
            log(f"warning: INT8 for {target} REJECTED, {name} not written: {qinfo['reason']}")
            log(f"warning: no {name} is shipped (a bundle carries no INT8 of this kind); loosen --max-drop, "
                "calibrate on more images (--calib-size) or with another --calib-method")
        records[key] = rec
    return records


def _log_written(q_path: Path, rec: dict[str, Any], log: Callable[[str], None]) -> None:
    q, n = rec["quantized_nodes"], rec["quantizable_nodes"]
    metric = rec.get("metric")
    scored = {m: (label, unit) for m, label, unit in MetricScorer.METRICS.values()}
    if metric in scored:
        label, unit = scored[metric]
        acc = (f", validation {label} {100 * rec[f'int8_{metric}']:.2f} % vs FP32 {100 * rec[f'fp32_{metric}']:.2f} % "
               f"on {rec['validation_images']} {unit}" if rec["validation_images"] else "")
    else:
        acc = (f", validation top-1 {rec['int8_correct']}/{rec['validation_images']} vs FP32 "
               f"{rec['fp32_correct']}/{rec['validation_images']}" if rec["validation_images"] else "")
    log(f"INT8 Q/DQ for {rec['target']} written to {q_path}: {q}/{n} compute nodes in int8"
        f"{f' ({n - q} kept in float by the guard)' if q < n else ''}, {rec['graph']['file_bytes'] / 1e6:.2f} MB "
        f"({rec['size_vs_fp32']:.0%} of FP32){acc}")
