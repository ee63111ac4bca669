"""The `pack` stage: a model file in, an uplink-size .rspack out (runtime/pack.py defines the bytes).

Default recipe, adaptive P->Q under a target compression ratio: layer-adaptive unstructured
pruning (LAP, compress/unstructured.py) at `sparsity`, then layer-adaptive bit widths (LAQ,
compress/ptq.py) chosen under the bit budget the target CR leaves, per-channel scales with
MSE-optimal clipping. With calibration images (`data`) both layer importances are the task's
loss increase on training images; without, they are data-free (weight statistics).

The CR is measured, never computed: FP32 safetensors file size / pack file size. LAQ's budget
covers only the quantized weights, so the pack's other bytes (biases, graph, header) are first
reserved from an estimate; if the written pack still misses the target, the reserve grows by the
shortfall and the weights are compressed again (`MAX_ROUNDS`), and a pack that never reaches it
is refused rather than shipped under a false CR.

The pack is written from the ONNX export of the fake-quantized model (weights = code x scale,
exactly what the device unpacks), so the same graph the host checked is what the device runs;
the record holds the round trip (unpacked ONNX in ONNX Runtime vs the fake-quantized PyTorch
model) and, with `data`, the metric of the FP32 model and of the unpacked pack on the test split.
"""
from __future__ import annotations

import dataclasses
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from rsedge.compress.ptq import (
    Compressed,
    LAQOptions,
    QuantOptions,
    fake_quantize_model,
    prune_then_quantize,
    quantize_then_prune,
)
from rsedge.compress.unstructured import Calibration, PruneOptions, prunable_weights
from rsedge.runtime.pack import describe, read_pack, unpack_to_onnx
from rsedge.trainer.modelfile import load_model
from rsedge.trainer.records import read_json, write_record
from rsedge.trainer.stage import RunDirKind, build_options, model_items, open_run_dir
from rsedge.trainer.tasks import task_for

from .onnx_export import DEFAULT_OPSET, evaluate_onnx, export_onnx, parity, run_onnx_outputs, run_torch_outputs
from .pack import WritePackOptions, write_pack
from .run import parity_set, preprocess_items, stratified_sample

PACK_FILE = "model.rspack"
PACK_DIR = RunDirKind("a pack", ("model.rspack", "record.json"), resumable=False, announce=False)
ORDERS = {"pq": "P->Q", "qp": "Q->P"}
MAX_ROUNDS = 4
HEADER_BYTES_PER_TENSOR = 320  # the pack's JSON entry of one tensor (uncompressed), for the first reserve


@dataclass
class PackRunOptions:
    """`rsedge pack`. bits None: LAQ widths under target_cr (default 8); bits N: every weight at
    N bits and no target. method None: lap, or fixed with the 2:4 pattern."""

    order: str = "pq"
    method: str | None = None
    sparsity: float = 0.5
    pattern: str | None = None
    bits: int | None = None
    target_cr: float | None = None
    per_channel: bool = True
    clipping: str = "mse"
    clip_grid: int = 80
    data: str | Path | None = None
    calib_images: int = 64
    eval_images: int | None = None
    batch_size: int = 32
    parity_images: int = 8
    opset: int = DEFAULT_OPSET
    dynamic_batch: bool = False  # static batch 1 by default; a bundle that builds batch profiles needs it
    exist_ok: bool = False

    def resolved(self) -> PackRunOptions:
        """The options with their defaults filled in, checked: ValueError says what is wrong."""
        if self.order not in ORDERS:
            raise ValueError(f"--order must be pq or qp, not {self.order!r}")
        if self.bits is not None and self.target_cr is not None:
            raise ValueError("--bits fixes every width, --target-cr lets LAQ choose them: give one of the two")
        method = self.method or ("fixed" if self.pattern else "lap")
        target = None if self.bits is not None else (8.0 if self.target_cr is None else self.target_cr)
        if target is not None and target <= 1:
            raise ValueError(f"--target-cr must be above 1, got {target}")
        for name in ("calib_images", "batch_size", "parity_images"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.eval_images is not None and self.eval_images < 1:
            raise ValueError(f"--eval-images must be at least 1, got {self.eval_images}")
        out = dataclasses.replace(self, method=method, target_cr=target)
        out.prune_options(None).check()
        out.quant_options().check()
        return out

    def prune_options(self, importance: str | None) -> PruneOptions:
        return PruneOptions(sparsity=self.sparsity, method=self.method or "lap", pattern=self.pattern,
                            importance=importance or "weights")

    def quant_options(self) -> QuantOptions:
        return QuantOptions(bits=self.bits or 8, per_channel=self.per_channel, clipping=self.clipping,
                            grid=self.clip_grid)

    def recipe(self) -> str:
        """One line for the log and the pack's metadata."""
        prune = "2:4" if self.pattern else f"{self.method.upper()} {self.sparsity:.0%}"
        bits = f"{self.bits} bits" if self.bits else f"LAQ under CR {self.target_cr:g}"
        scale = "per-channel" if self.per_channel else "per-tensor"
        adaptive = "adaptive " if self.method == "lap" and not self.bits else ""
        return f"{adaptive}{ORDERS[self.order]}: {prune} pruning, {bits}, {scale} {self.clipping} clipping"


# ---- calibration and evaluation images ---------------------------------------------------------

def calibration(meta: dict[str, Any], data: str | Path | None, o: PackRunOptions,
                log: Callable[[str], None]) -> tuple[Calibration | None, dict[str, Any] | None]:
    """Training images of the model's own split (or every image of a foreign `data` folder) for
    loss-based layer importance; the task's loss when its targets are class ids or masks, else the
    label-free output distortion. (None, None) without `data`: the recipe is data-free."""
    import torch

    if data is None:
        return None, None
    src = model_items(meta, data, "train")
    if src is None or not src[1]:
        raise ValueError(f"no training images for calibration in {data}")
    items = stratified_sample(src[1], o.calib_images, seed=5)
    images, targets = preprocess_items(src[0], items, meta)
    task = task_for(meta)
    labelled = isinstance(targets, np.ndarray) and len(targets) == len(images) and targets.dtype.kind in "iu"
    batches: list[Any] = []
    for i in range(0, len(images), o.batch_size):
        x = torch.from_numpy(images[i:i + o.batch_size])
        batches.append((x, torch.from_numpy(targets[i:i + o.batch_size]).long()) if labelled else x)
    loss = task.model_loss(meta) if labelled else None
    calib = Calibration(batches, None if loss is None else (lambda out, y: loss(out, y, None)))
    info = {"images": int(len(images)), "source": str(src[0]), "batches": len(batches),
            "importance": "loss" if labelled else "output distortion"}
    log(f"calibration: {len(images)} training images from {src[0]} ({info['importance']})")
    return calib, info


def evaluation_set(meta: dict[str, Any], data: str | Path, limit: int | None) -> tuple[np.ndarray, Any, str]:
    """The test images of the model's own split (or of `data`), preprocessed as the export's
    parity and guard do, with their targets."""
    src = model_items(meta, data, "test")
    if src is None or not src[1]:
        raise ValueError(f"no labeled test images in {data} to measure the pack's accuracy")
    items = stratified_sample(src[1], limit, seed=4) if limit else [(str(a), b) for a, b in src[1]]
    images, targets = preprocess_items(src[0], items, meta)
    return images, targets, str(src[0])


def _evaluate_fp32(model: Any, meta: dict[str, Any], images: np.ndarray, targets: Any, batch: int) -> dict[str, Any]:
    """The FP32 PyTorch model scored by the runtime's evaluation, as the pack's ONNX is."""
    from rsedge.export.onnx_export import preprocess_spec
    from rsedge.runtime import tasks as device_tasks
    from rsedge.runtime.backends.pytorch import TorchRunner
    from rsedge.runtime.evaluate import evaluate_arrays

    task = task_for(meta)
    spec = preprocess_spec(meta)
    runner = TorchRunner(task.export_module(model, meta).eval(), (3, *meta["input_size"]), device="cpu",
                         metadata=spec, output_names=task.export_outputs(meta)).load()
    try:
        return evaluate_arrays(runner, images, targets, batch=batch, class_names=list(meta["classes"]),
                               task=device_tasks.get_task(task.name))
    finally:
        runner.close()


def accuracy(model: Any, meta: dict[str, Any], onnx_path: Path, o: PackRunOptions,
             log: Callable[[str], None]) -> dict[str, Any]:
    """The task's primary metric of the FP32 model and of the unpacked pack on the test images."""
    images, targets, source = evaluation_set(meta, o.data, o.eval_images)
    fp32 = _evaluate_fp32(model, meta, images, targets, o.batch_size)
    packed = evaluate_onnx(onnx_path, images, targets, task=task_for(meta).name, batch=o.batch_size,
                           metadata={"classes": list(meta["classes"])})
    metric = packed.get("primary") or task_for(meta).primary_metric
    a, b = float(fp32[metric] or 0.0), float(packed[metric] or 0.0)
    out = {"metric": metric, "images": int(len(images)), "source": source, "split": "test", "fp32": a, "pack": b,
           "drop_points": 100 * (a - b)}
    log(f"accuracy on {len(images)} test images: {metric} FP32 {100 * a:.2f} %, pack {100 * b:.2f} % "
        f"(drop {out['drop_points']:.2f} points)")
    return out


# ---- compression under the target --------------------------------------------------------------

def _reserve_bytes(model: Any, quant: QuantOptions) -> int:
    """A first estimate of the pack's bytes besides the quantized weights: every other parameter
    as float32 (BatchNorm is folded into a bias, so this over-counts) and the header entries."""
    quantized = {id(p) for p in prunable_weights(model, quant.selection).values()}
    others = [p for p in model.parameters() if id(p) not in quantized]
    entries = len(quantized) + len(others)
    return 4 * sum(p.numel() for p in others) + HEADER_BYTES_PER_TENSOR * entries


def compress(model: Any, o: PackRunOptions, calib: Calibration | None, budget_bits: int | None) -> Compressed:
    """One pass of the recipe; budget_bits: LAQ's budget for the quantized weights (None: fixed bits)."""
    importance = "loss" if calib is not None else "weights"
    laq = None if budget_bits is None else LAQOptions(budget_bits=int(budget_bits), importance=importance)
    run = prune_then_quantize if o.order == "pq" else quantize_then_prune
    return run(model, o.prune_options(importance), o.quant_options(), laq, calib)


@dataclass
class _Packed:
    compressed: Compressed
    fake: Any
    report: dict[str, Any]
    export: dict[str, Any]


def _write(model: Any, meta: dict[str, Any], compressed: Compressed, pack_path: Path, tmp: Path,
           check: np.ndarray, model_file: Path, o: PackRunOptions) -> _Packed:
    """Export the fake-quantized model and pack it with the codes."""
    fake = fake_quantize_model(model, compressed.qtensors).eval()
    onnx_path = tmp / "fq.onnx"
    info = export_onnx(fake, meta, onnx_path, check, o.opset, o.dynamic_batch, "onnxslim", log=lambda m: None)
    table = {"name": model_file.parent.name or meta["arch"], "arch": meta["arch"], "recipe": o.recipe(),
             "order": compressed.order,
             "bits": sorted({q.bits for q in compressed.qtensors.values()}),
             "sparsity": compressed.prune.total_sparsity if compressed.prune else 0.0}
    report = write_pack(onnx_path, compressed.qtensors, pack_path, table, WritePackOptions(fp32_reference=model_file))
    onnx_path.unlink(missing_ok=True)
    return _Packed(compressed, fake, report, info)


def compress_and_pack(model: Any, meta: dict[str, Any], model_file: Path, pack_path: Path, o: PackRunOptions,
                      calib: Calibration | None, check: np.ndarray, log: Callable[[str], None]
                      ) -> tuple[_Packed, list[dict[str, Any]]]:
    """Compress and pack, again with a larger reserve while the measured CR misses the target."""
    fp32_bytes = os.path.getsize(model_file)
    reserve = _reserve_bytes(model, o.quant_options())
    rounds: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="rsedge-pack-") as tmp:
        for _ in range(MAX_ROUNDS if o.target_cr else 1):
            budget = None if o.target_cr is None else int(8 * (fp32_bytes / o.target_cr - reserve))
            if budget is not None and budget <= 0:
                raise ValueError(f"CR {o.target_cr:g} leaves no bytes for the weights: the model's other tensors "
                                 f"and the pack's header alone take about {reserve} of {fp32_bytes} bytes")
            packed = _write(model, meta, compress(model, o, calib, budget), pack_path, Path(tmp), check,
                            model_file, o)
            cr = packed.report["cr"]
            rounds.append({"budget_bits": budget, "reserve_bytes": reserve if budget else None,
                           "pack_bytes": packed.report["pack_bytes"], "cr": cr})
            if o.target_cr is None or cr >= o.target_cr:
                return packed, rounds
            shortfall = packed.report["pack_bytes"] - fp32_bytes / o.target_cr
            log(f"measured CR {cr:.2f} misses the target {o.target_cr:g} by {shortfall:.0f} bytes: "
                "compressing the weights again with a smaller budget")
            reserve += int(1.1 * shortfall) + 1024
    pack_path.unlink(missing_ok=True)
    raise ValueError(f"no pack reached CR {o.target_cr:g} in {MAX_ROUNDS} rounds (the last measured {cr:.2f}): "
                     "prune more (--sparsity) or lower --target-cr")


# ---- the stage -----------------------------------------------------------------------------------

def round_trip(packed: _Packed, pack_path: Path, meta: dict[str, Any], check: np.ndarray, tmp: Path) -> dict[str, Any]:
    """The device's unpacking (numpy only) run in ONNX Runtime against the fake-quantized model."""
    onnx_path = Path(unpack_to_onnx(str(pack_path), str(tmp / "unpacked")))
    task = task_for(meta)
    want = run_torch_outputs(task.export_module(packed.fake, meta), check, task.export_outputs(meta))
    result = parity(want, run_onnx_outputs(onnx_path, check), task=task.name)
    return {**result, "onnx": onnx_path}


def pack_run(model_file: str | Path, out: str | Path, options: PackRunOptions | None = None, *,
             log: Callable[[str], None] = print, **fields: Any) -> dict[str, Any]:
    """The `pack` stage: OUT/model.rspack and OUT/record.json; returns the record. `fields`
    replace those of `options`."""
    o = build_options(PackRunOptions, options, fields).resolved()
    start = time.perf_counter()
    model_file = Path(model_file)
    model, meta = load_model(model_file)
    model.eval()
    out = open_run_dir(out, exist_ok=o.exist_ok, log=None, kind=PACK_DIR)
    pack_path = out / PACK_FILE
    log(f"packing {model_file} ({meta['arch']}): {o.recipe()}")
    calib, calib_info = calibration(meta, o.data, o, log)
    check, check_source = parity_set(meta, o.data, o.parity_images, log=lambda m: None)
    packed, rounds = compress_and_pack(model, meta, model_file, pack_path, o, calib, check, log)
    seconds_compress = time.perf_counter() - start
    with tempfile.TemporaryDirectory(prefix="rsedge-unpack-") as tmp:
        trip = round_trip(packed, pack_path, meta, check, Path(tmp))
        acc = accuracy(model, meta, trip.pop("onnx"), o, log) if o.data is not None else None
    report = dict(packed.report, pack=PACK_FILE, fp32_file=str(model_file.resolve()))
    write_record(out, "pack", {
        "inputs": {"model": str(model_file.resolve()), "data": str(Path(o.data).resolve()) if o.data else None},
        "parameters": {**dataclasses.asdict(o), "data": str(o.data) if o.data else None},
        "recipe": o.recipe(),
        "calibration": calib_info,
        "compression": packed.compressed.to_dict(),
        "pack": report,
        "rounds": rounds,
        "export": {"parity": packed.export["parity"], "opset": o.opset, "dynamic_batch": o.dynamic_batch,
                   "parity_images": check_source},
        "round_trip": trip,
        "accuracy": acc,
        "device": {**describe(read_pack(str(pack_path))), "file": PACK_FILE},
        "seconds": {"compress_and_pack": round(seconds_compress, 3), "total": round(time.perf_counter() - start, 3)},
        "outputs": {"pack": PACK_FILE},
    })
    record = read_json(out / "record.json")
    log(summary(record, pack_path))
    return record


def summary(record: dict[str, Any], pack_path: Path) -> str:
    """The few lines `rsedge pack` prints."""
    p, c = record["pack"], record["compression"]
    bits = sorted(set(c["bits"].values()))
    sparsity = (c["prune"] or {}).get("total_sparsity", 0.0)
    lines = [f"pack written to {pack_path}: {p['pack_bytes']:,} bytes to send, measured CR {p['cr']:.2f} "
             f"against the FP32 safetensors ({p['fp32_bytes']:,} bytes)",
             f"  {record['recipe']}; weight sparsity {sparsity:.1%}, widths {', '.join(map(str, bits))} bits; "
             f"round trip max |diff| {record['round_trip']['max_abs_diff']:.1e}"]
    acc = record.get("accuracy")
    if acc:
        lines.append(f"  {acc['metric']} on {acc['images']} test images: FP32 {100 * acc['fp32']:.2f} %, pack "
                     f"{100 * acc['pack']:.2f} % ({acc['drop_points']:+.2f} points drop)")
    return "\n".join(lines)
