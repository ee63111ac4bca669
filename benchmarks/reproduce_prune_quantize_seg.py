"""Reproduce seed paper 002's Table II (DeepLabV3+, Taylor pruning, MSB fixed-point) on real aerial data.

    python benchmarks/reproduce_prune_quantize_seg.py                        # Dubai, ResNet18, short CPU run
    python benchmarks/reproduce_prune_quantize_seg.py --paper-schedule --epochs 80 --ft-epochs 20   # on a GPU
    python benchmarks/reproduce_prune_quantize_seg.py --model deeplabv3plus_resnet50

The Dubai aerial set (72 tiles, 5 classes after its "Unlabeled" colour and the black pixels become the
ignore label) split by TILE, seeded, 70/10/20; the model trained on windows cut from the tiles
with overlap; then, as the paper: P = Taylor pruning in `--steps` (60) score-and-remove iterations with
no training in between, then retraining; Q = MSB fixed-point 8-bit weights (no retraining); P+Q =
the retrained pruned model quantized; and beside them INT8 Q/DQ (activations too) with the export's
accuracy guard on mIoU. Every row is measured on the WHOLE test tiles by sliding windows: global
accuracy, mIoU, mean BF score (tolerance 0.75 % of the diagonal), weight memory as the weights
really occupy it (int8 + exponents for Q), params, and ONNX Runtime CPU latency per window.

Each stage writes its run directory under `--work` and is skipped when its record exists, so a
stopped run continues where it was. Results: prune_quantize_seg_<data>_<model>.{json,md} in
benchmarks/work/results/ (benchmarks/results/ with --commit-results).
"""
from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
import time
from pathlib import Path

from bench_output import Formatter, add_output_options, gpu_name, log, results_dir

HERE = Path(__file__).resolve().parent

# Table II of the paper (UAVid, RTX2080, MATLAB): global accuracy, mIoU, mean BF in %, memory MB, params M.
PAPER = {
    "deeplabv3plus_resnet18": {
        "baseline": (81.09, 53.06, 62.19, 59.75, 20.6), "P": (76.25, 51.06, 59.08, 24.67, 9.2),
        "Q": (75.63, 51.02, 58.97, 14.96, 20.6), "P+Q": (72.14, 50.27, 58.88, 6.24, 9.2)},
    "deeplabv3plus_resnet50": {
        "baseline": (84.65, 59.26, 69.11, 148.32, 43.9), "P": (84.79, 59.53, 69.47, 127.85, 37.8),
        "Q": (84.23, 59.41, 69.13, 37.08, 43.9), "P+Q": (83.96, 58.54, 68.88, 31.94, 37.8)},
}
ROWS = ("baseline", "P", "Q", "P+Q", "INT8 Q/DQ", "P + INT8 Q/DQ")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=Formatter)
    p.add_argument("--data", default=str(HERE.parent.parent / "shared" / "data" / "dubai_aerial"),
                   help="segmentation dataset (images + masks; the Dubai layout is recognized)")
    p.add_argument("--model", default="deeplabv3plus_resnet18", choices=sorted(PAPER), help="architecture")
    p.add_argument("--img-size", type=int, default=256, help="window side (a multiple of 32)")
    p.add_argument("--overlap", type=int, default=64, help="window overlap in training and sliding evaluation")
    p.add_argument("--epochs", type=int, default=6, help="baseline epochs (the paper: 80)")
    p.add_argument("--ft-epochs", type=int, default=3, help="retraining epochs after pruning (the paper: 20)")
    p.add_argument("--paper-schedule", action="store_true",
                   help="SGD momentum 0.9, lr 1e-3 x0.3 every 10 epochs, weight decay 1e-3 (the paper's); "
                        "default: AdamW lr 1e-3 cosine, which converges in the few epochs a CPU allows")
    p.add_argument("--steps", type=int, default=60, help="Taylor score-and-remove iterations (the paper: 60)")
    p.add_argument("--ratio", type=float, default=0.35,
                   help="channels removed per layer over all steps (0.35 removes about 55 %% of the parameters)")
    p.add_argument("--taylor-batches", type=int, default=2, help="batches each Taylor step scores on")
    p.add_argument("--step-batches", type=int, default=0,
                   help="training batches fine-tuned between Taylor steps (MATLAB's loop the paper follows "
                        "updates a few mini-batches per iteration); 0: score-and-remove only, retraining at the end")
    p.add_argument("--batch-size", type=int, default=8, help="windows per step (the paper: 8)")
    p.add_argument("--max-drop", type=float, default=1.0, help="INT8 Q/DQ guard budget in mIoU points")
    p.add_argument("--calib-size", type=int, default=32, help="calibration tiles (a few windows each)")
    p.add_argument("--workers", type=int, default=1, help="data-loading workers")
    p.add_argument("--seed", type=int, default=0, help="split and training seed")
    p.add_argument("--bench-seconds", type=float, default=3.0, help="latency measurement time per file")
    p.add_argument("--threads", type=int, default=None, help="ONNX Runtime threads (default: its own)")
    p.add_argument("--work", default=str(HERE / "work" / "seg"), help="run directories (resumable)")
    add_output_options(p)
    return p


def train_config(args, epochs: int, retrain: bool):
    from rsedge.trainer.train import TrainConfig

    if args.paper_schedule:
        milestones = tuple(k * 10 / epochs for k in range(1, epochs // 10 + 1) if k * 10 < epochs) or (1.0,)
        return TrainConfig(epochs=epochs, batch_size=args.batch_size, optimizer="sgd", lr=1e-3, momentum=0.9,
                           weight_decay=1e-3, schedule="step", step_milestones=milestones, step_gamma=0.3,
                           seed=args.seed, workers=args.workers)
    return TrainConfig(epochs=epochs, batch_size=args.batch_size, optimizer="adamw", lr=5e-4 if retrain else 1e-3,
                       warmup_epochs=0 if retrain else 1, seed=args.seed, workers=args.workers)


def models(args, data: Path, work: Path) -> dict[str, Path]:
    """Train, prune, retrain and quantize, each stage skipped when its run directory is complete."""
    from rsedge.compress.finetune import finetune_run
    from rsedge.compress.msb_fixed import quantize_run
    from rsedge.compress.prune import prune_run
    from rsedge.trainer.run import train_run

    base = work / "baseline"
    log(f"baseline {args.model}: {args.epochs} epochs")
    train_run(data, args.model, base, img_size=args.img_size, overlap=args.overlap, val=0.1, test=0.2,
              cfg=train_config(args, args.epochs, False), resume=True, log=log)
    pruned = work / (f"taylor_r{args.ratio:g}_s{args.steps}" + (f"_b{args.step_batches}" if args.step_batches else ""))
    if not (pruned / "record.json").is_file():
        log(f"P: Taylor pruning, ratio {args.ratio}, {args.steps} steps")
        prune_run(base / "model.safetensors", pruned, method="taylor", ratio=args.ratio, steps=args.steps,
                  step_epochs=0, step_batches=args.step_batches, taylor_batches=args.taylor_batches,
                  batch_size=args.batch_size, data=data,
                  workers=args.workers, seed=args.seed, exist_ok=True, log=log)
    retrained = work / (f"retrained_r{args.ratio:g}_s{args.steps}_e{args.ft_epochs}"
                        + (f"_b{args.step_batches}" if args.step_batches else ""))
    log(f"P: retraining {args.ft_epochs} epochs")
    finetune_run(pruned / "model.safetensors", data, retrained, cfg=train_config(args, args.ft_epochs, True),
                 resume=True, log=log)
    out = {"baseline": base / "model.safetensors", "P": retrained / "model.safetensors"}
    for name, src in (("Q", out["baseline"]), ("P+Q", out["P"])):
        qdir = src.parent.with_name(src.parent.name + "_msb8")
        if not (qdir / "record.json").is_file():
            log(f"{name}: MSB fixed-point 8-bit weights of {src.parent.name}")
            quantize_run(src, qdir, bits=8, exist_ok=True, log=log)
        out[name] = qdir / "model.safetensors"
    return out


def test_tiles(model_file: Path):
    """The test tiles of the model's split as the device reads a bundle: uint8 RGB and masks."""
    from rsedge.trainer.modelfile import read_metadata
    from rsedge.trainer.segdata import read_pair
    from rsedge.trainer.stage import model_split

    meta = read_metadata(model_file)
    split = model_split(meta)
    pairs = [read_pair(Path(split["root"]), img, mask, meta) for img, mask in split["test"]]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def onnx_row(path: Path, tiles, args) -> dict:
    """Whole-tile metrics of an ONNX file by the device runtime's sliding windows, and its latency
    per window (ONNX Runtime, CPU, batch 1); cached next to the file."""
    from rsedge.runtime.backends import open_runner
    from rsedge.runtime.bench.benchmark import run_benchmark
    from rsedge.runtime.evaluate import evaluate_eval_set
    from rsedge.runtime.tasks.base import EvalOptions
    from rsedge.trainer.records import atomic_write_json

    cache = path.with_suffix(".bench.json")
    if cache.is_file():
        return json.loads(cache.read_text())
    runner = open_runner(str(path), backend="onnxruntime", threads=args.threads)
    try:
        metrics = evaluate_eval_set(runner, tiles[0], tiles[1], options=EvalOptions(batch=8))
    finally:
        runner.close()
    bench = run_benchmark(str(path), backend="onnxruntime", batch_sizes=(1,), warmup_s=0.5, iterations=20,
                          duration_s=args.bench_seconds, threads=args.threads, power=False)
    r = bench["results"][0]
    row = {"metrics": {k: metrics.get(k) for k in ("global_accuracy", "miou", "mean_bf", "n")},
           "latency_ms": r["latency_ms"]["median"], "fps": r["throughput_ips"], "onnx_mb": path.stat().st_size / 1e6,
           "precision": bench.get("precision"), "cpu": (bench.get("conditions") or {}).get("cpu")}
    atomic_write_json(cache, row)
    log(f"  {path.parent.name}/{path.name}: mIoU {row['metrics']['miou']:.4f}, {row['latency_ms']:.2f} ms/window")
    return row


def exports(args, files: dict[str, Path], data: Path) -> dict[str, dict]:
    """ONNX of every model (int8 weights behind DequantizeLinear for Q and P+Q), and INT8 Q/DQ with the
    mIoU guard for the float ones; {row: {"record": export record, "onnx": path}}."""
    from rsedge.export.run import export_run
    from rsedge.trainer.records import read_json

    out = {}
    for name, model_file in files.items():
        edir = model_file.parent / "export"
        int8 = name in ("baseline", "P")
        if not (edir / "record.json").is_file():
            log(f"{name}: export{' + INT8 Q/DQ (guard ' + str(args.max_drop) + ' mIoU points)' if int8 else ''}")
            export_run(model_file, edir, int8=int8, calib_data=data if int8 else None, data=data,
                       calib_size=args.calib_size, max_drop=args.max_drop if int8 else None, exist_ok=True, log=log)
        record = read_json(edir / "record.json")
        out[name] = {"record": record, "onnx": edir / "model.onnx"}
        if int8:
            q = record.get("int8_cpu") or {}
            key = "INT8 Q/DQ" if name == "baseline" else "P + INT8 Q/DQ"
            written = q.get("status") == "written"
            out[key] = {"record": record, "onnx": edir / "model_int8_cpu.onnx" if written else None,
                        "guard": {k: q.get(k) for k in ("status", "reason", "fp32_miou", "int8_miou", "drop_points",
                                                         "quantized_nodes", "quantizable_nodes")}}
    return out


def torch_row(model_file: Path, data: Path) -> dict:
    """The PyTorch model on the whole test tiles (sliding windows), its params and weight memory."""
    from rsedge.compress.msb_fixed import weight_memory
    from rsedge.trainer.modelfile import load_model
    from rsedge.trainer.records import atomic_write_json, read_json
    from rsedge.trainer.run import eval_run

    out = model_file.parent / "eval_test"
    if not (out / "record.json").is_file():
        log(f"evaluating {model_file.parent.name} on the whole test tiles")
        eval_run(model_file, data, out, part="test", batch_size=2, progress=False, log=log)
    result = read_json(out / "record.json")["result"]
    model, meta = load_model(model_file)
    memory = weight_memory(model, meta.get("quantization"))
    row = {"metrics": {k: result.get(k) for k in ("global_accuracy", "miou", "mean_bf", "samples")},
           "params": int(sum(p.numel() for p in model.parameters())), "memory_mb": memory["mb"],
           "file_mb": model_file.stat().st_size / 1e6}
    atomic_write_json(out / "row.json", row)
    return row


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from rsedge.trainer.records import atomic_write_bytes, atomic_write_json, now_iso, versions

    t0 = time.time()
    data = Path(args.data).resolve()
    work = Path(args.work) / f"{data.name}_{args.model}_w{args.img_size}_o{args.overlap}_e{args.epochs}_seed{args.seed}"
    work.mkdir(parents=True, exist_ok=True)
    files = models(args, data, work)
    exported = exports(args, files, data)
    tiles = test_tiles(files["baseline"])
    rows = []
    for name in ROWS:
        e = exported[name]
        row = {"row": name, "paper": dict(zip(("global_accuracy", "miou", "mean_bf", "memory_mb", "params_m"),
                                              PAPER[args.model].get(name, ()))) or None}
        if name in files:
            row["pytorch"] = torch_row(files[name], data)
        if e.get("guard"):
            row["guard"] = e["guard"]
        row["onnx"] = onnx_row(e["onnx"], tiles, args) if e.get("onnx") is not None else None
        rows.append(row)
    doc = {"command": "python benchmarks/reproduce_prune_quantize_seg.py " + " ".join(
               shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])),
           "date": now_iso(), "seconds": round(time.time() - t0, 1),
           "machine": {"platform": platform.platform(), "gpu_for_training": gpu_name(),
                       "cpu": next((r["onnx"]["cpu"] for r in rows if r["onnx"]), None)},
           "versions": versions(), "data": str(data), "settings": vars(args) | {"work": str(work)},
           "split": json.loads((work / "baseline" / "split.json").read_text())["counts"],
           "rows": rows, "goals": goals(rows)}
    out = results_dir(args.results, args.commit_results)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"prune_quantize_seg_{data.name.split('_')[0]}"
    atomic_write_json(out / f"{stem}.json", doc)
    atomic_write_bytes(out / f"{stem}.md", markdown(doc).encode())
    print(markdown(doc))
    return 0


def goals(rows: list[dict]) -> dict:
    """The issue's goals, measured: P keeps >= 50 % fewer params within 3 mIoU points; Q within 1
    point with about 4x less weight memory; INT8 Q/DQ within 1 point."""
    by = {r["row"]: r for r in rows}

    def miou(name, kind="pytorch"):
        r = by.get(name, {}).get(kind)
        return None if not r else r["metrics"]["miou"]

    base, p, q = by["baseline"]["pytorch"], by["P"]["pytorch"], by["Q"]["pytorch"]
    int8 = miou("INT8 Q/DQ", "onnx")
    return {
        "pruned_params_reduction": 1 - p["params"] / base["params"],
        "pruned_miou_drop_points": 100 * (miou("baseline") - miou("P")),
        "pruned_goal_met": 1 - p["params"] / base["params"] >= 0.5 and 100 * (miou("baseline") - miou("P")) <= 3,
        "msb_miou_drop_points": 100 * (miou("baseline") - miou("Q")),
        "msb_memory_ratio": base["memory_mb"] / q["memory_mb"],
        "msb_goal_met": 100 * (miou("baseline") - miou("Q")) <= 1,
        "int8_miou_drop_points": None if int8 is None else 100 * (miou("baseline", "onnx") - int8),
        "int8_goal_met": None if int8 is None else 100 * (miou("baseline", "onnx") - int8) <= 1,
    }


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.2f}"


def markdown(doc: dict) -> str:
    s = doc["settings"]
    lines = [f"# Seed 002, Table II on {Path(doc['data']).name}: {s['model']}", "",
             f"`{doc['command']}` ({doc['date']}, {doc['seconds'] / 60:.0f} min, {doc['machine']['cpu']}, training on "
             f"{doc['machine']['gpu_for_training'] or 'the CPU'})", "",
             f"Split by tile, seed {s['seed']}: {doc['split']}. Windows {s['img_size']} px, overlap {s['overlap']}; "
             f"baseline {s['epochs']} epochs, P = Taylor in {s['steps']} steps at ratio {s['ratio']} then "
             f"{s['ft_epochs']} retraining epochs; {'the paper''s SGDM schedule' if s['paper_schedule'] else 'AdamW'}."
             " Metrics on the whole test tiles (sliding windows); latency per window, ONNX Runtime CPU, batch 1.", "",
             "| row | global acc % | mIoU % | mean BF % | memory MB | params M | ONNX MB | ms/window | paper: "
             "global / mIoU / BF / MB / params |", "|---|---|---|---|---|---|---|---|---|"]
    for r in doc["rows"]:
        m = (r.get("pytorch") or r.get("onnx") or {}).get("metrics", {})
        pt, ox, pp = r.get("pytorch") or {}, r.get("onnx") or {}, r.get("paper")
        paper = " / ".join(f"{v:g}" for v in pp.values()) if pp else "-"
        lines.append(f"| {r['row']} | {_pct(m.get('global_accuracy'))} | {_pct(m.get('miou'))} | "
                     f"{_pct(m.get('mean_bf'))} | {pt['memory_mb']:.2f} | {pt['params'] / 1e6:.2f} | "
                     f"{ox.get('onnx_mb', 0):.1f} | {ox.get('latency_ms', float('nan')):.2f} | {paper} |"
                     if pt else
                     f"| {r['row']} | {_pct(m.get('global_accuracy'))} | {_pct(m.get('miou'))} | "
                     f"{_pct(m.get('mean_bf'))} | - | - | {ox.get('onnx_mb', 0):.1f} | "
                     f"{ox.get('latency_ms', float('nan')):.2f} | {paper} |")
    g = doc["goals"]
    lines += ["", "Goals of issue 12, measured: "
              f"P has {100 * g['pruned_params_reduction']:.1f} % fewer parameters and its mIoU is "
              f"{-g['pruned_miou_drop_points']:+.2f} points against the baseline (goal: >= 50 % fewer, within 3 "
              f"points: {'met' if g['pruned_goal_met'] else 'NOT met'}); Q is {-g['msb_miou_drop_points']:+.2f} "
              f"points with {g['msb_memory_ratio']:.2f}x less weight memory (goal: within 1 point, about 4x: "
              f"{'met' if g['msb_goal_met'] else 'NOT met'}); INT8 Q/DQ is "
              + ("not written" if g["int8_miou_drop_points"] is None else
                 f"{-g['int8_miou_drop_points']:+.2f} points against the FP32 ONNX (goal: within 1 point: "
                 f"{'met' if g['int8_goal_met'] else 'NOT met'})") + ".",
              "", "How this run differs from the paper:", ""]
    lines += [f"- {d}" for d in differences(doc)]
    return "\n".join(lines) + "\n"


def differences(doc: dict) -> list[str]:
    """What a reader must know before comparing our numbers with Table II."""
    s = doc["settings"]
    out = [f"Data: {Path(doc['data']).name}, 72 tiles of 509x544 to 2149x2062 px, 5 classes (its `Unlabeled` colour "
           "and black no-data pixels are the ignore label), one seeded split by tile; the paper: UAVid (8 classes, "
           "540x960) and Vaihingen, averaged over 5 executions. Our numbers are one run.",
           "Model: segmentation_models_pytorch's DeepLabV3+ (output stride 16, ASPP 6/12/18): 12.3 M parameters for "
           "ResNet18 against the paper's 20.6 M (MATLAB's deeplabv3plus); trained from scratch: no ImageNet weights "
           "(rsedge never downloads any), where the paper starts from ImageNet.",
           ("Training: the paper's SGDM schedule" if s["paper_schedule"] else
            f"Training: AdamW (lr 1e-3, cosine, 1 warm-up epoch) for {s['epochs']} epochs and {s['ft_epochs']} "
            "retraining epochs (AdamW, lr 5e-4) on a 2-core CPU") + "; the paper trains 80 + 20 epochs with SGDM "
           "(lr 1e-3 x0.3 every 10 epochs, L2 1e-3, batch 8) on an RTX2080. With so few epochs the baseline is "
           "under-trained, and P gets its retraining epochs on top: P beating the baseline says more about "
           "training length than about pruning.",
           f"Pruning: Taylor (eq. 8), {s['steps']} score-and-remove steps on {s['taylor_batches']} batches each, the "
           f"same ratio in every layer ({s['ratio']} of its channels over all steps, coupled groups by Torch-Pruning, "
           "widths rounded to 8); MATLAB's example the paper follows ranks filters across layers.",
           "Memory: what the weights occupy (float32: 4 bytes a parameter, Q: int8 + one byte per tensor exponent + "
           "float32 BatchNorm); the paper's 59.75 MB for 20.6 M float parameters suggests another count.",
           "Latency: per 256x256 window, ONNX Runtime on the CPU, batch 1, not a GPU. The Q rows' ONNX files hold "
           "int8 weights behind DequantizeLinear, which ONNX Runtime dequantizes at every run: smaller, not faster "
           "here. INT8 Q/DQ quantizes activations too (uint8, ONNX Runtime's CPU variant), guarded on mIoU.",
           ]
    if s.get("epochs_note"):
        out.append(s["epochs_note"])
    return out


if __name__ == "__main__":
    sys.exit(main())
