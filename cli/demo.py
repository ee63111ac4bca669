"""`rsedge demo`: the whole host path on synthetic data, in a few minutes on a laptop CPU.

Every number in the report is measured here: accuracy by running each ONNX file in ONNX Runtime
on the test split, latency by the device runtime's benchmark, sizes from the files written.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from rsedge.trainer.records import atomic_write_bytes, atomic_write_json, now_iso, versions

DEMO_MODEL = "resnet18"
DEMO_IMG = 32


def _settings(fast: bool) -> dict[str, Any]:
    if fast:
        return {"per_class": 40, "epochs": 4, "ft_epochs": 2, "bench_s": 0.5, "iterations": 20}
    return {"per_class": 100, "epochs": 10, "ft_epochs": 8, "bench_s": 3.0, "iterations": 100}


def onnx_accuracy(path: Path, images: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 of an ONNX file by the runtime's evaluation (ONNX Runtime on the CPU)."""
    from rsedge.export.onnx_export import evaluate_onnx

    return float(evaluate_onnx(path, images, labels, task="classification")["top1"])


def format_table(rows: list[dict[str, Any]]) -> str:
    head = ["variant", "accuracy", "params", "MACs", "ONNX MB", "median latency ms", "FPS"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in rows:
        lines.append(
            f"| {r['name']} | {r['accuracy']:.4f} | {r['params']:,} | {r['macs']:,} | {r['onnx_mb']:.2f} | "
            f"{r['latency_ms_median']:.3f} | {r['fps']:.1f} |"
        )
    return "\n".join(lines)


def run_demo(out: str | os.PathLike = "demo_out", fast: bool = False, progress: bool = True) -> dict[str, Any]:
    import torch

    s = _settings(fast)
    out_arg = str(out)
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    threads = min(4, os.cpu_count() or 1)
    torch.set_num_threads(threads)

    def step(msg: str) -> None:
        print(f"\n== [{time.perf_counter() - t_start:6.1f}s] {msg}", flush=True)

    rec = _pipeline(out, s, progress, step)
    images, labels = _test_set(out)
    rows, bench_docs = _measure(out, images, labels, s, threads, step)
    base, pruned, int8 = rows
    checks = {
        "pruned_params_ratio": pruned["params"] / base["params"],
        "pruned_params_at_most_60pct": pruned["params"] <= 0.6 * base["params"],
        "pruned_accuracy_drop_points": 100 * (base["accuracy"] - pruned["accuracy"]),
        "pruned_accuracy_within_3_points": base["accuracy"] - pruned["accuracy"] <= 0.03,
        "int8_size_ratio": int8["onnx_mb"] / pruned["onnx_mb"],
        "int8_at_most_35pct_of_fp32": int8["onnx_mb"] <= 0.35 * pruned["onnx_mb"],
    }
    summary = {
        "variants": rows,
        "checks": checks,
        "settings": {"model": DEMO_MODEL, "img_size": DEMO_IMG, "fast": fast, "threads": threads,
                     "test_images": int(len(labels)), "backend": "onnxruntime CPU", "batch": 1, **s},
        "int8_parity": rec["int8_cpu"]["agreement_with_fp32"],
        "conditions": bench_docs[0].get("conditions", {}),
        "versions": versions(),
        "date": now_iso(),
        "seconds": round(time.perf_counter() - t_start, 1),
    }
    atomic_write_json(out / "summary.json", summary)
    table = format_table(rows)
    report = _report(summary, table, out_arg, fast)
    atomic_write_bytes(out / "report.md", report.encode())
    print("\n" + table + "\n")
    print(report.split("\n\n", 3)[3] if report.count("\n\n") >= 3 else "")
    print(f"report: {out / 'report.md'}   summary: {out / 'summary.json'}")
    return summary


def _pipeline(out: Path, s: dict[str, Any], progress: bool, step: Callable[[str], None]) -> dict[str, Any]:
    """Data, train, prune, fine-tune, export: each stage with its options, as the CLI runs them;
    returns the pruned model's export record."""
    from rsedge.compress.finetune import FinetuneOptions, finetune_run
    from rsedge.compress.prune import PruneOptions, prune_run
    from rsedge.export.run import ExportOptions, export_run
    from rsedge.trainer.run import TrainOptions, train_run
    from rsedge.trainer.synth import make_synthetic_dataset
    from rsedge.trainer.train import TrainConfig

    data = out / "data"
    step(f"synthetic land-cover data -> {data}")
    make_synthetic_dataset(data, per_class=s["per_class"], size=64, seed=0, exist_ok=True)  # a rerun replaces it

    step(f"train {DEMO_MODEL} at {DEMO_IMG}x{DEMO_IMG}")
    workers = 0 if (os.cpu_count() or 1) <= 2 else 2
    cfg = TrainConfig(epochs=s["epochs"], batch_size=32, optimizer="adamw", lr=2e-3, warmup_epochs=1, seed=0,
                      workers=workers)
    train_run(data, DEMO_MODEL, out / "baseline", TrainOptions(img_size=DEMO_IMG, cfg=cfg, progress=progress,
                                                               exist_ok=True))

    step("prune 50 % of the channels of every layer (filter L1 norm, multiples of 8)")
    prune_run(out / "baseline" / "model.safetensors", out / "pruned",
              PruneOptions(method="l1", ratio=0.5, round_to=8, data=data, exist_ok=True))

    step("fine-tune the pruned model")
    ft_cfg = TrainConfig(epochs=s["ft_epochs"], batch_size=32, optimizer="adamw", lr=1e-3, seed=0, workers=workers)
    finetune_run(out / "pruned" / "model.safetensors", data, out / "finetuned",
                 FinetuneOptions(cfg=ft_cfg, progress=progress, exist_ok=True))

    step("export baseline to ONNX")
    export_run(out / "baseline" / "model.safetensors", out / "export_baseline", ExportOptions(exist_ok=True))
    step("export the pruned model to ONNX and INT8 Q/DQ ONNX (one for TensorRT, one for ONNX Runtime's CPU kernels)")
    rec = export_run(out / "finetuned" / "model.safetensors", out / "export_pruned",
                     ExportOptions(int8=True, calib_data=data, calib_size=256, exist_ok=True))
    if rec["int8_cpu"]["status"] != "written":
        raise RuntimeError(f"the CPU INT8 variant was not written: {rec['int8_cpu']['reason']}")
    return rec


def _test_set(out: Path) -> tuple[np.ndarray, np.ndarray]:
    """The baseline's test split, preprocessed as the models expect it."""
    from rsedge.export.run import preprocess_items
    from rsedge.trainer.datasets import load_split
    from rsedge.trainer.modelfile import read_metadata

    split = load_split(out / "baseline" / "split.json")
    return preprocess_items(split["root"], split["test"], read_metadata(out / "baseline" / "model.safetensors"))


def _measure(out: Path, images: np.ndarray, labels: np.ndarray, s: dict[str, Any], threads: int,
             step: Callable[[str], None]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Accuracy and latency of each variant; (the table's rows, the benchmark documents)."""
    from rsedge.runtime.bench.benchmark import run_benchmark

    variants = [
        ("baseline", out / "export_baseline" / "model.onnx", out / "export_baseline" / "record.json", "onnx"),
        ("pruned", out / "export_pruned" / "model.onnx", out / "export_pruned" / "record.json", "onnx"),
        # the benchmark runs ONNX Runtime on this CPU: the INT8 variant made for it, not TensorRT's
        ("pruned-int8", out / "export_pruned" / "model_int8_cpu.onnx", out / "export_pruned" / "record.json",
         "int8_cpu"),
    ]
    rows, bench_docs = [], []
    for name, path, record_path, key in variants:
        step(f"accuracy and latency of {name} ({path.name})")
        record = json.loads(record_path.read_text())
        acc = onnx_accuracy(path, images, labels)
        bench = run_benchmark(str(path), backend="onnxruntime", batch_sizes=(1,), warmup_s=0.3,
                              iterations=s["iterations"], duration_s=s["bench_s"], threads=threads,
                              power=False, log=lambda m: None)
        bench_docs.append(bench)
        r0 = bench["results"][0]
        pytorch_counts = record["onnx"]["pytorch"]
        rows.append({
            "name": name,
            "file": str(path.relative_to(out)),
            "accuracy": acc,
            "params": pytorch_counts["params"],
            "macs": pytorch_counts["macs"],
            "onnx_params": record[key]["graph"]["params"],
            "onnx_macs": record[key]["graph"]["macs"],
            "onnx_mb": path.stat().st_size / 1e6,
            "latency_ms_median": r0["latency_ms"]["median"],
            "latency_ms_p90": r0["latency_ms"]["p90"],
            "latency_ms_p99": r0["latency_ms"]["p99"],
            "fps": r0["throughput_ips"],
        })
        print(f"   accuracy {acc:.4f}, median {r0['latency_ms']['median']:.3f} ms, {r0['throughput_ips']:.1f} FPS")
    return rows, bench_docs


def _report(summary: dict[str, Any], table: str, out_arg: str, fast: bool) -> str:
    """report.md: the table, the checks in words, how to reproduce."""
    rows, checks, st = summary["variants"], summary["checks"], summary["settings"]
    _, pruned, int8 = rows
    conditions = summary["conditions"]
    cpu = conditions.get("cpu") or conditions.get("cpu_model") or "this CPU"
    return (
        f"# rsedge demo\n\n{DEMO_MODEL} on synthetic land-cover data ({st['test_images']} test images, "
        f"{DEMO_IMG}x{DEMO_IMG}); accuracy from ONNX Runtime on the test split; latency: ONNX Runtime CPU, batch 1, "
        f"{st['threads']} threads, on {cpu}.\n\n{table}\n\n"
        f"- pruned parameters: {checks['pruned_params_ratio']:.1%} of the baseline "
        f"({'ok' if checks['pruned_params_at_most_60pct'] else 'ABOVE 60 %'})\n"
        f"- accuracy change after pruning and fine-tuning: {0.0 - checks['pruned_accuracy_drop_points']:+.2f} points "
        f"({'ok' if checks['pruned_accuracy_within_3_points'] else 'MORE THAN 3 POINTS LOST'})\n"
        f"- INT8 file: {checks['int8_size_ratio']:.1%} of the FP32 pruned file "
        f"({'ok' if checks['int8_at_most_35pct_of_fp32'] else 'ABOVE 35 %'})\n\n"
        f"{_int8_words(pruned['latency_ms_median'] / int8['latency_ms_median'])}\n\n"
        f"Reproduce: `rsedge demo --out {out_arg}{' --fast' if fast else ''}` "
        f"({summary['seconds']:.0f} s, {summary['date']}).\n"
    )


def _int8_words(speedup: float) -> str:
    """The report's line on the INT8 row, true to the speed measured."""
    words = (f"pruned-int8 is `model_int8_cpu.onnx`, the INT8 variant made for ONNX Runtime's CPU kernels (uint8 "
             f"activations): {speedup:.2f}x the speed of the FP32 pruned model here")
    if speedup < 1.2:
        words += (f"; on {DEMO_IMG}x{DEMO_IMG} images the quantize and dequantize steps cost "
                  f"{'more than' if speedup < 0.95 else 'about'} what the int8 arithmetic saves (ResNet18 at 224 px: "
                  "benchmarks/results/int8_cpu_resnet18.md)")
    return words + ". `model_int8.onnx` is the INT8 variant for TensorRT, built into an engine on the device."
