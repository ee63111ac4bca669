"""Reproduce RemoteTrimmer's Table I (seed paper 000) on real EuroSAT, with real latency.

    python benchmarks/reproduce_remotetrimmer.py                       # ResNet18, the paper's settings
    python benchmarks/reproduce_remotetrimmer.py --subset 0.25 --epochs 8 --ft-epochs 8   # a shorter run
    python benchmarks/reproduce_remotetrimmer.py --model vgg16_bn      # the VGG16 half

A seeded, stratified 80/20 train/test split of the data folder; the baseline trained at 64x64
(the input size the paper's MACs imply); then for each method: prune at rate 0.7 (the paper's
per-layer rate), fine-tune with the paper's schedule (SGD, lr 1e-3, x0.9 at 50 % and 75 % of the
epochs, batch 64), evaluate on the test split, export FP32 and INT8 Q/DQ ONNX, and benchmark both
with the device runtime on this machine (ONNX Runtime, batch 1). CUDA is used for training when
present. Every stage writes its run directory under `--work` and is skipped when its record
exists, so a stopped run continues where it was.

Results: `remotetrimmer_eurosat_<model>.{json,md,png}` in benchmarks/work/results/ (in
benchmarks/results/ with --commit-results): per method accuracy,
change against the baseline, params, MACs, ONNX MB, FP32 and INT8 median latency and FPS, the
paper's numbers beside ours, the command, versions, machine and date; the PNG plots accuracy
against latency with the Pareto front marked.
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

from bench_output import Formatter, add_output_options, gpu_name, log, results_dir

HERE = Path(__file__).resolve().parent

# (method, pruning criterion, fine-tuning loss)
METHODS = {
    "bn-scale": ("bn-scale", "ce"),
    "l1": ("l1", "ce"),
    "fpgm": ("fpgm", "ce"),
    "group": ("group", "ce"),
    "taylor": ("taylor", "ce"),
    "cap": ("cap", "ce"),
    "cap+aml": ("cap", "aml"),
}

# Table I (EuroSAT columns), Table II (CAP alone) of the paper; None where it reports nothing.
PAPER = {
    "resnet18": {
        "baseline": {"acc": 0.870, "macs_g": 0.15, "params_m": 11.18},
        "bn-scale": {"acc": 0.870, "params_m": 1.00},
        "l1": {"acc": 0.872, "macs_g": 0.02},
        "fpgm": {"acc": 0.882},
        "group": {"acc": 0.882},
        "taylor": {},
        "cap": {"acc": 0.917},
        "cap+aml": {"acc": 0.922},
    },
    "vgg16_bn": {
        "baseline": {"acc": 0.957, "macs_g": 1.38, "params_m": 134.31},
        "bn-scale": {"acc": 0.954, "params_m": 48.90},
        "l1": {"acc": 0.955, "macs_g": 0.16},
        "fpgm": {"acc": 0.955},
        "group": {"acc": 0.953},
        "taylor": {},
        "cap": {"acc": 0.956},
        "cap+aml": {"acc": 0.957},
    },
}
PAPER_NAMES = {"bn-scale": "BN", "l1": "L1-norm", "fpgm": "FPGM", "group": "DepGraph", "taylor": "(not in the paper)",
               "cap": "CAP (Table II)", "cap+aml": "Ours (CAP + AML)", "baseline": "baseline"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=Formatter)
    p.add_argument("--data", default=str(HERE.parent.parent / "shared" / "data" / "eurosat_rgb"),
                   help="EuroSAT RGB folder (one folder per class)")
    p.add_argument("--model", default="resnet18", choices=sorted(PAPER), help="architecture")
    p.add_argument("--img-size", type=int, default=64, help="input side")
    p.add_argument("--subset", type=float, default=1.0, help="fraction of the training split used (test: all)")
    p.add_argument("--epochs", type=int, default=30, help="baseline training epochs (AdamW, cosine)")
    p.add_argument("--ft-epochs", type=int, default=40, help="fine-tuning epochs (the paper: 40 for ResNet18)")
    p.add_argument("--ratio", type=float, default=0.7, help="pruning rate")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS), help="methods to run")
    p.add_argument("--batch-size", type=int, default=64, help="training batch (the paper: 64 for ResNet18)")
    p.add_argument("--workers", type=int, default=1, help="data-loading workers")
    p.add_argument("--calib-size", type=int, default=512, help="INT8 calibration images from the training split")
    p.add_argument("--bench-seconds", type=float, default=3.0, help="timed seconds per benchmark")
    p.add_argument("--threads", type=int, default=None, help="ONNX Runtime threads for the benchmarks")
    p.add_argument("--seed", type=int, default=0, help="split, initialization and data-order seed")
    p.add_argument("--work", default=str(HERE / "work" / "remotetrimmer"), help="run directories (resumable)")
    add_output_options(p, "--results", "the json, md and png")
    return p


def parse_args(argv=None):
    return build_parser().parse_args(argv)


def make_split(data: Path, subset: float, seed: int, path: Path) -> dict:
    """80/20 stratified train/test (no validation part: the paper has none); the training part
    optionally cut to `subset` of each class."""
    from rsedge.export.run import stratified_sample
    from rsedge.trainer.datasets import load_split, save_split
    from rsedge.trainer.datasets import make_split as _make

    if path.is_file():
        return load_split(path)
    log(f"splitting {data} 80/20 with seed {seed} (every image is decoded once)")
    split = _make(data, val=0.0, test=0.2, seed=seed)
    if subset < 1:
        n = max(len(split["classes"]), int(round(len(split["train"]) * subset)))
        split["train"] = [list(x) for x in stratified_sample(split["train"], n, seed=seed)]
        split["counts"]["train"] = len(split["train"])
    split["subset"] = subset
    save_split(split, path)
    return split


def test_arrays(split: dict, meta: dict, cache: Path):
    import numpy as np

    from rsedge.export.run import preprocess_items

    if cache.is_file():
        z = np.load(cache)
        return z["images"], z["labels"]
    log(f"preprocessing the {len(split['test'])} test images once")
    images, labels = preprocess_items(split["root"], split["test"], meta)
    tmp = cache.with_name(cache.name + ".tmp.npz")
    np.savez(tmp, images=images, labels=labels)
    os.replace(tmp, cache)
    return images, labels


def measure(export_dir: Path, images, labels, args) -> dict:
    """FP32 and INT8: test top-1 in ONNX Runtime and benchmark latency; cached in bench.json."""

    from rsedge.export.onnx_export import evaluate_onnx
    from rsedge.runtime.bench.benchmark import run_benchmark

    cache = export_dir / "bench.json"
    if cache.is_file():
        return json.loads(cache.read_text())
    out = {}
    # latency is measured with ONNX Runtime on the CPU: the INT8 file made for it (uint8 activations),
    # not the TensorRT-convention one, which ONNX Runtime's CPU kernels run slower than FP32
    for key, name in (("fp32", "model.onnx"), ("int8", "model_int8_cpu.onnx")):
        path = export_dir / name
        if not path.is_file():
            raise SystemExit(f"{path} was not written (its export record says why): rerun that export")
        acc = float(evaluate_onnx(path, images, labels, task="classification", batch=256)["top1"])
        bench = run_benchmark(str(path), backend="onnxruntime", batch_sizes=(1,), warmup_s=0.5, iterations=50,
                              duration_s=args.bench_seconds, threads=args.threads, power=False)
        r = bench["results"][0]
        out[key] = {"test_top1_onnxruntime": acc, "latency_ms": r["latency_ms"], "fps": r["throughput_ips"],
                    "onnx_mb": path.stat().st_size / 1e6, "provider": bench.get("provider"),
                    "conditions": bench.get("conditions", {})}
        log(f"  {export_dir.name} {key}: top-1 {acc:.4f}, median {r['latency_ms']['median']:.3f} ms")
    from rsedge.trainer.records import atomic_write_json

    atomic_write_json(cache, out)
    return out


def pareto(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both latency (lower) and accuracy (higher)."""
    front = []
    for i, (lat, acc) in enumerate(points):
        dominated = any((l2 <= lat and a2 >= acc) and (l2 < lat or a2 > acc) for j, (l2, a2) in enumerate(points)
                        if j != i)
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: points[i][0])


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    pts, labels = [], []
    for r in rows:
        for key, marker in (("fp32", "o"), ("int8", "s")):
            pts.append((r[key]["latency_ms_median"], r[key]["test_top1"]))
            labels.append((f"{r['method']} {key.upper()}", marker))
    front = pareto(pts)
    fig, ax = plt.subplots(figsize=(8, 5.5))
    for (lat, acc), (label, marker) in zip(pts, labels):
        ax.scatter(lat, acc, marker=marker, s=40)
        ax.annotate(label, (lat, acc), textcoords="offset points", xytext=(4, 3), fontsize=7)
    ax.plot([pts[i][0] for i in front], [pts[i][1] for i in front], "k--", lw=1, label="Pareto front")
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("median latency, ms (batch 1, log scale)")
    ax.set_ylabel("test top-1")
    ax.set_title(title, fontsize=9)
    ax.legend(loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)


def main(argv=None) -> int:
    args = parse_args(argv)
    from rsedge.compress.finetune import finetune_run
    from rsedge.compress.prune import prune_run
    from rsedge.export.run import export_run
    from rsedge.trainer.modelfile import read_metadata
    from rsedge.trainer.records import atomic_write_bytes, atomic_write_json, now_iso, read_json, versions
    from rsedge.trainer.run import train_run
    from rsedge.trainer.train import TrainConfig

    t0 = time.time()
    data = Path(args.data).resolve()
    # the split and the baseline depend only on these; methods live in a folder per fine-tuning
    # setting, so a longer fine-tuning run reuses the baseline
    base = Path(args.work) / f"{args.model}_s{args.subset:g}_e{args.epochs}_seed{args.seed}"
    work = base / f"ft{args.ft_epochs}_r{args.ratio:g}"
    work.mkdir(parents=True, exist_ok=True)
    split_file = base / "split.json"
    split = make_split(data, args.subset, args.seed, split_file)

    base_dir = base / "baseline"
    cfg = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, optimizer="adamw", lr=2e-3, warmup_epochs=1,
                      seed=args.seed, workers=args.workers)
    log(f"baseline {args.model}: {args.epochs} epochs on {split['counts']['train']} images")
    train_run(data, args.model, base_dir, img_size=args.img_size, cfg=cfg, split_file=str(split_file), resume=True)
    base_model = base_dir / "model.safetensors"
    meta = read_metadata(base_model)
    images, labels = test_arrays(split, meta, base / "test_arrays.npz")

    def export_and_measure(model_file: Path, name: str) -> dict:
        edir = (base if name == "baseline" else work) / f"export_{name}"
        if not (edir / "record.json").is_file():
            export_run(model_file, edir, int8=True, calib_data=data, calib_size=args.calib_size,
                       dynamic_batch=True, log=log)
        return {"record": read_json(edir / "record.json"), "bench": measure(edir, images, labels, args)}

    results = {"baseline": export_and_measure(base_model, "baseline")}
    results["baseline"]["pytorch_test_top1"] = read_json(base_dir / "record.json")["test"]["top1"]
    ft_cfg = TrainConfig(epochs=args.ft_epochs, batch_size=args.batch_size, optimizer="sgd", lr=1e-3,
                         schedule="step", step_milestones=(0.5, 0.75), step_gamma=0.9, seed=args.seed,
                         workers=args.workers)
    for name in args.methods:
        criterion, loss = METHODS[name]
        pdir = base / f"prune_{criterion}_r{args.ratio:g}"
        if not (pdir / "model.safetensors").is_file():
            log(f"{name}: pruning with {criterion} at rate {args.ratio}")
            prune_run(base_model, pdir, method=criterion, ratio=args.ratio, data=data, log=log,
                      workers=args.workers, seed=args.seed)
        fdir = work / f"finetune_{name}"
        log(f"{name}: fine-tuning {args.ft_epochs} epochs ({loss})")
        finetune_run(pdir / "model.safetensors", data, fdir, cfg=ft_cfg, loss=loss, resume=True, log=log)
        results[name] = export_and_measure(fdir / "model.safetensors", name)
        results[name]["pytorch_test_top1"] = read_json(fdir / "record.json")["test"]["top1"]
        results[name]["prune_record"] = read_json(pdir / "record.json")

    paper = PAPER[args.model]
    base_acc = results["baseline"]["pytorch_test_top1"]
    rows = []
    for name, r in results.items():
        g = r["record"]["onnx"]
        rows.append({
            "method": name,
            "paper_name": PAPER_NAMES[name],
            "test_top1": r["pytorch_test_top1"],
            "delta_vs_baseline": r["pytorch_test_top1"] - base_acc,
            "params": g["pytorch"]["params"],
            "macs": g["pytorch"]["macs"],
            "onnx_params": g["graph"]["params"],
            "onnx_macs": g["graph"]["macs"],
            "fp32": {"test_top1": r["bench"]["fp32"]["test_top1_onnxruntime"], "onnx_mb": r["bench"]["fp32"]["onnx_mb"],
                     "latency_ms_median": r["bench"]["fp32"]["latency_ms"]["median"],
                     "latency_ms_p99": r["bench"]["fp32"]["latency_ms"]["p99"], "fps": r["bench"]["fp32"]["fps"]},
            "int8": {"test_top1": r["bench"]["int8"]["test_top1_onnxruntime"], "onnx_mb": r["bench"]["int8"]["onnx_mb"],
                     "latency_ms_median": r["bench"]["int8"]["latency_ms"]["median"],
                     "latency_ms_p99": r["bench"]["int8"]["latency_ms"]["p99"], "fps": r["bench"]["int8"]["fps"]},
            "paper": paper.get(name, {}),
        })
    cond = results["baseline"]["bench"]["fp32"]["conditions"]
    cmd = "python benchmarks/reproduce_remotetrimmer.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    full_paper_length = args.ft_epochs >= (40 if args.model == "resnet18" else 20) and args.subset >= 1
    cap_aml = next((r for r in rows if r["method"] == "cap+aml"), None)
    doc = {
        "command": cmd,
        "date": now_iso(),
        "seconds": round(time.time() - t0, 1),
        "machine": {"platform": platform.platform(), "cpu": cond.get("cpu") or platform.processor(),
                    "gpu_for_training": gpu_name()},
        "versions": versions(),
        "data": str(data),
        "split": {"seed": args.seed, "train": split["counts"]["train"], "test": split["counts"]["test"],
                  "train_subset": args.subset, "skipped_unreadable": len(split["skipped"])},
        "settings": {"model": args.model, "img_size": args.img_size, "baseline_epochs": args.epochs,
                     "ft_epochs": args.ft_epochs, "ratio": args.ratio, "batch_size": args.batch_size,
                     "paper_fine_tuning_length": full_paper_length,
                     "benchmark": "ONNX Runtime CPU, batch 1, median of >= 50 runs and >= "
                                  f"{args.bench_seconds:g} s after warm-up"},
        "rows": rows,
        "cap_aml_within_half_point_of_baseline": None if cap_aml is None else cap_aml["delta_vs_baseline"] >= -0.005,
    }
    out = results_dir(args.results, args.commit_results)
    stem = f"remotetrimmer_eurosat_{args.model}"
    atomic_write_json(out / f"{stem}.json", doc)
    plot(rows, out / f"{stem}.png",
         f"{args.model} on EuroSAT, rate {args.ratio}: test top-1 vs latency ({doc['machine']['cpu']}, ONNX Runtime)")
    atomic_write_bytes(out / f"{stem}.md", markdown(doc, stem).encode())
    print(markdown(doc, stem))
    return 0


def _fmt(v, spec):
    return "—" if v is None else format(v, spec)


def markdown(doc: dict, stem: str) -> str:
    s = doc["settings"]
    short = "" if s["paper_fine_tuning_length"] else (
        f"**Shorter than the paper**: training on {doc['split']['train_subset']:.0%} of the training split, "
        f"baseline {s['baseline_epochs']} epochs, fine-tuning {s['ft_epochs']} epochs (the paper: the full split, "
        f"{40 if s['model'] == 'resnet18' else 20} epochs).\n\n")
    lines = [
        f"# RemoteTrimmer comparison on EuroSAT: {s['model']}, pruning rate {s['ratio']}",
        "",
        short + f"Split: seed {doc['split']['seed']}, stratified 80/20; {doc['split']['train']} training and "
        f"{doc['split']['test']} test images, {s['img_size']}x{s['img_size']}. Baseline: AdamW, cosine. "
        "Fine-tuning: SGD, lr 1e-3, x0.9 at 50 % and 75 % of the epochs (the paper's schedule). Accuracy: PyTorch "
        "on the test split (INT8: ONNX Runtime on the test split). Latency: " + s["benchmark"] + ".",
        "",
        "| method | paper's name | top-1 | Δ vs baseline | paper top-1 | params | paper params | MACs | "
        "FP32 ONNX MB | FP32 median ms | FP32 FPS | INT8 top-1 | INT8 ONNX MB | INT8 median ms | INT8 FPS |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in doc["rows"]:
        p = r["paper"]
        lines.append(
            f"| {r['method']} | {r['paper_name']} | {r['test_top1']:.4f} | {r['delta_vs_baseline']:+.4f} | "
            f"{_fmt(p.get('acc'), '.3f')} | {r['params'] / 1e6:.2f} M | {_fmt(p.get('params_m'), '.2f')}"
            f"{' M' if p.get('params_m') else ''} | {r['macs'] / 1e9:.3f} G | {r['fp32']['onnx_mb']:.2f} | "
            f"{r['fp32']['latency_ms_median']:.3f} | {r['fp32']['fps']:.1f} | {r['int8']['test_top1']:.4f} | "
            f"{r['int8']['onnx_mb']:.2f} | {r['int8']['latency_ms_median']:.3f} | {r['int8']['fps']:.1f} |")
    verdict = doc["cap_aml_within_half_point_of_baseline"]
    lines += [
        "",
        f"CAP + AML within 0.5 points of the baseline: {'—' if verdict is None else ('yes' if verdict else 'NO')}.",
        "",
        f"![accuracy vs latency]({stem}.png)",
        "",
        f"Command: `{doc['command']}`  ",
        f"Date: {doc['date']} (this invocation: {doc['seconds'] / 3600:.2f} h; stages already done are reused)  ",
        f"Machine: {doc['machine']['cpu']}, {doc['machine']['platform']}; training GPU: "
        f"{doc['machine']['gpu_for_training'] or 'none (CPU)'}  ",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in doc["versions"].items() if k != "platform"),
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
