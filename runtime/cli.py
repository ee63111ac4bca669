"""rsedge-bench: benchmark and evaluate models on this machine (console script; `rsedge bench` is the same).

Needs only the runtime: numpy, plus TensorRT (+ pycuda or cuda-python) for engines and
onnxruntime for ONNX files.
"""

import argparse
import os
import re
import shutil
import sys
import tempfile

from . import __version__
from .bench import benchmark, report
from .build.trt_compat import parse_batch
from .bundles.archive import ARCHIVE_SUFFIXES, extract_bundle, is_bundle_archive
from .bundles.bundle import Bundle, ensure_engines, is_bundle, precision_warnings, variants_for
from .errors import BackendUnavailable, RuntimeToolError
from .helpformat import HelpFormatter

EPILOG = """examples:
  rsedge-bench model.onnx                               ONNX Runtime, batch 1
  rsedge-bench fp32.onnx pruned-int8.engine --batch 1,8 one table, speed-up against the first
  rsedge-bench model.engine --eval data/EuroSAT/val     latency + top-1 on a labeled folder (<class>/<image>)
  rsedge-bench bundle/ --json r.json --md r.md         verify, build missing engines, benchmark + evaluate all
  rsedge-bench --eval bundle.tar.gz                     the archive `rsedge bundle --tar` writes, extracted to bundle/
  rsedge-bench seg-bundle/ --save-predictions preds/    segmentation: mIoU / BF on the bundle's tiles, masks to preds/
  rsedge-bench det-bundle/ --save-predictions preds/    detection: mAP, decode + NMS time, COCO json to preds/
  rsedge-bench det.onnx --eval data/yolo                detection on images with YOLO txt labels
  rsedge-bench base/model.onnx pruned/model.onnx        rows labelled base/model.onnx and pruned/model.onnx
  rsedge-bench model.rspack --eval data/EuroSAT/val     an uplink pack (`rsedge pack`), unpacked and run as ONNX
  rsedge bench runs/ft/model.safetensors runs/onnx/model.onnx   (host only) a PyTorch row next to the ONNX one

Timing follows trtexec: warm-up for --warmup seconds, then at least --iterations runs and at least
--duration seconds; latency (per batch) mean / min / max and nearest-rank percentiles, CV = std/mean
in percent. "thr img/s (wall)" is the wall-clock throughput: batch x timed runs / wall time of the
timed loop, not batch / median latency. On a Jetson, tegrastats is sampled during each timed run for
power and GPU load.
"""

_BUNDLE_EVAL = "<bundle eval set>"
MODEL_FILE_EXTENSIONS = (".safetensors",)
PACK_EXTENSIONS = (".rspack",)


def _int_list(text):
    try:
        values = [int(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def build_parser(prog="rsedge-bench"):
    p = argparse.ArgumentParser(prog=prog, description="Benchmark (latency, throughput, memory, power) and evaluate "
                                "ONNX models, TensorRT engines and rsedge bundles on this device.",
                                epilog=EPILOG, formatter_class=HelpFormatter)
    p.add_argument("models", nargs="+", metavar="MODEL",
                   help=".onnx file, TensorRT engine (.engine/.plan), uplink pack (.rspack: unpacked to a "
                        "temporary folder and run as ONNX), bundle directory or bundle archive (.tar.gz), or "
                        "(host `rsedge bench` only) an rsedge model file (.safetensors, run with "
                        "PyTorch); several give one comparison table with the speed-up against the first")
    p.add_argument("--backend", choices=("auto", "tensorrt", "onnxruntime"), default="auto",
                   help="auto: TensorRT for .engine/.plan, ONNX Runtime for .onnx (the choice and the reason are "
                        "printed)")
    p.add_argument("--providers", default=None,
                   help="ONNX Runtime execution providers in priority order, e.g. cuda,cpu or "
                        "TensorrtExecutionProvider; default: the best available (TensorRT > CUDA > CPU)")
    p.add_argument("--threads", type=int, default=None,
                   help="ONNX Runtime intra-op threads; default: the library's (one per physical core)")
    p.add_argument("--batch", type=_int_list, default=[1], help="batch sizes to time, comma-separated, e.g. 1,8")
    p.add_argument("--warmup", type=float, default=benchmark.DEFAULT_WARMUP_S, metavar="S",
                   help="warm-up seconds before timing (at least one run)")
    p.add_argument("--iterations", type=int, default=benchmark.DEFAULT_ITERATIONS, metavar="N",
                   help="time at least N runs ...")
    p.add_argument("--duration", type=float, default=benchmark.DEFAULT_DURATION_S, metavar="S",
                   help="... and at least S seconds")
    p.add_argument("--cuda-graph", action="store_true",
                   help="TensorRT: capture the inference in a CUDA graph and replay it (trtexec --useCudaGraph)")
    p.add_argument("--spin-wait", action="store_true",
                   help="TensorRT: poll for completion instead of blocking (trtexec --useSpinWait)")
    p.add_argument("--no-power", action="store_true", help="do not sample tegrastats/jtop")
    p.add_argument("--power-interval", type=int, default=benchmark.DEFAULT_POWER_INTERVAL_MS, metavar="MS",
                   help="tegrastats sampling interval")
    p.add_argument("--eval", nargs="?", const=_BUNDLE_EVAL, default=None, metavar="DIR",
                   help="also measure top-1 accuracy on DIR/<class>/<image>; bundles are evaluated on their own "
                        "evaluation set without it (`--eval BUNDLE` runs BUNDLE, it is not taken as DIR); "
                        "segmentation models are evaluated on a bundle's evaluation set only (whole tiles by "
                        "sliding windows: mIoU, global accuracy, mean BF)")
    p.add_argument("--no-eval", action="store_true", help="do not evaluate bundles")
    p.add_argument("--eval-batch", type=int, default=32, help="batch size for evaluation (capped by the model's)")
    p.add_argument("--eval-limit", type=int, default=None, metavar="N", help="evaluate only the first N images")
    p.add_argument("--save-predictions", default=None, metavar="DIR",
                   help="segmentation: write each evaluated image's predicted mask to DIR/<row label>/NNNN.png "
                        "(index PNG, pixel value = class id; .npy without Pillow), numbered as the evaluation "
                        "set, with predictions.json listing them; detection: DIR/<row label>/predictions.json "
                        "(COCO results, original-image pixels) and ground_truth.json; so any tool can score them")
    g = p.add_argument_group("bundles")
    g.add_argument("--build-batch", default=None, metavar="N|MIN,OPT,MAX",
                   help="optimization profile of engines built from a bundle; default: 1..max(--batch), tuned for "
                        "the largest")
    g.add_argument("--precisions", default=None,
                   help="engine precisions to build and run from a bundle, e.g. fp16,int8; default: every one this "
                        "GPU runs fast")
    g.add_argument("--no-build", action="store_true", help="use engines already built; build none")
    g.add_argument("--workspace-mb", type=int, default=None, help="builder workspace limit (default 1024)")
    g.add_argument("--dla", type=int, default=None, metavar="CORE", help="build engines for this DLA core")
    o = p.add_argument_group("output")
    o.add_argument("--json", default=None, metavar="PATH", help="write the full results (schema rsedge-bench/1)")
    o.add_argument("--csv", default=None, metavar="PATH", help="write the comparison table as CSV")
    o.add_argument("--md", default=None, metavar="PATH", help="write a Markdown report")
    o.add_argument("--quiet", action="store_true", help="print only the table")
    p.add_argument("--version", action="version", version="%(prog)s " + __version__)
    return p


def _log_to_stderr(msg):
    sys.stderr.write(msg + "\n")
    sys.stderr.flush()


def _bench_kwargs(args):
    return {"batch_sizes": args.batch, "warmup_s": args.warmup, "iterations": args.iterations,
            "duration_s": args.duration, "threads": args.threads, "cuda_graph": args.cuda_graph,
            "spin_wait": args.spin_wait, "power": not args.no_power, "power_interval_ms": args.power_interval}


def _providers(args):
    return [p.strip() for p in args.providers.split(",") if p.strip()] if args.providers else None


def _model_task(path):
    """The device task of a model file (or Runner) from its metadata, read without loading it (None: unknown)."""
    from .backends import ENGINE_EXTENSIONS
    from .tasks import task_for

    try:
        if not isinstance(path, str):
            return task_for(getattr(path, "metadata", None))
        if path.lower().endswith(".onnx"):
            from .preprocess import onnx_metadata

            return task_for(onnx_metadata(path))
        if path.lower().endswith(ENGINE_EXTENSIONS):
            from .build.sidecar import load_sidecar

            return task_for((load_sidecar(path) or {}).get("metadata"))
    except (RuntimeToolError, IOError, OSError, ValueError):
        return None  # said properly when the model is loaded
    return None


def predictions_dir(args, label):
    """Where --save-predictions puts one run's masks: DIR/<the row label, as a file name>."""
    if not args.save_predictions:
        return None
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", str(label)).strip("_.") or "model"
    return os.path.join(args.save_predictions, name)


def run_model(path, args, log, label=None, evaluate=None, backend=None):
    """Benchmark one model file (or an already made Runner) and evaluate it as --eval asks."""
    from .evaluate import evaluate_folder_with

    if evaluate is None and args.eval:
        if args.eval == _BUNDLE_EVAL:
            raise RuntimeToolError("--eval without a folder needs a bundle (it uses the bundle's evaluation set); "
                                   "for {} give --eval DIR".format(label or path))
        folder = args.eval
        task = _model_task(path)
        if task is not None and not task.reads_folders():
            raise RuntimeToolError("{} is a {} model: it is evaluated on a bundle's evaluation set, not on an image "
                                   "folder (give rsedge-bench the bundle)".format(label or path, task.name))
        if args.save_predictions:
            log("note: --save-predictions writes what a bundle's evaluation set predicts (segmentation masks, "
                "detection COCO files); nothing is saved for {}".format(label or path))

        def evaluate(runner):
            return evaluate_folder_with(runner, folder, batch=args.eval_batch, limit=args.eval_limit, log=log)
    elif evaluate is None and args.save_predictions:
        log("note: {} is not evaluated, so --save-predictions saves nothing for it".format(label or path))
    doc = benchmark.run_benchmark(path, backend=backend or args.backend, providers=_providers(args), log=log,
                                  evaluate=evaluate, **_bench_kwargs(args))
    if label:
        doc["label"] = label
    if doc.get("accuracy"):
        line = summary_line(doc["accuracy"])
        if line:
            log("  " + line)
    return doc


def summary_line(result):
    """The log line of an evaluation result, in the words of the task that produced it."""
    from .tasks import DEFAULT_TASK, get_task

    return get_task(result.get("task") or DEFAULT_TASK).summary(result)


def _bundle_engines(bundle, caps, args, log):
    """[(engine, variant, precision)] built here or found, for TensorRT."""
    build_batch = parse_batch(args.build_batch or str(max(args.batch)))
    precisions = [p.strip() for p in args.precisions.split(",")] if args.precisions else None
    log("{} (sm {}), TensorRT {}: fast FP16 {}, fast INT8 {}".format(
        caps["device"]["name"], caps["device"]["compute_capability"], caps["tensorrt_version"],
        "yes" if caps["fast_fp16"] else "no", "yes" if caps["fast_int8"] else "no"))
    if args.no_build:
        from .bundles.bundle import plan_engines

        plan = [dict(item, status="existing" if os.path.isfile(item["engine"]) else "missing")
                for item in plan_engines(bundle, caps, build_batch, precisions) if not item["skip"]]
    else:
        plan = ensure_engines(bundle, caps, build_batch, precisions, workspace_mb=args.workspace_mb,
                              dla_core=args.dla, log=log)
    found = [(item["engine"], item["variant"], item["precision"]) for item in plan
             if item["status"] in ("built", "reused", "existing")]
    if not found:
        raise RuntimeToolError(f"no engine could be built or found in {bundle.directory}")
    return found


def bundle_models(bundle, args, log):
    """[(path, label, precision, is the FP32 reference)] of a bundle for the backend this machine has:
    TensorRT engines from fp32 and the TensorRT Q/DQ, or else the ONNX files ONNX Runtime runs."""
    name = os.path.basename(os.path.normpath(bundle.directory))
    try:
        from .build.trt_build import probe_device

        caps = probe_device()
    except BackendUnavailable as e:
        log(f"TensorRT is not usable here ({e}); benchmarking the bundle's ONNX variants with ONNX Runtime "
            "instead")
        caps = None
    chosen, skipped = variants_for(bundle, "tensorrt" if caps is not None else "onnxruntime")
    for v, why in skipped:
        log("{}: not run here: {}".format(v["name"], why))
    float_variants = [v["name"] for v in bundle.variants if v.get("precision", "fp32") != "int8"]
    bundle.warnings.extend(precision_warnings(caps))
    if caps is not None:
        models = [(engine, "{}:{}/{}".format(name, variant, precision), precision,
                   variant in float_variants[:1] and precision == "fp32")
                  for engine, variant, precision in _bundle_engines(bundle, caps, args, log)]
    else:
        models = [(bundle.path(v["onnx"]), "{}:{} (onnx)".format(name, v["name"]), v.get("precision", "fp32"),
                   v["name"] in float_variants[:1]) for v in chosen]
    return sorted(models, key=lambda m: not m[3])


def run_bundle(directory, args, log):
    """Verify, build what is missing (TensorRT) or fall back to ONNX Runtime, then benchmark every variant
    made for the backend in use (TensorRT: engines from fp32 and the TensorRT Q/DQ; ONNX Runtime:
    fp32 and the CPU INT8 variant). On the bundle's own evaluation set each variant is also checked
    against the FP32 one (bundles/check.py): the run's "check" entry."""
    from .bundles.check import VariantCheck, describe
    from .evaluate import evaluate_eval_set, load_eval_arrays
    from .tasks.base import EvalOptions

    bundle = Bundle.open(directory, log=log)
    own_eval = args.eval == _BUNDLE_EVAL or (args.eval is None and not args.no_eval and
                                             (bundle.manifest.get("eval") or {}).get("images"))
    check = None
    if own_eval:
        task = bundle.task()
        images, targets = load_eval_arrays(directory, bundle.manifest, args.eval_limit, task=task)
        classes = bundle.class_names()
        check = VariantCheck(task, dict(bundle.preprocess(), classes=classes))
    runs = []
    for path, label, precision, is_reference in bundle_models(bundle, args, log):
        log(f"== {label}")
        evaluate, observe = None, None
        if check is not None:
            observe = check.observer(is_reference)

            def evaluate(runner, observe=observe, label=label):
                options = EvalOptions(args.eval_batch, classes, log, observe, predictions_dir(args, label))
                return evaluate_eval_set(runner, images, targets, task=task, options=options)
        run = run_model(path, args, log, label=label, evaluate=evaluate, backend="auto")
        if check is not None:
            entry = check.finish(observe, label, precision, is_reference)
            if entry is not None:
                run["check"] = entry
                log(describe(entry))
        if bundle.warnings:
            run["warnings"] = list(bundle.warnings)
        runs.append(run)
    return runs


def _is_bundle_path(path):
    """A bundle folder, or an archive name (even a missing one: no image folder is called x.tar.gz)."""
    return is_bundle(path) or path.lower().endswith(ARCHIVE_SUFFIXES)


def parse_args(parser, argv):
    """argparse, except that `--eval BUNDLE` is read as "--eval, and BUNDLE is a model".

    --eval takes an optional DIR, so argparse alone would take the bundle for the folder to
    evaluate on and find no model. Options and models may be mixed where Python has
    parse_intermixed_args (3.7+).
    """
    end = argv.index("--") if "--" in argv else len(argv)
    out = []
    for i, arg in enumerate(argv):
        if i < end and arg == "--eval" and i + 1 < end and _is_bundle_path(argv[i + 1]):
            arg = "--eval=" + _BUNDLE_EVAL
        elif i < end and arg.startswith("--eval=") and _is_bundle_path(arg[len("--eval="):]):
            out.append("--eval=" + _BUNDLE_EVAL)
            arg = arg[len("--eval="):]
        out.append(arg)
    parse = getattr(parser, "parse_intermixed_args", parser.parse_args)
    return parse(out)


def _label_path(model):
    """The path a row's label comes from: an archive stands for the folder it is extracted to."""
    if is_bundle_archive(model):
        from .bundles.archive import archive_stem

        return os.path.join(os.path.dirname(model), archive_stem(model))
    return model


def _relabel_bundle(runs, directory, label):
    """run_bundle labels rows '<folder name>:<variant>'; two bundles of the same name need their longer label."""
    name = os.path.basename(os.path.normpath(directory))
    for run in runs:
        if label != name and str(run.get("label", "")).startswith(name + ":"):
            run["label"] = label + run["label"][len(name):]
    return runs


def run_torch_model(path, label, args, log, model_loader):
    """The host model file itself, run by PyTorch: the reference row `yolo benchmark` also shows."""
    if model_loader is None:
        raise RuntimeToolError(f"{path} is an rsedge model file (PyTorch): run it with the host's `rsedge bench`, "
                               "which can load it, or export it to ONNX (`rsedge export`) for this device")
    if args.backend != "auto" or args.providers:
        raise RuntimeToolError(f"--backend / --providers choose how ONNX files and engines run; {path} runs with "
                               "PyTorch")
    log(f"== {label} (pytorch)")
    runner = model_loader(path, threads=args.threads, log=log)
    try:
        return run_model(runner, args, log, label=label + " (pytorch)")
    finally:
        runner.close()


def run_pack(path, label, args, log, cleanup):
    """An uplink pack: checked (SHA-256, lengths) and unpacked with numpy into a temporary folder
    (removed afterwards), then run as the ONNX model it holds; a damaged pack is refused by name."""
    from .pack import describe, read_pack, unpack_to_onnx

    if not os.path.isfile(path):
        raise RuntimeToolError(f"pack {path} does not exist")
    pack = read_pack(path)
    tmp = tempfile.mkdtemp(prefix="rsedge-pack-")
    cleanup.append(tmp)
    onnx_path = unpack_to_onnx(pack, tmp)
    info = describe(pack)
    log(f"== {label}")
    log("pack {}: {} bytes{}, {} of {} tensors quantized ({} bits), unpacked to {}".format(
        path, info["bytes"], ", CR {:.2f} against the FP32 {}".format(info["cr"], info["fp32_reference"])
        if info["cr"] else "", info["quantized"], info["tensors"], ",".join(str(b) for b in info["bits"]) or "-",
        onnx_path))
    run = run_model(onnx_path, args, log, label=label)
    run["pack"] = {k: info[k] for k in ("bytes", "cr", "fp32_bytes", "fp32_reference", "bits", "version")}
    return run


def _run_one(model, label, args, log, model_loader, cleanup):
    if model.lower().endswith(ARCHIVE_SUFFIXES) and not os.path.isfile(model):
        raise RuntimeToolError(f"bundle archive {model} does not exist")
    if is_bundle_archive(model):
        directory, tmp = extract_bundle(model, log=log)
        if tmp:
            cleanup.append(tmp)
        return _relabel_bundle(run_bundle(directory, args, log), directory, label)
    if is_bundle(model):
        return _relabel_bundle(run_bundle(model, args, log), model, label)
    if os.path.isdir(model):
        raise RuntimeToolError(f"{model} is a directory without manifest.json: not an rsedge bundle")
    if model.lower().endswith(MODEL_FILE_EXTENSIONS):
        return [run_torch_model(model, label, args, log, model_loader)]
    if model.lower().endswith(PACK_EXTENSIONS):
        return [run_pack(model, label, args, log, cleanup)]
    log(f"== {label}")
    return [run_model(model, args, log, label=label)]


def _print_results(doc, runs, args, log):
    print(report.format_table(doc["comparison"]))
    for warning in report.run_warnings(runs):
        sys.stderr.write("WARNING: " + warning + "\n")  # even with --quiet: a precision the board lacks
    if args.quiet:
        return
    print(report.THROUGHPUT_NOTE)
    for line in report.describe_conditions(doc["conditions"]):
        log("  " + line)
    for warning in (doc["conditions"] or {}).get("warnings", []):
        log("warning: " + warning)
    power = runs[0].get("power") or {}
    if not power.get("available"):
        log("power: {}".format(power.get("reason")))


def main(argv=None, prog="rsedge-bench", model_loader=None):
    """The command. `model_loader(path, threads=, log=)` -> Runner is how the host's `rsedge bench` runs
    .safetensors model files with PyTorch; the device has none, and says so."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(build_parser(prog), argv)
    log = (lambda msg: None) if args.quiet else _log_to_stderr
    cleanup = []
    try:
        runs = []
        labels = report.path_labels([_label_path(m) for m in args.models])
        for model, label in zip(args.models, labels):
            runs.extend(_run_one(model, label, args, log, model_loader, cleanup))
        doc = report.build_document(runs, command=[prog] + argv)
        _print_results(doc, runs, args, log)
        for path in report.write_outputs(doc, args.json, args.csv, args.md):
            log(f"wrote {path}")
    except RuntimeToolError as e:
        sys.stderr.write(f"error: {e}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        return 130
    finally:
        for tmp in cleanup:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
