#!/usr/bin/env python3
"""Does the rsedge-bench harness cost time? Compare it with a bare onnxruntime loop in one process.

The model is torchvision's ResNet-18 (weights=None: untrained, the timing does not depend on
the weights) exported to ONNX at 224x224, batch 1; torch and torchvision are used only for that
export, on the host. Then, in alternating order (A B B A A B ..., so drift and order effects
cancel), each round times

  A: rsedge.runtime's own path: OrtRunner + benchmark_runner (what `rsedge-bench` runs), and
  B: a bare `InferenceSession.run` loop written here, timed with perf_counter the same way,

for the same number of seconds on the same input, with the same ONNX Runtime options. The
claim checked: the harness's median latency is within 3 % of the bare loop's. Results go to
harness_overhead.{json,md} in benchmarks/work/results/ (benchmarks/results/ with --commit-results)
with the machine, versions, date and command.

    python benchmarks/bench_harness_overhead.py [--size 224] [--rounds 8] [--seconds 3] [--threads N]
"""

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np
from bench_output import Formatter, add_output_options, results_dir

HERE = os.path.dirname(os.path.abspath(__file__))


def export_resnet18(path, size):
    import torch
    import torchvision

    model = torchvision.models.resnet18(weights=None).eval()
    x = torch.zeros(1, 3, size, size)
    kwargs = {"input_names": ["input"], "output_names": ["logits"], "opset_version": 17}
    try:
        torch.onnx.export(model, (x,), path, dynamo=False, **kwargs)
    except TypeError:  # torch without the dynamo switch
        torch.onnx.export(model, (x,), path, **kwargs)
    return {"torch": torch.__version__, "torchvision": torchvision.__version__}


def bare_loop(session, feed, warmup_s, seconds, iterations):
    """The reference: nothing but session.run between two perf_counter reads."""
    run = session.run
    start = time.perf_counter()
    while True:
        run(None, feed)
        if time.perf_counter() - start >= warmup_s:
            break
    times = []
    t_start = time.perf_counter()
    while True:
        a = time.perf_counter()
        run(None, feed)
        b = time.perf_counter()
        times.append((b - a) * 1000.0)
        if len(times) >= iterations and b - t_start >= seconds:
            return times


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=Formatter)
    p.add_argument("--size", type=int, default=224, help="input height and width")
    p.add_argument("--rounds", type=int, default=8, help="rounds; each times the harness and the bare loop once")
    p.add_argument("--seconds", type=float, default=3.0, help="timed seconds per measurement")
    p.add_argument("--warmup", type=float, default=0.5, help="warm-up seconds before each measurement")
    p.add_argument("--threads", type=int, default=1,
                   help="ONNX Runtime intra-op threads; 1 keeps a shared machine's other load from dominating the "
                        "noise (0: ORT's default)")
    add_output_options(p, "--out", "harness_overhead.json/.md")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    out = str(results_dir(args.out, args.commit_results))

    import onnxruntime as ort

    from rsedge.runtime.backends import random_inputs
    from rsedge.runtime.backends.ort import OrtRunner
    from rsedge.runtime.bench import benchmark
    from rsedge.runtime.fileio import atomic_write_text, utc_now
    from rsedge.runtime.jetson import conditions

    tmp = tempfile.mkdtemp(prefix="rsedge-overhead-")
    model = os.path.join(tmp, "resnet18.onnx")
    print(f"exporting torchvision resnet18 (weights=None) at {args.size}x{args.size} to {model}")
    versions = export_resnet18(model, args.size)

    runner = OrtRunner(model, providers=["CPUExecutionProvider"], threads=args.threads or None).load()
    options = ort.SessionOptions()
    if args.threads:
        options.intra_op_num_threads = args.threads
    session = ort.InferenceSession(model, sess_options=options, providers=["CPUExecutionProvider"])
    feed = random_inputs(runner.inputs(), 1)  # the very input the harness binds (same seed)

    rounds = []
    for r in range(args.rounds):
        order = "AB" if r % 2 == 0 else "BA"
        medians = {}
        for side in order:
            if side == "A":
                res = benchmark.benchmark_runner(runner, (1,), warmup_s=args.warmup, iterations=10,
                                                 duration_s=args.seconds, power=False)["results"][0]
                medians["harness"], n_a = res["latency_ms"]["median"], res["iterations"]
            else:
                times = bare_loop(session, feed, args.warmup, args.seconds, 10)
                medians["bare"], n_b = float(np.median(times)), len(times)
        ratio = medians["harness"] / medians["bare"]
        rounds.append({"round": r, "order": order, "harness_median_ms": medians["harness"],
                       "bare_median_ms": medians["bare"], "harness_runs": n_a, "bare_runs": n_b, "ratio": ratio})
        print(f"round {r} ({order}): harness {medians['harness']:.3f} ms ({n_a} runs), "
              f"bare {medians['bare']:.3f} ms ({n_b} runs), harness/bare {ratio:.4f}")
    runner.close()

    harness = float(np.median([r["harness_median_ms"] for r in rounds]))
    bare = float(np.median([r["bare_median_ms"] for r in rounds]))
    paired = float(np.median([r["ratio"] for r in rounds]))
    # The paired ratio compares the two sides within a round, so slow drift of the machine cancels.
    overhead_pct = (paired - 1.0) * 100.0
    passed = abs(overhead_pct) <= 3.0
    cond = conditions.collect_conditions(threads=args.threads or None)
    cond["versions"].update(versions)
    doc = {
        "what": "rsedge-bench harness vs bare InferenceSession.run loop, ResNet-18 (torchvision, weights=None), "
                "batch 1, CPUExecutionProvider",
        "input": [1, 3, args.size, args.size],
        "command": " ".join(["python", os.path.relpath(os.path.abspath(__file__), os.path.dirname(HERE))] +
                            (argv if argv is not None else sys.argv[1:])),
        "date": utc_now(),
        "rounds": rounds,
        "seconds_per_measurement": args.seconds,
        "warmup_s": args.warmup,
        "harness_median_ms": harness,
        "bare_median_ms": bare,
        "paired_ratio_median": paired,
        "overhead_pct": overhead_pct,
        "threshold_pct": 3.0,
        "passed": passed,
        "conditions": cond,
    }
    os.makedirs(out, exist_ok=True)
    atomic_write_text(os.path.join(out, "harness_overhead.json"), json.dumps(doc, indent=2) + "\n")
    v = cond["versions"]
    md = [
        "# Harness overhead: rsedge-bench vs a bare onnxruntime loop",
        "",
        f"Command: `{doc['command']}`  ",
        f"Date: {doc['date']}  ",
        f"Machine: {cond['cpu']} x{cond['cpu_count']}, {cond['os']}, threads: {cond['threads']}  ",
        "Versions: " + ", ".join(f"{k} {v[k]}" for k in sorted(v)),
        "",
        f"Model: torchvision ResNet-18, weights=None (untrained), exported to ONNX (opset 17), input "
        f"1x3x{args.size}x{args.size}, CPUExecutionProvider. {args.rounds} rounds in alternating order (AB, BA, ...), "
        f"each side {args.seconds:g} s after {args.warmup:g} s warm-up, same session options and input.",
        "",
        "| round | order | harness median ms | bare median ms | harness/bare |",
        "|---:|---|---:|---:|---:|",
    ]
    md += [f"| {r['round']} | {r['order']} | {r['harness_median_ms']:.3f} | {r['bare_median_ms']:.3f} | "
           f"{r['ratio']:.4f} |" for r in rounds]
    md += ["", f"Overhead (median over rounds of harness/bare within the round): {overhead_pct:+.2f} %; "
               f"threshold 3 %: **{'pass' if passed else 'FAIL'}**. Medians over rounds: harness {harness:.3f} ms, "
               f"bare loop {bare:.3f} ms.", ""]
    atomic_write_text(os.path.join(out, "harness_overhead.md"), "\n".join(md))
    print(f"harness {harness:.3f} ms vs bare {bare:.3f} ms; paired overhead {overhead_pct:+.2f} % -> "
          f"{'pass' if passed else 'FAIL'}")
    print(f"wrote {os.path.join(out, 'harness_overhead.json')} and .md")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
