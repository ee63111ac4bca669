"""CPU INT8 for ONNX Runtime: ResNet18 at 224 px, FP32 against three INT8 files, in one run.

Goal (issue "Honest outputs"): rsedge's CPU INT8 variant (`model_int8_cpu.onnx`: uint8
activations, int8 per-channel 7-bit weights, U8S8 Q/DQ) at least 2.5x faster than FP32 in ONNX
Runtime, not slower than the ten lines of `onnxruntime.quantization.quantize_static` a user
would write, and within 1 point of FP32 top-1. The TensorRT-convention INT8 (`model_int8.onnx`:
symmetric int8 activations) is measured beside them.

Stages, each resumed from benchmarks/work/int8_cpu/ when it is already done:
1. a seeded stratified 70/10/20 split of the data folder (default: the shared EuroSAT RGB), and a
   ResNet18 pre-trained from scratch at the images' native 64 px, then trained at 224 px from those
   weights, each on a small stratified subset of the training part (a few CPU minutes in all);
2. `rsedge export --int8 --max-drop 1 --dynamic-batch` (both INT8 variants, guarded);
3. the glue: onnxruntime's pre-processing pass and `quantize_static` with its CPU settings
   (QDQ, QUInt8 activations, QInt8 per-channel weights) on the same calibration tensors;
4. top-1 of the four files in ONNX Runtime on the same stratified sample of the validation
   split, and their batch-1 latency with the runtime's own benchmark (rsedge.runtime.bench.benchmark),
   the same settings for all, in interleaved rounds (ABCD, DCBA, ...) so drift cancels.

    python benchmarks/bench_int8_cpu.py --commit-results

Results: int8_cpu_resnet18.{json,md} in benchmarks/work/results/, or in benchmarks/results/ with
--commit-results.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import numpy as np
from bench_output import Formatter, add_output_options, results_dir

HERE = Path(__file__).resolve().parent
ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_tile", "amx_int8", "avx512_bf16")
FILES = {"fp32": "model.onnx", "int8-qdq (TensorRT convention)": "model_int8.onnx",
         "int8-cpu (rsedge, for ONNX Runtime)": "model_int8_cpu.onnx", "quantize_static glue": "glue_int8.onnx"}
# --sweep: other quantize_static settings, to see whether any runs faster on this CPU
SWEEP = {"sweep: U8S8 per tensor": ("sweep_u8s8_per_tensor.onnx", {"per_channel": False}),
         "sweep: U8S8 per channel, QOperator": ("sweep_u8s8_qoperator.onnx", {"quant_format": "QOperator"}),
         "sweep: U8U8 per channel": ("sweep_u8u8.onnx", {"weight_type": "QUInt8"})}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=Formatter)
    p.add_argument("--data", default=str(HERE.parent.parent / "shared" / "data" / "eurosat_rgb"),
                   help="image-folder dataset (one folder per class); default: the shared EuroSAT RGB, "
                        "../shared/data/eurosat_rgb from the project root")
    p.add_argument("--img-size", type=int, default=224, help="input side in pixels, for training and inference")
    p.add_argument("--pretrain-per-class", type=int, default=100,
                   help="images per class (stratified, of the training split) for the 64 px pre-training")
    p.add_argument("--pretrain-epochs", type=int, default=10,
                   help="epochs of the 64 px pre-training (AdamW, lr 2e-3, cosine, from scratch)")
    p.add_argument("--train-per-class", type=int, default=30,
                   help="images per class (stratified, of the training split) for the training at --img-size: "
                        "keeps the training cost to minutes on a 2-core CPU")
    p.add_argument("--epochs", type=int, default=2,
                   help="epochs at --img-size, from the 64 px weights (AdamW, lr 5e-4, cosine)")
    p.add_argument("--eval-images", type=int, default=1000,
                   help="validation images (stratified, from the full validation part) every file's top-1 is "
                        "measured on")
    p.add_argument("--calib-size", type=int, default=256, help="INT8 calibration images from the training split")
    p.add_argument("--max-drop", type=float, default=1.0, help="the export's INT8 accuracy guard, top-1 points")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                   help="ONNX Runtime intra-op threads for every latency measurement (default: this machine's "
                        "CPU count)")
    p.add_argument("--rounds", type=int, default=5,
                   help="interleaved latency rounds; each model's latency is the median of its round medians, and "
                        "two files are compared by the median of their per-round ratios")
    p.add_argument("--duration", type=float, default=5.0, help="seconds of timed batch-1 runs per model and round")
    p.add_argument("--warmup", type=float, default=1.0, help="warm-up seconds before each timed section")
    p.add_argument("--sweep", action="store_true",
                   help="also measure other quantize_static settings (U8S8 per tensor, U8S8 in QOperator format, "
                        "U8U8), to see whether any is faster on this CPU")
    p.add_argument("--seed", type=int, default=0, help="split, subset, initialization and data-order seed")
    p.add_argument("--work", default=str(HERE / "work" / "int8_cpu"),
                   help="run directories and the cached model (resumable)")
    add_output_options(p, "--out")
    return p


def machine() -> dict:
    """The CPU, its INT8-relevant instruction sets, and how busy the machine was."""
    flags, model = set(), platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and model in ("", platform.processor()):
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return {"cpu": model, "cpu_count": os.cpu_count(), "isa": {f: f in flags for f in ISA_FLAGS},
            "vnni": bool(flags & {"avx512_vnni", "avx_vnni"}), "platform": platform.platform(),
            "loadavg_1_5_15": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}


def make_splits(args, data: Path, work: Path) -> None:
    """split_full.json (seeded 70/10/20) and, per training stage, its stratified subset: the trainer
    evaluates its validation part every epoch and its test part at the end, so those stay at 10
    images per class; the benchmark's own evaluation set comes from the full validation part."""
    from rsedge.export.run import stratified_sample
    from rsedge.trainer.datasets import make_split, save_split

    if (work / "split.json").is_file():
        return
    full = make_split(data, val=0.1, test=0.2, seed=args.seed)
    work.mkdir(parents=True, exist_ok=True)
    save_split(full, work / "split_full.json")
    for name, per_class in (("split_pretrain.json", args.pretrain_per_class), ("split.json", args.train_per_class)):
        split = json.loads(json.dumps(full))
        for part, n in (("train", per_class), ("val", 10), ("test", 10)):
            split[part] = [list(x) for x in stratified_sample(full[part], n * len(full["classes"]), seed=args.seed)]
            split["counts"][part] = len(split[part])
        split["subset"] = {"train_per_class": per_class, "val_per_class": 10, "test_per_class": 10}
        save_split(split, work / name)


def train(args, data: Path, work: Path, log) -> Path:
    """Pre-train at the images' native 64 px (cheap), then train at `--img-size` from those weights:
    a usable model for a few CPU minutes, where training from scratch at 224 px is not."""
    from rsedge.trainer.run import train_run
    from rsedge.trainer.train import TrainConfig

    make_splits(args, data, work)
    pre = TrainConfig(epochs=args.pretrain_epochs, batch_size=32, optimizer="adamw", lr=2e-3, warmup_epochs=1,
                      seed=args.seed, workers=1)
    log(f"pre-train resnet18 at 64 px from scratch on {args.pretrain_per_class} images per class "
        f"({args.pretrain_epochs} epochs)")
    train_run(data, "resnet18", work / "pretrain", img_size=64, cfg=pre, split_file=str(work / "split_pretrain.json"),
              resume=True, log=log)
    cfg = TrainConfig(epochs=args.epochs, batch_size=32, optimizer="adamw", lr=5e-4, seed=args.seed, workers=1)
    log(f"train resnet18 at {args.img_size} px from the 64 px weights on {args.train_per_class} images per class "
        f"({args.epochs} epochs)")
    train_run(data, "resnet18", work / "train", img_size=args.img_size, cfg=cfg, split_file=str(work / "split.json"),
              weights=str(work / "pretrain" / "model.safetensors"), resume=True, log=log)
    return work / "train" / "model.safetensors"


def export(args, model_file: Path, data: Path, work: Path, log) -> dict:
    from rsedge.export.run import export_run

    out = work / "export"
    wanted = {"int8": True, "calib_size": args.calib_size, "max_drop": args.max_drop, "dynamic_batch": True}
    record_file = out / "record.json"
    if record_file.is_file():
        rec = json.loads(record_file.read_text())
        if all(rec["parameters"].get(k) == v for k, v in wanted.items()) and "int8_cpu" in rec:
            return rec
    return export_run(model_file, out, int8=True, calib_data=data, data=data, calib_size=args.calib_size,
                      max_drop=args.max_drop, dynamic_batch=True, exist_ok=True, log=log)


def glue(fp32: Path, calib_dir: Path, out: Path, change: dict | None = None) -> None:
    """What a user writes from onnxruntime's documentation: its pre-processing pass, then
    quantize_static with the CPU settings (QDQ, uint8 activations, int8 per-channel weights);
    `change` overrides some of them (QuantFormat / QuantType members by name)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    calib = np.concatenate([np.load(f) for f in sorted(calib_dir.glob("calib_*.npy"))])

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{"input": calib[i:i + 16]} for i in range(0, len(calib), 16)])

        def get_next(self):
            return next(self.batches, None)

    pre = out.with_name("glue_pre.onnx")
    quant_pre_process(str(fp32), str(pre))
    settings = {"quant_format": QuantFormat.QDQ, "per_channel": True, "activation_type": QuantType.QUInt8,
                "weight_type": QuantType.QInt8}
    for k, v in (change or {}).items():
        settings[k] = getattr(QuantFormat if k == "quant_format" else QuantType, v) if isinstance(v, str) else v
    quantize_static(str(pre), str(out), Reader(), **settings)
    pre.unlink()


def eval_set(args, work: Path, model_file: Path) -> tuple[np.ndarray, np.ndarray]:
    """A stratified sample of the full validation part (never trained on), preprocessed as the
    model's metadata says; cached."""
    from rsedge.export.run import preprocess_items, stratified_sample
    from rsedge.trainer.datasets import load_split
    from rsedge.trainer.modelfile import read_metadata

    cache = work / f"eval_{args.eval_images}.npz"
    if cache.is_file():
        z = np.load(cache)
        return z["images"], z["labels"]
    full = load_split(work / "split_full.json")
    items = stratified_sample(full["val"], args.eval_images, seed=3)
    images, labels = preprocess_items(full["root"], items, read_metadata(model_file))
    np.savez(cache, images=images, labels=labels)
    return images, labels


def latency(paths: dict[str, Path], args, log) -> dict[str, dict]:
    """Batch-1 latency of each file with rsedge.runtime.bench.benchmark, in interleaved rounds."""
    from rsedge.runtime.bench.benchmark import run_benchmark

    rounds: dict[str, list[float]] = {k: [] for k in paths}
    docs: dict[str, dict] = {}
    names = list(paths)
    for r in range(args.rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            doc = run_benchmark(str(paths[name]), backend="onnxruntime", batch_sizes=(1,), warmup_s=args.warmup,
                                iterations=20, duration_s=args.duration, threads=args.threads, providers=["cpu"],
                                power=False)
            med = doc["results"][0]["latency_ms"]["median"]
            rounds[name].append(med)
            docs[name] = doc
            log(f"round {r + 1}/{args.rounds} {name}: median {med:.2f} ms")
    out = {}
    for name in names:
        last = docs[name]["results"][0]
        out[name] = {"median_ms": float(np.median(rounds[name])), "round_medians_ms": rounds[name],
                     "last_round": {k: last[k] for k in ("latency_ms", "cv", "throughput_ips", "iterations")},
                     "precision": docs[name]["precision"], "provider": docs[name]["provider"]}
    return out


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from rsedge.export.onnx_export import evaluate_onnx
    from rsedge.export.onnx_graph import int8_coverage
    from rsedge.trainer.records import atomic_write_bytes, atomic_write_json, now_iso, versions

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    data, work = Path(args.data).resolve(), Path(args.work).resolve()
    load_before = machine()["loadavg_1_5_15"]
    t0 = time.time()
    reused = [stage for stage, path in (("training", work / "train" / "model.safetensors"),
                                        ("export", work / "export" / "record.json"),
                                        ("glue", work / "export" / FILES["quantize_static glue"]))
              if path.is_file()]
    model_file = train(args, data, work, log)
    rec = export(args, model_file, data, work, log)
    ex = work / "export"
    missing = [k for k in ("int8", "int8_cpu") if rec[k]["status"] != "written"]
    if missing:
        raise SystemExit(f"the export rejected {', '.join(missing)}: {[rec[k]['reason'] for k in missing]}")
    if not (ex / FILES["quantize_static glue"]).is_file():
        log("quantize_static glue on the export's calibration tensors")
        glue(ex / "model.onnx", ex / "calib", ex / FILES["quantize_static glue"])
    files = dict(FILES)
    for name, (file_name, change) in (SWEEP.items() if args.sweep else ()):
        if not (ex / file_name).is_file():
            log(f"{name}: quantize_static with {change}")
            glue(ex / "model.onnx", ex / "calib", ex / file_name, change)
        files[name] = file_name
    images, labels = eval_set(args, work, model_file)
    paths = {name: ex / f for name, f in files.items()}
    rows = {}
    for name, path in paths.items():
        acc = evaluate_onnx(path, images, labels, task="classification")
        rows[name] = {"file": path.name, "correct": int(acc["correct"]), "images": int(len(labels)),
                      "top1": float(acc["top1"]), "mb": path.stat().st_size / 1e6,
                      **(int8_coverage(path) if name != "fp32" else {})}
        log(f"{name}: top-1 {rows[name]['correct']}/{len(labels)}")
    for name, lat in latency(paths, args, log).items():
        rows[name].update(lat)
    doc = summarize(args, rows, rec, model_file, load_before, t0)
    doc["reused_stages"] = reused
    doc.update(versions=versions(), date=now_iso())
    folder = results_dir(args.out, args.commit_results)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_json(folder / "int8_cpu_resnet18.json", doc)
    atomic_write_bytes(folder / "int8_cpu_resnet18.md", markdown(doc).encode())
    print(markdown(doc))
    log(f"wrote {folder / 'int8_cpu_resnet18.md'} and .json")
    return 0


def summarize(args, rows: dict, rec: dict, model_file: Path, load_before, t0: float) -> dict:
    fp32, cpu, glue_row = rows["fp32"], rows["int8-cpu (rsedge, for ONNX Runtime)"], rows["quantize_static glue"]
    n = fp32["images"]
    for r in rows.values():
        r["speedup_vs_fp32"] = fp32["median_ms"] / r["median_ms"]
        r["drop_points"] = 100 * (fp32["correct"] - r["correct"]) / n
    train_rec = json.loads((model_file.parent / "record.json").read_text())
    for r in rows.values():  # per round, against the round's FP32 and glue: drift between rounds cancels
        r["paired_speedup_vs_fp32"] = float(np.median(np.divide(fp32["round_medians_ms"], r["round_medians_ms"])))
        r["paired_ratio_vs_glue"] = float(np.median(np.divide(r["round_medians_ms"], glue_row["round_medians_ms"])))
    goals = {
        "cpu_int8_at_least_2.5x_fp32": cpu["paired_speedup_vs_fp32"] >= 2.5,
        # two files with the same kernels differ by noise only: "not slower" allows 3 %
        "cpu_int8_not_slower_than_glue_within_3pct": cpu["paired_ratio_vs_glue"] <= 1.03,
        "cpu_int8_within_1_point_top1": fp32["correct"] - cpu["correct"] <= n // 100,
    }
    return {
        "command": "python " + " ".join(shlex.quote(a) for a in [Path(sys.argv[0]).as_posix()] + sys.argv[1:]),
        "settings": {k: v for k, v in vars(args).items() if k not in ("out", "commit_results", "work")},
        "machine": {**machine(), "loadavg_at_start_1_5_15": load_before},
        "model": {"arch": "resnet18", "img_size": args.img_size, "data": train_rec["inputs"]["data"],
                  "epochs": args.epochs, "train_images": len(json.loads((model_file.parent.parent / "split.json")
                                                                        .read_text())["train"]),
                  "test_top1_pytorch": train_rec["test"]["top1"], "test_images": train_rec["test"]["samples"]},
        "export_guard": {k: {f: rec[k][f] for f in ("status", "validation_images", "fp32_correct", "int8_correct",
                                                      "budget_images", "kept_in_float", "quantized_nodes",
                                                      "quantizable_nodes")}
                         for k in ("int8", "int8_cpu")},
        "rows": rows,
        "goals": goals,
        "seconds": round(time.time() - t0, 1),
    }


def markdown(doc: dict) -> str:
    m, s = doc["machine"], doc["settings"]
    isa = ", ".join(f for f, on in m["isa"].items() if on) or "none of " + ", ".join(m["isa"])
    lines = [
        "# CPU INT8 in ONNX Runtime: ResNet18 at 224 px",
        "",
        f"`{doc['command']}` ({doc['date']}, {doc['seconds']:.0f} s"
        + (f"; {', '.join(doc['reused_stages'])} reused from an earlier run in the work folder" if doc["reused_stages"]
           else "") + ")",
        "",
        f"Machine: {m['cpu']}, {m['cpu_count']} CPUs, INT8-relevant ISA: {isa} "
        f"(VNNI: {'yes' if m['vnni'] else 'no'}); load average {m['loadavg_at_start_1_5_15'][0]:.2f} at the start "
        f"and {m['loadavg_1_5_15'][0]:.2f} at the end (other jobs shared the CPU when it is above 0). "
        f"onnxruntime {doc['versions'].get('onnxruntime')}, {s['threads']} intra-op thread(s), batch 1, "
        f"{s['rounds']} interleaved rounds of {s['duration']:g} s per model.",
        "",
        f"Model: ResNet18 pre-trained from scratch at 64 px for {s['pretrain_epochs']} epochs on "
        f"{s['pretrain_per_class']} images per class, then trained at {s['img_size']} px for {s['epochs']} epochs "
        f"on {s['train_per_class']} images per class, from the training split (a short run to have real weights "
        "and activations, not a full training: its top-1, "
        f"{doc['model']['test_top1_pytorch']:.3f} in PyTorch on {doc['model']['test_images']} test images, is "
        "below a full run's). Top-1 of every file in ONNX "
        f"Runtime on the same {doc['rows']['fp32']['images']} validation images (stratified, never trained on). "
        "The export's INT8 guard (--max-drop {}) measured on the model's own 100-image validation part: "
        "{}.".format(s["max_drop"], "; ".join(
            f"{k}: {g['status']}, {g['int8_correct']}/{g['validation_images']} vs FP32 {g['fp32_correct']}, "
            f"{g['quantized_nodes']}/{g['quantizable_nodes']} nodes int8" for k, g in doc["export_guard"].items())),
        "",
        "| file | top-1 | drop (points) | int8 nodes | MB | median latency ms | speed-up vs FP32 | time vs glue |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in doc["rows"].items():
        nodes = f"{r['quantized_nodes']}/{r['quantizable_nodes']}" if "quantized_nodes" in r else "-"
        lines.append(f"| {name} (`{r['file']}`) | {r['top1']:.4f} ({r['correct']}/{r['images']}) | "
                     f"{r['drop_points']:+.1f} | {nodes} | {r['mb']:.1f} | {r['median_ms']:.2f} | "
                     f"{r['paired_speedup_vs_fp32']:.2f}x | {r['paired_ratio_vs_glue']:.2f} |")
    lines += ["", "Round medians (ms): " + "; ".join(
        f"{name}: " + ", ".join(f"{v:.2f}" for v in r["round_medians_ms"]) for name, r in doc["rows"].items()), ""]
    lines += ["Goals:", ""] + [f"- {k}: {'met' if v else 'NOT MET'}" for k, v in doc["goals"].items()]
    rows = doc["rows"]
    cpu, trt = rows["int8-cpu (rsedge, for ONNX Runtime)"], rows["int8-qdq (TensorRT convention)"]
    faster = [k for k, r in rows.items() if k != "fp32" and r["paired_ratio_vs_glue"] < cpu["paired_ratio_vs_glue"]
              / 1.03]
    lines += ["", "Speed-ups and times against the glue are medians of per-round ratios (each round times every "
              "file once, so drift between rounds cancels)."]
    if not doc["goals"]["cpu_int8_at_least_2.5x_fp32"] and not m["vnni"]:
        lines += ["", "This CPU has no VNNI (neither AVX-512 VNNI nor AVX-VNNI): ONNX Runtime's U8S8 kernels "
                  "multiply with AVX2's VPMADDUBSW + VPMADDWD, about twice FP32's FMA rate at best; "
                  + ("no INT8 file here is more than 3 % faster than rsedge's CPU variant."
                     if not faster else "faster than rsedge's CPU variant by more than 3 %: " + ", ".join(faster)
                     + ".")]
    if trt["paired_speedup_vs_fp32"] < 1:
        lines += ["", f"The symmetric int8 file made for TensorRT runs {1 / trt['paired_speedup_vs_fp32']:.2f}x "
                  "slower than FP32 in ONNX Runtime here: the reason the CPU variant exists."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
