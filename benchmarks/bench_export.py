"""Export goals on real data: FP32 ONNX parity and the INT8 accuracy guard.

Trains (or reuses) a classifier on an image-folder dataset, exports it with `--int8 --max-drop`,
and records what issue "Export for Jetson" asks of it: FP32 parity (max abs diff <= 1e-4, top-1
agreement 1.0) and an INT8 Q/DQ top-1 drop <= 1 point against FP32 on the validation split.
Every stage resumes: rerunning the same command continues where a stop left it.

    python benchmarks/bench_export.py --data ../shared/data/eurosat_rgb --subset 0.25 --epochs 3

Results: export_<data>_<model>.{json,md} in benchmarks/work/results/, or in benchmarks/results/
with --commit-results.
"""
from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
from pathlib import Path

from bench_output import Formatter, add_output_options, results_dir

HERE = Path(__file__).resolve().parent


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=Formatter)
    p.add_argument("--data", default=str(HERE.parent.parent / "shared" / "data" / "eurosat_rgb"),
                   help="image-folder dataset (one folder per class); default: the shared EuroSAT RGB")
    p.add_argument("--model", default="resnet18", help="architecture of the registry (`rsedge models`)")
    p.add_argument("--img-size", type=int, default=64, help="input side in pixels")
    p.add_argument("--epochs", type=int, default=3, help="training epochs")
    p.add_argument("--subset", type=float, default=1.0, help="fraction of the training split used for training")
    p.add_argument("--max-drop", type=float, default=1.0, help="INT8 accuracy guard budget in top-1 points")
    p.add_argument("--calib-size", type=int, default=512, help="INT8 calibration images from the training split")
    p.add_argument("--seed", type=int, default=0, help="split, initialization and data-order seed")
    p.add_argument("--work", default=str(HERE / "work"), help="run directories (resumable)")
    add_output_options(p, "--out")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)

    from rsedge.export.run import export_run, stratified_sample
    from rsedge.trainer.datasets import make_split, save_split
    from rsedge.trainer.records import atomic_write_bytes, atomic_write_json, now_iso, versions
    from rsedge.trainer.run import train_run
    from rsedge.trainer.train import TrainConfig

    data = Path(args.data).resolve()
    tag = f"{data.name}_{args.model}"
    work = Path(args.work) / tag
    train_dir, export_dir = work / "train", work / "export"
    split_file = train_dir / "split.json"
    if not split_file.is_file():
        split = make_split(data, val=0.1, test=0.2, seed=args.seed)
        if args.subset < 1:
            n = max(len(split["classes"]), int(len(split["train"]) * args.subset))
            split["train"] = [list(x) for x in stratified_sample(split["train"], n, seed=args.seed)]
            split["counts"]["train"] = len(split["train"])
            split["subset"] = args.subset
        save_split(split, split_file)
    cfg = TrainConfig(epochs=args.epochs, batch_size=64, optimizer="adamw", lr=2e-3, warmup_epochs=1,
                      seed=args.seed, workers=1)
    train_run(data, args.model, train_dir, img_size=args.img_size, cfg=cfg, split_file=str(split_file), resume=True)
    if not (export_dir / "record.json").is_file():
        export_run(train_dir / "model.safetensors", export_dir, int8=True, calib_data=data, data=data,
                   calib_size=args.calib_size, max_drop=args.max_drop, dynamic_batch=True)
    rec = json.loads((export_dir / "record.json").read_text())
    train_rec = json.loads((train_dir / "record.json").read_text())
    par, q = rec["onnx"]["parity"], rec["int8"]
    goals = {
        "fp32_max_abs_diff_le_1e-4": par["max_abs_diff"] <= 1e-4,
        "fp32_top1_agreement_1": par["top1_agreement"] == 1.0,
        "int8_drop_le_1_point": q["drop_points"] <= 1.0,
    }
    command = "python " + " ".join(shlex.quote(a) for a in [str(Path(sys.argv[0]))] + list(argv or sys.argv[1:]))
    result = {
        "command": command,
        "date": now_iso(),
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine()},
        "versions": versions(),
        "data": str(data),
        "split": {"seed": args.seed, "val": 0.1, "test": 0.2, "train_subset": args.subset,
                  "counts": train_rec["split"]["counts"]},
        "model": args.model, "img_size": args.img_size, "epochs": args.epochs,
        "test_top1_pytorch": train_rec["test"]["top1"],
        "fp32_parity": par,
        "int8": {k: q[k] for k in ("fp32_top1", "int8_top1", "drop_points", "max_drop", "kept_in_float",
                                   "attempts", "validation_images", "calibration_images", "size_vs_fp32")},
        "goals": goals,
    }
    out = results_dir(args.out, args.commit_results)
    atomic_write_json(out / f"export_{tag}.json", result)
    lines = [
        f"# Export goals: {args.model} on {data.name}",
        "",
        f"Command: `{command}`  ",
        f"Date: {result['date']}  ",
        f"Machine: {result['machine']['platform']} ({result['machine']['processor']})  ",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in result["versions"].items() if k != "platform"),
        "",
        f"Split: seed {args.seed}, stratified 70/10/20 train/val/test; training on {args.subset:.0%} of the "
        f"training split ({result['split']['counts']['train']} images), {args.epochs} epochs at "
        f"{args.img_size}x{args.img_size}; test top-1 (PyTorch) {result['test_top1_pytorch']:.4f}.",
        "",
        "| check | value | goal | met |",
        "|---|---|---|---|",
        f"| FP32 ONNX max abs diff vs PyTorch ({par['images']} val images) | {par['max_abs_diff']:.2e} | <= 1e-4 | "
        f"{'yes' if goals['fp32_max_abs_diff_le_1e-4'] else 'NO'} |",
        f"| FP32 top-1 agreement | {par['top1_agreement']:.4f} | 1.0 | "
        f"{'yes' if goals['fp32_top1_agreement_1'] else 'NO'} |",
        f"| INT8 Q/DQ top-1 drop vs FP32 ({q['validation_images']} val images) | {q['drop_points']:.2f} points "
        f"(FP32 {q['fp32_top1']:.4f}, INT8 {q['int8_top1']:.4f}) | <= 1 | "
        f"{'yes' if goals['int8_drop_le_1_point'] else 'NO'} |",
        "",
        "Guard attempts: " + "; ".join(f"{len(a['excluded'])} node(s) in float -> drop {a['drop_points']:.2f}"
                                        for a in q["attempts"]) + ".",
        f"Layers kept in float: {', '.join(q['kept_in_float']) or 'none'}.",
        "",
    ]
    atomic_write_bytes(out / f"export_{tag}.md", "\n".join(lines).encode())
    print("\n".join(lines))
    return 0 if all(goals.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
