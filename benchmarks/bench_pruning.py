"""Every pruning method on one architecture, through prune -> finetune -> export -> runtime bench.

    python benchmarks/bench_pruning.py --arch resnet18 --data ../shared/data/eurosat_rgb \
        --subset 0.05 --epochs 1 --ft-epochs 1

Trains a baseline on a stratified subset of the data (the same split for every method), then for
each method: (l1rr: sparse training first) prune, fine-tune, export to ONNX and benchmark it with
the device runtime (ONNX Runtime here; TensorRT on a Jetson through `bench_device.sh`).
`--l1rr-protocol paper` runs l1rr as seed 001 does instead: sparse training from scratch (the
baseline's architecture and split, fresh weights), pruning, no fine-tuning. Every stage
writes its run directory under `--work`; a rerun skips the stages whose record exists, so an
interrupted run resumes. Results: `pruning_<arch>_<data>.{json,md}` (`..._l1rr-paper.{json,md}` with
`--l1rr-protocol paper`) with the command, machine, versions and date, in benchmarks/work/results/
(benchmarks/results/ with --commit-results).
"""
import argparse
import math
import os
import platform
import random
import shlex
import sys
import time
from collections import defaultdict
from pathlib import Path

from bench_output import Formatter, add_output_options, results_dir

HERE = Path(__file__).resolve().parent
METHODS = ["random", "l1", "bn-scale", "fpgm", "taylor", "cap", "group", "l1rr"]
PAPER = {
    "random": "control",
    "l1": "Li et al. 2017",
    "bn-scale": "Liu et al. 2017 (network slimming)",
    "fpgm": "He et al. 2019",
    "taylor": "seed 002 (Taylor)",
    "cap": "seed 000 (RemoteTrimmer CAP)",
    "group": "Fang et al. 2023 (DepGraph)",
    "l1rr": "seed 001 (L1RR)",
}
L1RR_PROTOCOLS = ("rsedge", "paper")


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=Formatter)
    p.add_argument("--arch", default="resnet18", help="architecture of the registry")
    p.add_argument("--data", default=str(HERE.parent.parent / "shared" / "data" / "eurosat_rgb"),
                   help="image-folder dataset")
    p.add_argument("--subset", type=float, default=1.0, help="fraction of every class and split used")
    p.add_argument("--img-size", type=int, default=64, help="input side (EuroSAT is 64)")
    p.add_argument("--epochs", type=int, default=30, help="baseline training epochs")
    p.add_argument("--ft-epochs", type=int, default=None, help="fine-tuning epochs (default: --epochs)")
    p.add_argument("--sparse-epochs", type=int, default=None,
                   help="l1rr sparse-training epochs (default: --epochs, at least 2 so a regularized phase runs)")
    p.add_argument("--l1rr-protocol", choices=L1RR_PROTOCOLS, default="rsedge",
                   help="rsedge: sparse-train the trained baseline, prune, fine-tune; paper (seed 001): "
                   "sparse-train from scratch for --sparse-epochs, prune, no fine-tuning (the pruned model's "
                   "test top-1 is the result)")
    p.add_argument("--ratio", type=float, default=0.5, help="pruning ratio (RemoteTrimmer's table uses 0.7)")
    p.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS, help="methods to run")
    p.add_argument("--loss", choices=("ce", "aml"), default="ce", help="fine-tuning loss")
    p.add_argument("--batch-size", type=int, default=64, help="images per batch")
    p.add_argument("--workers", type=int, default=1, help="data-loading workers")
    p.add_argument("--threads", type=int, default=None, help="torch / ONNX Runtime threads (default: all)")
    p.add_argument("--bench-seconds", type=float, default=2.0, help="benchmark duration per model and round")
    p.add_argument("--bench-rounds", type=int, default=5, help="interleaved latency rounds (median reported)")
    p.add_argument("--seed", type=int, default=0, help="split, initialization and data-order seed")
    p.add_argument("--work", default=str(HERE / "work"), help="run directories (resumable)")
    add_output_options(p, "--results", "the json and md")
    p.add_argument("--label", default=None, help="free text printed above the table (e.g. 'short run')")
    return p


def parse_args(argv=None):
    return build_parser().parse_args(argv)


def subset_split(data, subset, seed, path, log):
    """The split of the full folder (corrupt images found once), each part cut to `subset` per class."""
    from rsedge.trainer.datasets import load_split, make_split, save_split

    if path.is_file():
        return load_split(path)
    log(f"making the split of {data} (every image is decoded once)")
    split = make_split(data, seed=seed)
    if subset < 1:
        rng = random.Random(seed)
        for part in ("train", "val", "test"):
            by_class = defaultdict(list)
            for rel, label in split[part]:
                by_class[label].append([rel, label])
            cut = []
            for label in sorted(by_class):
                items = by_class[label]
                rng.shuffle(items)
                cut.extend(items[: max(1, math.ceil(len(items) * subset))])
            split[part] = cut
        split["counts"] = {k: len(split[k]) for k in ("train", "val", "test")}
        split["subset"] = subset
    save_split(split, path)
    return split


def done(d):
    return (Path(d) / "record.json").is_file()


def method_dir(method, protocol):
    """l1rr's runs of the two protocols never share a directory (nor a resumed stage)."""
    return f"l1rr-{protocol}" if method == "l1rr" else method


def pruned_test_top1(model_file, data, out, args, log):
    """Seed 001's result: the pruned model, not fine-tuned, on the test split (`rsedge eval`'s stage)."""
    from rsedge.trainer.records import read_json
    from rsedge.trainer.run import eval_run

    if not done(out):
        log("l1rr: test top-1 of the pruned model (paper protocol: no fine-tuning)")
        eval_run(model_file, data, out, part="test", batch_size=args.batch_size, workers=args.workers,
                 progress=False, log=log)
    return read_json(Path(out) / "record.json")["result"]["top1"]


def l1rr_text(protocol, sparse_epochs, ft_epochs):
    """(the l1rr part of the settings line, the l1rr note): which protocol, and how it is not the paper's."""
    common = "global gamma threshold at the same ratio, residual reconstruction, bias compensation"
    if protocol == "paper":
        return (f"l1rr (protocol `paper`, seed 001's): {sparse_epochs} epoch(s) of sparse training from scratch "
                f"(the baseline's architecture and split, fresh weights), {common}, no fine-tuning: its test top-1 "
                f"is the pruned model's",
                f"l1rr followed the paper: {sparse_epochs} epoch(s) of sparse training from scratch in place of the "
                f"baseline's training, pruned and not fine-tuned, so its accuracy is that of a model trained for "
                f"{sparse_epochs} epoch(s) in all")
    return (f"l1rr (protocol `rsedge`): {sparse_epochs} epoch(s) of sparse training starting from the trained "
            f"baseline, {common}, then fine-tuning like the others",
            f"l1rr used rsedge's protocol, not the paper's: seed 001 sparse-trains from scratch and prunes without "
            f"fine-tuning (`--l1rr-protocol paper`); here it trained {sparse_epochs} epoch(s) of sparse training on "
            f"top of the baseline and {ft_epochs} of fine-tuning, so its accuracy is not directly comparable")


def machine():
    from rsedge.runtime.jetson.conditions import collect_conditions

    try:
        cond = collect_conditions()
    except Exception:  # noqa: BLE001 - the table still means something without it
        cond = {}
    return {"host": platform.node(), "platform": platform.platform(), "python": sys.version.split()[0],
            "cpu_count": os.cpu_count(), "cpu": cond.get("cpu") or cond.get("cpu_model") or platform.processor(),
            "conditions": cond}


def main(argv=None):
    args = parse_args(argv)
    import torch

    from rsedge.compress.finetune import finetune_run
    from rsedge.compress.prune import prune_run
    from rsedge.compress.sparse import sparse_train_run
    from rsedge.export.run import export_run
    from rsedge.runtime.bench.benchmark import run_benchmark
    from rsedge.trainer.records import atomic_write_bytes, atomic_write_json, now_iso, read_json, versions
    from rsedge.trainer.run import train_run
    from rsedge.trainer.train import TrainConfig

    if args.threads:
        torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    data = Path(args.data).resolve()
    tag = f"{args.arch}_{data.name}"
    work = Path(args.work) / f"pruning_{tag}_s{args.subset:g}_e{args.epochs}_r{args.ratio:g}"
    work.mkdir(parents=True, exist_ok=True)
    ft_epochs = args.ft_epochs or args.epochs
    sparse_epochs = max(2, args.sparse_epochs or args.epochs)

    def log(msg):
        print(f"[{time.perf_counter() - t_start:7.1f}s] {msg}", flush=True)

    split = subset_split(data, args.subset, args.seed, work / "split.json", log)
    log(f"split: train {len(split['train'])}, val {len(split['val'])}, test {len(split['test'])}")

    def cfg(epochs, lr=None, optimizer="adamw"):
        return TrainConfig(epochs=epochs, batch_size=args.batch_size, optimizer=optimizer, lr=lr, workers=args.workers,
                           seed=args.seed)

    base = work / "baseline"
    if not done(base):
        log(f"train the {args.arch} baseline ({args.epochs} epochs)")
        train_run(data, args.arch, base, img_size=args.img_size, cfg=cfg(args.epochs, 1e-3),
                  split_file=str(work / "split.json"), resume=True, log=log)
    base_model = base / "model.safetensors"

    def export(model_file, run):
        ex = run / "export"
        if not done(ex):
            export_run(model_file, ex, log=log)
        xrec = read_json(ex / "record.json")
        import onnx

        ops = sorted({n.op_type for n in onnx.load(str(ex / "model.onnx")).graph.node})
        return {"onnx": str(ex / "model.onnx"), "onnx_mb": (ex / "model.onnx").stat().st_size / 1e6,
                "onnx_params": xrec["onnx"]["graph"]["params"], "onnx_macs": xrec["onnx"]["graph"]["macs"],
                "onnx_ops": ops}

    rows = []
    brec = read_json(base / "record.json")
    rows.append({"method": "baseline", "paper": "", "test_top1": brec["test"]["top1"], "top1_after_prune": None,
                 "params": brec["params"], **export(base_model, base)})
    for method in args.methods:
        run = work / method_dir(method, args.l1rr_protocol)
        t0 = time.perf_counter()
        source = base_model
        paper = method == "l1rr" and args.l1rr_protocol == "paper"
        if method == "l1rr":
            sp = run / "sparse"
            if not done(sp):
                start = "from scratch" if paper else "from the baseline"
                log(f"l1rr: sparse training {start} ({sparse_epochs} epochs)")
                sparse_train_run(base_model, data, sp, method="l1rr", cfg=cfg(sparse_epochs, 0.01, "sgd"),
                                 from_scratch=paper, resume=True, log=log)
            source = sp / "model.safetensors"
        pr = run / "prune"
        if not done(pr):
            log(f"{method}: prune at ratio {args.ratio}")
            prune_run(source, pr, method=method, ratio=args.ratio, data=data, log=log, batch_size=args.batch_size,
                      workers=args.workers, seed=args.seed,
                      coupling="reconstruct" if method == "l1rr" else "shared",
                      compensate_bias=method == "l1rr")
        if paper:
            final, test_top1 = pr / "model.safetensors", pruned_test_top1(pr / "model.safetensors", data,
                                                                          run / "eval", args, log)
        else:
            ft = run / "finetune"
            if not done(ft):
                log(f"{method}: fine-tune ({ft_epochs} epochs, {args.loss})")
                finetune_run(pr / "model.safetensors", data, ft, cfg=cfg(ft_epochs, 1e-3), loss=args.loss,
                             resume=True, log=log)
            final, test_top1 = ft / "model.safetensors", read_json(ft / "record.json")["test"]["top1"]
        prec = read_json(pr / "record.json")
        row = {"method": method, "paper": PAPER[method], "test_top1": test_top1,
               "top1_after_prune": prec.get("val_top1_before_finetune"), "params": prec["after"]["params"],
               "macs": prec["after"]["macs"], "coupling": prec.get("coupling"), **export(final, run)}
        if method == "l1rr":
            row["l1rr_protocol"] = args.l1rr_protocol
        row["seconds"] = round(time.perf_counter() - t0, 1)
        rows.append(row)
        log(f"{method}: test top-1 {row['test_top1']:.4f}, params {row['params']:,}")
    # latency last, in interleaved rounds (ABC..., ...CBA): on a shared machine drift then hits every
    # model alike, and the median over rounds drops an unlucky one
    medians = {r["method"]: [] for r in rows}
    p90 = {r["method"]: [] for r in rows}
    for k in range(args.bench_rounds):
        order = rows if k % 2 == 0 else rows[::-1]
        log(f"latency round {k + 1}/{args.bench_rounds}")
        for r in order:
            doc = run_benchmark(r["onnx"], backend="onnxruntime", batch_sizes=(1,), warmup_s=0.3, iterations=50,
                                duration_s=args.bench_seconds, threads=args.threads, power=False)
            medians[r["method"]].append(doc["results"][0]["latency_ms"]["median"])
            p90[r["method"]].append(doc["results"][0]["latency_ms"]["p90"])
    for r in rows:
        ms = sorted(medians[r["method"]])
        r["latency_ms_median"] = ms[len(ms) // 2]
        r["latency_ms_p90"] = sorted(p90[r["method"]])[len(ms) // 2]
        r["latency_ms_round_medians"] = medians[r["method"]]
        r["fps"] = 1000.0 / r["latency_ms_median"]
    rows[0]["macs"] = read_json(base / "export" / "record.json")["onnx"]["pytorch"]["macs"]
    base_lat = rows[0]["latency_ms_median"]
    for r in rows:
        r["speedup"] = base_lat / r["latency_ms_median"]
    short = args.subset < 1 or args.epochs < 10
    label = args.label or ("SHORT RUN (a smoke test of the pipeline, not a result to compare with the papers)"
                           if short else "")
    doc = {
        "label": label,
        "command": "python " + " ".join(shlex.quote(a) for a in [str(Path(sys.argv[0]))] + list(argv or sys.argv[1:])),
        "settings": {**vars(args), "data": str(data), "ft_epochs": ft_epochs, "sparse_epochs": sparse_epochs,
                     "split_counts": {k: len(split[k]) for k in ("train", "val", "test")},
                     "backend": "onnxruntime CPU", "batch": 1},
        "machine": machine(),
        "versions": versions(),
        "date": now_iso(),
        "seconds": round(time.perf_counter() - t_start, 1),
        "rows": rows,
    }
    results = results_dir(args.results, args.commit_results)
    results.mkdir(parents=True, exist_ok=True)
    name = f"pruning_{tag}" + ("_l1rr-paper" if args.l1rr_protocol == "paper" else "")
    atomic_write_json(results / f"{name}.json", doc)
    head = ["method", "paper", "test top-1", "top-1 right after pruning", "params", "MACs", "ONNX MB",
            "median ms", "FPS (1/median)", "speed-up"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in rows:
        after = "" if r["top1_after_prune"] is None else f"{r['top1_after_prune']:.4f}"
        shown = f"{r['method']} ({r['l1rr_protocol']} protocol)" if "l1rr_protocol" in r else r["method"]
        lines.append(f"| {shown} | {r['paper']} | {r['test_top1']:.4f} | {after} | {r['params']:,} | "
                     f"{r['macs']:,} | {r['onnx_mb']:.2f} | {r['latency_ms_median']:.3f} | {r['fps']:.1f} | "
                     f"{r['speedup']:.2f}x |")
    m = doc["machine"]
    l1rr_settings, l1rr_note = l1rr_text(args.l1rr_protocol, sparse_epochs, ft_epochs)
    has_l1rr = "l1rr" in args.methods
    md = (f"# Pruning methods on {args.arch}, {data.name}\n\n"
          + (f"**{label}**\n\n" if label else "")
          + f"Split: train {doc['settings']['split_counts']['train']}, val {doc['settings']['split_counts']['val']}, "
          f"test {doc['settings']['split_counts']['test']} images (subset {args.subset:g}, seed {args.seed}); "
          f"{args.img_size}x{args.img_size}; baseline {args.epochs} epoch(s), fine-tuning {ft_epochs} epoch(s) "
          f"({args.loss}), ratio {args.ratio}" + (f"; {l1rr_settings}" if has_l1rr else "")
          + ". Test top-1 from PyTorch on the test split after fine-tuning"
          + (" (l1rr `paper`: right after pruning)" if has_l1rr and args.l1rr_protocol == "paper" else "")
          + f"; latency: ONNX Runtime CPU, batch 1, median of {args.bench_rounds} "
          f"interleaved rounds of {args.bench_seconds:g} s.\n\n"
          + "\n".join(lines)
          + "\n\nNotes: with shared coupling every method keeps the same widths at a given ratio (multiples of "
          "8), so their latencies differ by noise only."
          + (f" {l1rr_note}; its reconstructed adds hold the union of their branches' channels (odd widths) and add "
             "Gather/Slice/Concat, which on ONNX Runtime CPU also break the Conv+Add+ReLU fusion." if has_l1rr else "")
          + f"\n\nMachine: {m['cpu']} ({m['cpu_count']} cores), {m['platform']}; torch {doc['versions'].get('torch')}, "
          f"onnxruntime {doc['versions'].get('onnxruntime')}; {doc['date']}; {doc['seconds']:.0f} s.\n\n"
          f"Command: `{doc['command']}`\n")
    atomic_write_bytes(results / f"{name}.md", md.encode())
    print("\n" + "\n".join(lines))
    print(f"\nresults: {results / f'{name}.json'} and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
